"""One measurement of our code, in its own process: ``python -m benchmarks.ours {train,sample,guidance} ...``.

``train``: the jitted train step that training uses (batch drawn inside jit
from uint8 images on the device, L_simple, Adam), its first call (compile
and run) time, images/s as the median over timed steps, and the
floating-point operations per image that XLA's cost analysis counts in the step.
``sample``: sampling of ``--n`` images through :func:`ddpm_jax.sample`'s
compiled sampler, ancestral with all T steps, or ``--method ddim`` and/or
``--sample-steps K`` for the few-step samplers; with ``--steps-to-time K`` the
network's forward pass at batch n is timed K times and multiplied by T
instead (for configurations too slow to run whole).
``guidance``: the cost of classifier-free guidance: the preset made
class-conditional (``model.num_classes = 10``), ``--n`` images with labels
``arange(n) % 10`` drawn through :func:`ddpm_jax.sample` in one batch at
guidance scale w = 0 (the conditional network alone) and at
``--guidance-scale`` (w > 0 runs the network on a doubled batch), each timed on
its second call (the first compiles). ``samples_per_s`` is w = 0's.

On a GPU the result also holds ``device_peak_mb``: JAX's ``peak_bytes_in_use``
(what the arrays took, not the preallocated pool).

Prints one JSON object as the last line; :mod:`benchmarks.__main__` collects them.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import cpu
from ddpm_jax.configs import build_model, get_config, schedule_from_config
from ddpm_jax.diffusion.guidance import GuidanceInputs
from ddpm_jax.sampling.generate import _compiled_sampler, sample
from ddpm_jax.sampling.options import sampling_options
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.training.train import Batching, keeps_last_good, make_dataset_train_step
from ddpm_jax.utils import parallel
from ddpm_jax.utils.trees import count_params


def _config(args):
    config = get_config(args.preset)
    # The network alone, as the torch port has it: the cpu preset's label embedding (a table lookup added
    # to the time embedding) is left out of the train and sample rows; the guidance row measures it.
    config.model.num_classes = 0
    config.model.conv_impl = args.conv_impl
    config.model.compute_dtype = args.compute_dtype
    if args.batch:
        config.train.batch_size = args.batch
    return config


def _flops(lowered) -> float | None:
    """XLA's count of floating-point operations in a lowered program (None where the backend gives none)."""
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # a backend or JAX version without it: the row is still worth having
        return None
    if isinstance(analysis, list):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def measure_train(args) -> dict:
    config = _config(args)
    batch = config.train.batch_size
    mesh = parallel.make_mesh()
    # Placed as training places them, so the first call's compiled program is the one every step reuses.
    images = parallel.put_replicated(
        np.random.default_rng(0).integers(0, 256, (max(2048, batch), 28, 28, 1), dtype=np.uint8), mesh
    )
    state = parallel.put_replicated(create_train_state(config), mesh)
    batching = Batching.from_config(config, mesh)
    step = make_dataset_train_step(schedule_from_config(config), batching, keep_last_good=keeps_last_good(config))
    # As train() runs it: each epoch's data order drawn once, outside the step (none is drawn in the timed steps).
    orders = batching.orders(state, images.shape[0])
    # XLA counts no FLOPs in a custom call: the native CPU kernels' convolutions would count zero. So the
    # count comes from the same step with every convolution XLA's (the same products and the same
    # parameters, whatever conv_impl; lowered, not compiled).
    counted = config.copy_and_resolve_references()
    counted.model.conv_impl = "xla"
    flops = _flops(step.lower(state.replace(apply_fn=build_model(counted.model).apply), images, None, orders.at(0)))
    t0 = time.perf_counter()
    state, metrics = step(state, images, None, orders.at(0))
    jax.block_until_ready(metrics["loss"])
    first_step = time.perf_counter() - t0
    times = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(1, args.steps + 1):
        order = orders.at(i)
        t0 = time.perf_counter()
        state, metrics = step(state, images, None, order)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    median = statistics.median(times)
    return {
        "params": count_params(state.params),
        "batch": batch,
        "first_step_seconds": first_step,
        "step_seconds": times,
        "train_images_per_s": batch / median,
        "flops_per_image": flops / batch if flops else None,
        # The allocator's share: XLA's CPU runtime allocates each step's scratch buffers afresh, and glibc
        # maps every block over 32 MB anew, page faults and all (docs/performance.md, "The process settings").
        "minor_faults_per_step": (after.ru_minflt - usage.ru_minflt) / args.steps,
        "kernel_cpu_seconds_per_step": (after.ru_stime - usage.ru_stime) / args.steps,
        "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def measure_sample(args) -> dict:
    config = _config(args)
    T = config.diffusion.num_timesteps
    state = create_train_state(config)
    checkpoint = DiffusionCheckpoint.from_train_state(state, config)
    n, size = args.n, config.data.image_size
    if args.steps_to_time:
        model = build_model(config.model)
        forward = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))
        x, t = jnp.zeros((n, size, size, 1)), jnp.zeros((n,), jnp.int32)
        jax.block_until_ready(forward(checkpoint.variables, x, t))
        times = []
        for _ in range(args.steps_to_time):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(checkpoint.variables, x, t))
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times) * T
        return {"samples_per_s": n / seconds, "seconds": seconds, "extrapolated": True, "n": n, "T": T}
    steps = args.sample_steps if args.sample_steps and args.sample_steps != T else None
    options = sampling_options(checkpoint.config, steps=steps, method=args.method)
    sampler = _compiled_sampler(checkpoint.config, n, options, 0)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(GuidanceInputs(checkpoint.variables), key))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(GuidanceInputs(checkpoint.variables), jax.random.fold_in(key, 1)))
    seconds = time.perf_counter() - t0
    return {"samples_per_s": n / seconds, "seconds": seconds, "first_call_seconds": first, "extrapolated": False,
            "n": n, "T": T, "reverse_steps": steps or T, "method": args.method}


