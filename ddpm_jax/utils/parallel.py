"""Data parallelism with JAX's own machinery: one ``Mesh`` over every device, a ``data`` axis.

The train state (parameters, BatchNorm statistics, optimizer state) is
replicated; each global batch is sharded along ``data``; XLA's SPMD
partitioner inserts the all-reduces (gradients, BatchNorm's batch statistics,
the loss), so a sharded step computes what one device would, and the metrics
are means over the global batch. On one device the mesh has one entry and the
same code runs. Several hosts: call :func:`initialize_distributed` first,
and every process runs the same program over the global mesh.
"""

from __future__ import annotations

import math
import os
import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "DDPM_JAX_DISTRIBUTED_TIMEOUT"


class DistributedStartupError(RuntimeError):
    """A multi-process run could not start: the coordinator did not answer in time, or its port is taken."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float | None = None,
) -> bool:
    """Join a multi-process run if one is configured; returns whether it did.

    Arguments left None are taken from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with none of them set and
    none given this is a single-process run and nothing happens (SLURM, Open
    MPI and Cloud TPU set-ups that JAX detects by itself: pass
    ``coordinator_address='auto'``). Must run before anything touches a device.

    ``timeout_s`` (default ``$DDPM_JAX_DISTRIBUTED_TIMEOUT``, else 60): how long
    a process other than 0 waits for the coordinator to accept connections,
    and then how long JAX waits for every process to register. Without this
    bound JAX waits 5 minutes and then aborts the process (SIGABRT, no Python
    exception), so the reachability check runs here, from Python, first.

    Raises:
      ValueError: a setting that cannot work, before JAX is called: a count
        below 1, a process id outside ``0..num_processes - 1``, a non-integer
        ``JAX_*`` value, an address that is not ``host:port`` with a port in
        1..65535, or a timeout that is not a number > 0. The message names the
        flag (or variable) and the value.
      DistributedStartupError: the coordinator could not be reached within the
        timeout (processes 1..N-1), or its port is already in use on this
        machine (process 0).
    """
    env = os.environ
    address_source = "--coordinator-address"
    if not coordinator_address and env.get("JAX_COORDINATOR_ADDRESS"):
        coordinator_address, address_source = env["JAX_COORDINATOR_ADDRESS"].strip(), "JAX_COORDINATOR_ADDRESS"
    num_processes, num_source = _integer_setting(num_processes, "--num-processes", "JAX_NUM_PROCESSES")
    process_id, id_source = _integer_setting(process_id, "--process-id", "JAX_PROCESS_ID")
    if not coordinator_address and num_processes is None and process_id is None:
        return False
    timeout_s = _timeout_setting(timeout_s)

    if num_processes is not None and num_processes < 1:
        raise ValueError(f"{num_source} {num_processes}: a run needs at least 1 process; give the number of "
                         "processes that take part, e.g. --num-processes 2.")
    if process_id is not None and process_id < 0:
        raise ValueError(f"{id_source} {process_id}: process ids start at 0; give this process's index, e.g. "
                         "--process-id 0 on the coordinator.")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"{id_source} {process_id} with {num_source} {num_processes}: process ids run from 0 to "
                         f"{num_processes - 1}; give each process its own id in that range.")
    if coordinator_address and coordinator_address != "auto":
        host, port = _parse_address(coordinator_address, address_source)
        if process_id == 0:
            _check_port_free(port, coordinator_address, address_source)
        elif process_id is not None:
            _wait_for_coordinator(host, port, coordinator_address, timeout_s)

    # JAX takes whole seconds; never round a short timeout down to none.
    jax_timeout = max(1, math.ceil(timeout_s))
    address = None if coordinator_address == "auto" else coordinator_address or None
    try:
        jax.distributed.initialize(address, num_processes, process_id, initialization_timeout=jax_timeout)
    except ValueError as e:
        # JAX's own words ("coordinator_address should be defined.") do not say which flag supplies the value.
        raise ValueError(
            f"{e} Give --coordinator-address host:port, --num-processes and --process-id (or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID), or --coordinator-address auto on SLURM, Open MPI or Cloud TPU."
        ) from e
    return True


def _integer_setting(value, flag: str, variable: str) -> tuple[int | None, str]:
    """``(value, where it came from)``: the argument if given, else the environment variable, as an int."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{flag} {value!r}: expected a whole number, e.g. {flag} 2.")
        return int(value), flag
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None, flag
    try:
        return int(raw), f"{flag} (from {variable})"
    except ValueError:
        raise ValueError(f"{flag}: {variable}={raw!r} is not a whole number; set it to e.g. {variable}=2, "
                         f"unset it, or pass {flag}.") from None


def _timeout_setting(timeout_s) -> float:
    source = "timeout_s"
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        source = f"{TIMEOUT_ENV}={raw!r}"
        try:
            timeout_s = float(raw)
        except ValueError:
            timeout_s = math.nan
    else:
        source = f"timeout_s={timeout_s!r}"
        try:
            timeout_s = float(timeout_s)
        except (TypeError, ValueError):
            timeout_s = math.nan
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"{source}: the distributed start-up timeout must be a number of seconds > 0, e.g. "
                         f"{TIMEOUT_ENV}=60.")
    return timeout_s


def _parse_address(address: str, source: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` or ``[v6]:port``; ValueError naming ``source`` otherwise."""
    host, sep, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text) if port_text.isdigit() else None
    if not sep or not host or port is None or not 1 <= port <= 65535:
        raise ValueError(f"{source} {address!r}: expected host:port with a port in 1..65535 (e.g. "
                         "10.0.0.1:1234, [::1]:1234), or 'auto' on SLURM, Open MPI or Cloud TPU.")
    return host, port


def _check_port_free(port: int, address: str, source: str) -> None:
    """Process 0 serves the coordinator on ``[::]:port``; JAX crashes (SIGSEGV) if that port is taken."""
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this machine: gRPC falls back to IPv4 too
        probe, bind_to = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port)
    else:
        bind_to = ("::", port)
        try:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack, as gRPC binds
        except OSError:
            pass
    with probe:
        # As gRPC: a port left in TIME_WAIT by an earlier run is free, one that something listens on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(bind_to)
        except OSError as e:
            raise DistributedStartupError(
                f"{source} {address}: process 0 runs the coordinator there, but port {port} cannot be opened on "
                f"this machine ({e.strerror or e}); stop what holds it or choose another port for every process."
            ) from None


def _wait_for_coordinator(host: str, port: int, address: str, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; retry until ``timeout_s`` has passed, then raise.

    Process 0 may start after the others, so a refused connection is retried.
    """
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 5.0)):
                return
        except OSError as e:
            last_error = e
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
    reason = (last_error.strerror or str(last_error)) if last_error is not None else "no attempt finished"
    raise DistributedStartupError(
        f"could not reach the coordinator at {address} within {timeout_s:g} s ({reason}); start process 0 there "
        f"first, check --coordinator-address and the firewall, or allow longer with {TIMEOUT_ENV}=SECONDS."
    )


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def num_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def check_divisible(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    if batch_size % num_shards(mesh):
        raise ValueError(
            f"{what}={batch_size} cannot be split evenly over the {num_shards(mesh)} devices of the data mesh; "
            f"use a multiple of {num_shards(mesh)}."
        )


def put_replicated(tree, mesh: Mesh):
    """Place host or device arrays on every device of ``mesh`` (works across processes: each builds its copy)."""
    sharding = replicated(mesh)

    def put(leaf):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)
