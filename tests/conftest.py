import os

# Tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many small programs and run each a few times, so XLA's
# compile time dominates; its lowest backend optimization level compiles them
# about twice as fast. Set before JAX is imported; results stay exact within a process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import gzip  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_idx(path, array):
    """A gzipped IDX file of ``array`` as uint8, as MNIST's are."""
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _tiny_config(**train):
    from ddpm_jax.configs import get_config

    config = get_config("tiny")
    for k, v in train.items():
        config.train[k] = v
    return config


@pytest.fixture(scope="session")
def tiny_config():
    """A factory: ``tiny_config(num_steps=4, ...)`` is the tiny preset with those ``train`` fields."""
    return _tiny_config


@pytest.fixture(scope="session")
def images():
    """40 random uint8 28x28 'training images' (test modules may override this fixture)."""
    return np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """40 random 28x28 'training images' and 12 'test images', with labels, in MNIST's IDX layout."""
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(d / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (40,)))
    write_idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (12,)))
    return d
