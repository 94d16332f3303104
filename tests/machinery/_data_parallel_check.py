"""Run in a fresh process with 4 simulated CPU devices by tests/machinery/test_parallel.py; prints one JSON line.

XLA's device count is fixed when JAX starts, so this cannot run inside the
pytest process (which has one CPU device).
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax import cpu  # noqa: E402

from ddpm_jax.utils import parallel
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import build_model, get_config, schedule_from_config  # noqa: E402
from ddpm_jax.training.setup import create_train_state  # noqa: E402
from ddpm_jax.sampling.generate import _compiled_sampler
from ddpm_jax.diffusion.guidance import GuidanceInputs  # noqa: E402
from ddpm_jax.diffusion.samplers import make_ancestral_sampler  # noqa: E402
from ddpm_jax.training.train import Batching, make_dataset_train_step
from ddpm_jax.sampling.options import sampling_options


def main():
    cpu.configure()  # as the command-line programs run
    config = get_config("tiny")
    config.train.batch_size = 8
    schedule = schedule_from_config(config)
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    results = {"devices": jax.device_count()}
    states, losses = {}, {}
    for name, mesh in (("four", parallel.make_mesh()), ("one", parallel.make_mesh(jax.devices()[:1]))):
        step = make_dataset_train_step(schedule, Batching.from_config(config, mesh))
        state = parallel.put_replicated(create_train_state(config), mesh)
        data = parallel.put_replicated(images, mesh)
        if name == "four":
            results["all_reduce_in_step"] = "all-reduce" in step.lower(state, data).compile().as_text()
        losses[name] = []
        for _ in range(3):
            state, metrics = step(state, data)
            losses[name].append(float(metrics["loss"]))
        states[name] = jax.device_get(state)
    results["loss_four"], results["loss_one"] = losses["four"], losses["one"]
    # A convolution's bias feeding BatchNorm has a true gradient of exactly 0 (the normalization removes
    # it); Adam divides its rounding noise by its own tiny RMS and steps +-lr either way. Those biases,
    # and the running means they shift, are compared only for being finite.
    four = jax.tree_util.tree_flatten_with_path(states["four"].params)[0]
    one = jax.tree.leaves(states["one"].params)
    names = [jax.tree_util.keystr(path) for path, _ in four]
    before_bn = [("TimeConditionedBlock" in k and "Conv_" in k and k.endswith("['bias']")) for k in names]
    results["params_max_diff"] = max(
        float(np.max(np.abs(a - b))) for (_, a), b, skip in zip(four, one, before_bn) if not skip
    )
    results["compared_leaves"] = len(before_bn) - sum(before_bn)
    results["all_finite"] = all(np.all(np.isfinite(x)) for x in jax.tree.leaves(states["four"]))

    checkpoint = DiffusionCheckpoint.from_train_state(states["one"], config)
    sampler = _compiled_sampler(checkpoint.config, 8, sampling_options(checkpoint.config, variance="beta",
                                                                          mean="x0_clip"), 0)
    key = jax.random.PRNGKey(5)
    sharded = sampler(GuidanceInputs(checkpoint.variables), key)
    results["sample_shards"] = [list(s.data.shape) for s in sharded.addressable_shards]
    model = build_model(config.model)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    single = jax.jit(
        make_ancestral_sampler(lambda v, x, t: model.apply(v, x, t, train=False), schedule, (8, 28, 28, 1),
                               sharding=parallel.batch_sharded(mesh1)),
        in_shardings=(parallel.replicated(mesh1), parallel.replicated(mesh1)),
    )(checkpoint.variables, key)
    results["sample_max_diff"] = float(np.max(np.abs(np.asarray(sharded) - np.asarray(single))))
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
