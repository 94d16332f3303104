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

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process run if one is configured; returns whether it did.

    Arguments left None are taken from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with none of them set and
    none given this is a single-process run and nothing happens (SLURM, Open
    MPI and Cloud TPU set-ups that JAX detects by itself: pass
    ``coordinator_address='auto'``). Must run before anything touches a device.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


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
