"""Multi-process start-up: bad settings are refused before JAX is called; an absent coordinator ends in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from ddpm_jax.utils import parallel

ROOT = Path(__file__).resolve().parents[2]
DIST_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", parallel.TIMEOUT_ENV)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def jax_calls(monkeypatch):
    """Record calls to jax.distributed.initialize instead of making them (and never touch the network)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(parallel, "_wait_for_coordinator", lambda *a: calls.append(("wait", a)))
    monkeypatch.setattr(parallel, "_check_port_free", lambda *a: calls.append(("port", a)))
    return calls


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 5}, {},
         r"--process-id 5 with --num-processes 2: process ids run from 0 to 1"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": -1}, {},
         r"--process-id -1: process ids start at 0"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 0, "process_id": 0}, {},
         r"--num-processes 0: a run needs at least 1 process"),
        ({"coordinator_address": "127.0.0.1:1234", "process_id": 0}, {"JAX_NUM_PROCESSES": "abc"},
         r"--num-processes: JAX_NUM_PROCESSES='abc' is not a whole number"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2}, {"JAX_PROCESS_ID": "1.5"},
         r"--process-id: JAX_PROCESS_ID='1.5' is not a whole number"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
         r"--process-id \(from JAX_PROCESS_ID\) 2 with --num-processes \(from JAX_NUM_PROCESSES\) 2"),
        ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, {},
         r"--coordinator-address 'localhost': expected host:port"),
        ({"coordinator_address": "localhost:0", "num_processes": 2, "process_id": 0}, {},
         r"port in 1..65535"),
        ({"coordinator_address": "localhost:70000", "num_processes": 2, "process_id": 0}, {},
         r"'localhost:70000'"),
        ({"coordinator_address": ":1234", "num_processes": 2, "process_id": 0}, {}, r"expected host:port"),
        ({"coordinator_address": "host:http", "num_processes": 2, "process_id": 0}, {}, r"expected host:port"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
         r"JAX_COORDINATOR_ADDRESS '10.0.0.1'"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1, "timeout_s": 0}, {},
         r"timeout_s=0: .* > 0"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1},
         {parallel.TIMEOUT_ENV: "soon"}, r"DDPM_JAX_DISTRIBUTED_TIMEOUT='soon'"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1},
         {parallel.TIMEOUT_ENV: "nan"}, r"DDPM_JAX_DISTRIBUTED_TIMEOUT='nan'"),
    ],
)
def test_bad_settings_are_value_errors_naming_the_flag_and_value_before_jax_is_called(
        kwargs, env, message, jax_calls, monkeypatch):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        parallel.initialize_distributed(**kwargs)
    assert jax_calls == []


def test_settings_from_the_environment_reach_jax_with_a_bounded_timeout(jax_calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert parallel.initialize_distributed() is True
    assert jax_calls == [("wait", ("10.0.0.1", 1234, "10.0.0.1:1234", 60.0)),
                         (("10.0.0.1:1234", 2, 1), {"initialization_timeout": 60})]


def test_the_timeout_comes_from_the_keyword_or_the_environment(jax_calls, monkeypatch):
    parallel.initialize_distributed("[::1]:1234", 2, 0, timeout_s=2.5)
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "7")
    parallel.initialize_distributed("[::1]:1234", 2, 0)
    assert jax_calls == [("port", (1234, "[::1]:1234", "--coordinator-address")),
                         (("[::1]:1234", 2, 0), {"initialization_timeout": 3}),
                         ("port", (1234, "[::1]:1234", "--coordinator-address")),
                         (("[::1]:1234", 2, 0), {"initialization_timeout": 7})]


def test_auto_leaves_the_address_to_jax_cluster_detection(jax_calls):
    assert parallel.initialize_distributed("auto") is True
    assert jax_calls == [((None, None, None), {"initialization_timeout": 60})]


def test_jax_own_value_errors_say_which_flags_to_give(monkeypatch):
    def initialize(address, num_processes, process_id, **kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    with pytest.raises(ValueError, match="coordinator_address should be defined. Give --coordinator-address"):
        parallel.initialize_distributed(None, 2, 1)


def test_a_coordinator_port_in_use_is_refused_for_process_0():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("0.0.0.0", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(parallel.DistributedStartupError, match=f"port {port} cannot be opened"):
            parallel._check_port_free(port, f"127.0.0.1:{port}", "--coordinator-address")


def test_waiting_for_the_coordinator_returns_once_it_listens_and_gives_up_after_the_timeout():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        parallel._wait_for_coordinator("127.0.0.1", port, f"127.0.0.1:{port}", 5.0)
    start = time.monotonic()
    with pytest.raises(parallel.DistributedStartupError, match=r"could not reach the coordinator at 127.0.0.1:1 "
                                                               r"within 1 s"):
        parallel._wait_for_coordinator("127.0.0.1", 1, "127.0.0.1:1", 1.0)
    assert 0.9 < time.monotonic() - start < 5


def _run_mnist(tmp_path, *flags, timeout_s="3"):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "XLA_FLAGS"}
    env.update({"JAX_PLATFORMS": "cpu", parallel.TIMEOUT_ENV: timeout_s})
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "experiments.mnist", "--preset", "tiny", "--workdir", str(tmp_path / "run"), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    return out, time.monotonic() - start


def test_an_unreachable_coordinator_ends_in_one_error_line_and_status_2(tmp_path):
    out, seconds = _run_mnist(tmp_path, "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                              "--process-id", "1")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not reach the coordinator at 127.0.0.1:1 within 3 s" in errors[0]
    assert seconds < 20
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "5"],
         "--process-id 5 with --num-processes 2"),
        (["--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "1"],
         "--coordinator-address '127.0.0.1': expected host:port"),
    ],
)
def test_bad_distributed_flags_end_in_one_error_line_and_status_2(tmp_path, flags, message, capsys):
    from ddpm_jax.cli import train as mnist

    assert mnist.main(["--preset", "tiny", "--workdir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
