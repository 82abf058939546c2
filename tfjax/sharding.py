"""Device mesh, logical-axis rules, multi-host start-up and placement of per-host batches."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis (tfjax.model's names) -> mesh axes, by priority: a mesh axis already taken by an
# earlier rule in the same array is skipped, so activations [batch, length, embed] shard the
# batch over data and fsdp and leave embed whole, while parameters [vocab, embed] shard embed
# over fsdp (ZeRO-3 style) and vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve axis sizes (data, fsdp, tensor) where one may be -1, meaning "the rest"."""
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh sizes {sizes} must give one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes}: positive integers, at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
        raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh sizes {shape} need {math.prod(shape)} devices, have {num_devices}")
    return shape


def make_mesh(sizes: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    # Auto axes: shardings propagate as in GSPMD, which Linen's logical constraints expect.
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(shape), devices=devices)


def initialize_distributed() -> None:
    """Start JAX's multi-controller runtime when this is one process of several.

    Cloud TPU VMs and SLURM/Open MPI jobs are detected by `jax.distributed.initialize()` itself;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif any(
        k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
    ):
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d", jax.process_index(), jax.process_count())


def logical_shardings(
    boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """NamedShardings for a tree of (abstract) values boxed with logical axis names."""
    specs = nn.get_partition_spec(boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the data and fsdp axes, replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows [local_batch, ...] -> global arrays [global_batch, ...] on the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