def measure_guidance(args) -> dict:
    config = _config(args)
    config.model.num_classes = 10
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    n = args.n
    labels = np.arange(n) % 10
    key = jax.random.PRNGKey(0)
    timings = {}
    for w in (0.0, args.guidance_scale):
        def draw(k, w=w):
            return jax.block_until_ready(sample(checkpoint, k, n, labels=labels, guidance_scale=w, batch_size=n,
                                                steps=args.sample_steps, method=args.method))

        t0 = time.perf_counter()
        draw(key)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        draw(jax.random.fold_in(key, 1))
        timings[w] = (first, time.perf_counter() - t0)
    (first0, seconds0), (first1, seconds1) = timings[0.0], timings[args.guidance_scale]
    return {
        "samples_per_s": n / seconds0, "seconds": seconds0, "first_call_seconds": first0,
        "guidance_scale": args.guidance_scale, "guided_samples_per_s": n / seconds1, "guided_seconds": seconds1,
        "guided_first_call_seconds": first1, "guided_time_ratio": seconds1 / seconds0,
        "extrapolated": False, "n": n, "T": config.diffusion.num_timesteps,
        "reverse_steps": args.sample_steps or config.diffusion.num_timesteps, "method": args.method,
        "num_classes": 10,
    }


def _device_peak_mb() -> float | None:
    """JAX's peak of bytes in use on the first device (None where the backend keeps no such statistics)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        return None
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.ours", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("train", "sample", "guidance"))
    p.add_argument("--preset", default="seed")
    p.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "matmul"))
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=None, help="train batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps")
    p.add_argument("--n", type=int, default=100, help="samples to draw")
    p.add_argument("--steps-to-time", type=int, default=0, help="time this many forward passes and extrapolate to T")
    p.add_argument("--sample-steps", type=int, default=None, help="reverse steps K (default: all T; K < T respaces)")
    p.add_argument("--method", default="ancestral", choices=("ancestral", "ddim"), help="sampler")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="guidance: w compared with w = 0")
    args = p.parse_args(argv)
    measure = {"train": measure_train, "sample": measure_sample, "guidance": measure_guidance}[args.what]
    result = measure(args)
    result.update({
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    if jax.default_backend() != "cpu":
        result.update({"device_peak_mb": _device_peak_mb(), "compute_dtype": args.compute_dtype,
                       "compilation_cache_dir": jax.config.jax_compilation_cache_dir})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
