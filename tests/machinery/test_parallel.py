"""Data parallelism over a device mesh: the sharded step computes what one device does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ddpm_jax.utils import parallel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def four_device_run():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    check = ROOT / "tests" / "machinery" / "_data_parallel_check.py"
    out = subprocess.run([sys.executable, str(check)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_train_step_equals_the_single_device_step(four_device_run):
    r = four_device_run
    assert r["devices"] == 4
    assert r["all_reduce_in_step"]  # the batch really was split: gradients are summed across devices
    assert r["loss_four"] == pytest.approx(r["loss_one"], rel=1e-5)  # float32 sums in another order
    assert r["params_max_diff"] < 1e-5 and r["compared_leaves"] > 30
    assert r["all_finite"]


def test_sampling_shards_the_batch_and_draws_the_same_images(four_device_run):
    assert four_device_run["sample_shards"] == [[2, 28, 28, 1]] * 4
    assert four_device_run["sample_max_diff"] < 1e-5


def test_one_device_is_a_mesh_of_one():
    mesh = parallel.make_mesh()
    assert parallel.num_shards(mesh) == jax.device_count() == 1
    parallel.check_divisible(7, mesh)


def test_check_divisible_names_the_field_and_the_fix():
    class FakeMesh:
        shape = {"data": 4}

    with pytest.raises(ValueError, match=r"train.batch_size=10 .* multiple of 4"):
        parallel.check_divisible(10, FakeMesh())


def test_single_process_run_does_not_initialize_distributed(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
