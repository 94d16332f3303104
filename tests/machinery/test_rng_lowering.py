"""ddpm_jax.cpu.unroll_threefry_on_cpu: the same random bits as JAX's looped lowering, without the loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.cpu import settings as xla_cpu

# Random draws of the kinds training and sampling make (normal noise, timesteps, a permutation, raw bits,
# split keys), at sizes with and without a remainder; printed as lists so two processes can compare them.
DRAWS = """
import json, sys
import jax, jax.numpy as jnp
import importlib, pkgutil
import ddpm_jax
for module in pkgutil.walk_packages(ddpm_jax.__path__, "ddpm_jax."):  # every module imported, none may patch JAX
    importlib.import_module(module.name)
if "--configure" in sys.argv:  # registers the lowering unless told not to
    ddpm_jax.cpu.configure()
key = jax.random.PRNGKey(7)
draws = jax.jit(lambda k: [jax.random.normal(k, (3, 5, 7, 1)), jax.random.uniform(jax.random.fold_in(k, 1), (1001,)),
                           jax.random.randint(k, (64,), 0, 100), jax.random.permutation(k, 50),
                           jax.random.bits(k, (17,), jnp.uint32), jax.random.split(k, 3)])(key)
hlo = jax.jit(lambda k: jax.random.normal(k, (64, 28, 28, 1))).lower(key).compile().as_text()
print(json.dumps({"draws": [jax.device_get(d).astype("float64").ravel().tolist() for d in draws],
                  "while_loop": " while(" in hlo}))
"""


def _draws(configure: bool = True, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", DRAWS, *(["--configure"] if configure else [])], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the lowering is the CPU backend's")
def test_unrolled_threefry_draws_the_same_bits_as_jaxs_loop_without_the_loop():
    unrolled, looped, imported_only = _draws(), _draws(DDPM_JAX_KEEP_RNG_LOWERING="1"), _draws(configure=False)
    assert not unrolled["while_loop"] and looped["while_loop"]
    assert imported_only["while_loop"]  # importing ddpm_jax alone leaves JAX's lowering as it was
    for ours, jaxs in zip(unrolled["draws"], looped["draws"], strict=True):
        np.testing.assert_array_equal(ours, jaxs)


def test_the_opt_out_and_a_jax_without_the_internals_leave_jaxs_lowering(monkeypatch):
    assert not xla_cpu.unroll_threefry_on_cpu({"DDPM_JAX_KEEP_RNG_LOWERING": "1"})
    monkeypatch.setattr(xla_cpu, "_threefry", None)
    assert not xla_cpu.unroll_threefry_on_cpu({})
    # Registering again is harmless: the test session's configure() already did.
    monkeypatch.undo()
    assert xla_cpu.unroll_threefry_on_cpu({})
    assert jnp.isfinite(jax.jit(lambda k: jax.random.normal(k, (4,)))(jax.random.PRNGKey(0))).all()
