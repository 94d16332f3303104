import os

# Tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many small programs and run each a few times, so XLA's
# compile time dominates; its lowest backend optimization level compiles them
# about twice as fast. Set before JAX is imported; results stay exact within a process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# Many tests train the same tiny network, each building its jitted step anew: JAX's persistent compilation
# cache (one folder per test session, shared with the subprocesses it starts) compiles each program once.
# The cached executable is the one a fresh compile would make, so results are unchanged; about 15% less time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import ddpm_jax  # noqa: E402

# The CPU speed settings the command-line programs make (ddpm_jax/cpu/settings.py), so that in-process tests run as they do.
ddpm_jax.cpu.configure()

from ddpm_jax.cli import train as train_cli  # noqa: E402

import gzip  # noqa: E402
import hashlib  # noqa: E402
import socket  # noqa: E402

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


def _snapshot(directory):
    """Every file under ``directory`` with the digest of its bytes: what 'nothing lost or changed' compares."""
    from pathlib import Path

    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def snapshot():
    """``snapshot(directory)``: ``{relative path: sha256}`` of every file under it."""
    return _snapshot


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory, idx_dir):
    """A finished tiny run on ``idx_dir`` (4 steps, checkpoints at 2 and 4), shared: tests that change
    a run copy it first, and tests that must not change it compare :func:`snapshot` before and after."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert train_cli.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--steps", "4",
                       "--no-progress"]) == 0
    return workdir


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to resolve or connect fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
