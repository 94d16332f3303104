"""The same seed gives bit-identical checkpoints and samples as the stored golden run (tests/golden/_tiny_outputs.py).

Exact equality holds on the platform that wrote the file (same jaxlib, same processor vector extensions: the native CPU
kernels are compiled with -march=native). Elsewhere XLA may fuse or vectorize differently, so the arrays are compared
to float32 rounding accumulated over four training steps instead, and the test says which comparison it made.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.golden._tiny_outputs import GOLDEN, PLATFORM, compute, platform_facts


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    arrays = compute(tmp_path_factory.mktemp("golden"))
    if os.environ.get("DDPM_JAX_WRITE_GOLDEN") == "1":
        np.savez_compressed(GOLDEN, **arrays)
        PLATFORM.write_text(json.dumps(platform_facts(), indent=1) + "\n")
    return arrays


def test_the_same_seed_gives_the_stored_checkpoints_and_samples(outputs):
    assert GOLDEN.exists(), f"{GOLDEN} is missing; write it with DDPM_JAX_WRITE_GOLDEN=1 python -m pytest tests/golden"
    golden = dict(np.load(GOLDEN))
    assert sorted(outputs) == sorted(golden), "the set of compared arrays changed"
    exact = json.loads(PLATFORM.read_text()) == platform_facts()
    differing = []
    for name in sorted(golden):
        assert outputs[name].shape == golden[name].shape and outputs[name].dtype == golden[name].dtype, name
        if exact:
            if not np.array_equal(outputs[name], golden[name]):
                diff = np.abs(outputs[name].astype(np.float64) - golden[name]).max()
                differing.append(f"{name} (max |diff| {diff:.3g})")
        elif not np.allclose(outputs[name], golden[name], rtol=1e-3, atol=1e-3):
            differing.append(name)
    kind = "bit-identical" if exact else "within 1e-3 (another platform than the golden file's)"
    assert not differing, f"not {kind} to the golden run: " + "; ".join(differing)


def test_the_golden_run_samples_are_images_not_constants(outputs):
    """The comparison means something: samples vary across pixels and lie in [-1, 1] (the chains' frames start
    at x_T, pure noise, so only their last frame is an image)."""
    for name, array in outputs.items():
        if "/sample/" in name:
            images = array[-1] if name.endswith("/frames") else array
            assert images.min() >= -1.0 and images.max() <= 1.0, name
            assert images.std() > 0.05, name
