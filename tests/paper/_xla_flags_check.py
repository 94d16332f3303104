"""Run in a fresh process by tests/paper/test_layers.py (XLA reads its flags once, at start-up), with or without
ddpm_jax's XLA CPU flags (the caller sets ``DDPM_JAX_KEEP_XLA_FLAGS``): the jitted L_simple of the tiny preset's
report U-Net and its gradient on fixed images; prints one JSON line."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ddpm_jax  # noqa: E402

ddpm_jax.cpu.configure()  # the flags, unless told not to
from ddpm_jax.configs import build_model, get_config, schedule_from_config  # noqa: E402
from ddpm_jax.training.setup import create_train_state  # noqa: E402
from ddpm_jax.diffusion.losses import l_simple  # noqa: E402


def main():
    config = get_config("tiny")
    config.train.batch_size = 8
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    # The gradient itself, not weights after Adam: Adam's first steps move each weight by about the learning
    # rate times the sign of its gradient, so rounding flips the sign of near-zero gradients into large changes.
    state = create_train_state(config)
    model, schedule = build_model(config.model), schedule_from_config(config)
    x0 = jax.device_put(images[: config.train.batch_size].astype(np.float32) / 127.5 - 1.0)

    def loss_fn(params):
        def eps_fn(x_t, t):
            return model.apply({"params": params, "batch_stats": state.batch_stats}, x_t, t, train=True,
                               mutable=["batch_stats"])
        return l_simple(schedule, eps_fn, x0, jax.random.PRNGKey(1))[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "loss": float(loss),
                      "grads": [np.asarray(g).ravel().tolist() for g in jax.tree.leaves(grads)]}))


if __name__ == "__main__":
    sys.exit(main())
