"""The device mesh (axes `data`, `fsdp`, `tensor`) and multi-host start-up.

    cfg.mesh = mesh_config()                 # data=-1 (the rest), fsdp=1, tensor=1, strategy="fsdp"
    initialize_distributed()                 # before any other JAX call on a multi-host job
    mesh = make_mesh(cfg.mesh)               # jax.sharding.Mesh, Auto axis types

`strategy` picks the logical-axis rules (neo_jax/parallel/rules.py): "dp" replicates parameters, "fsdp"
shards them over `fsdp` (ZeRO-3 style), "fsdp_tp" also splits heads / MLP / vocab over `tensor`.
The batch is always split over ("data", "fsdp").
"""
from __future__ import annotations

import logging
import math
import os

import jax
import ml_collections
import numpy as np

AXES = ("data", "fsdp", "tensor")
STRATEGIES = ("dp", "fsdp", "fsdp_tp")
log = logging.getLogger(__name__)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, strategy: str = "fsdp"):
    """Mesh section of a config: axis sizes (-1 = all remaining devices, at most one) and the strategy."""
    c = ml_collections.ConfigDict()
    c.data, c.fsdp, c.tensor = data, fsdp, tensor
    c.strategy = strategy
    return c


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check that the sizes multiply to the device count; errors name the fix."""
    sizes = [int(mesh_cfg[a]) for a in AXES]
    if getattr(mesh_cfg, "strategy", "fsdp") not in STRATEGIES:
        raise ValueError(f"mesh.strategy={mesh_cfg.strategy!r}; choose one of {STRATEGIES}")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {num_devices} devices do not divide by "
                             f"{known}; change the fixed axis sizes")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but "
                         f"{num_devices} are available; set one axis to -1 or fix the sizes")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A Mesh over `devices` (default: all) with axes ("data", "fsdp", "tensor"), Auto axis types.

    With the default devices `jax.make_mesh` orders them for the physical topology (ICI rings on TPU);
    `tensor` is the innermost (fastest) axis, `data` the outermost (it may span slices / hosts).
    """
    shape = mesh_shape(mesh_cfg, len(devices) if devices is not None else jax.device_count())
    types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if devices is None:
        return jax.make_mesh(shape, AXES, axis_types=types)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=types)


def _env_int(*names):
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return None


def _slurm_coordinator():
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        return None
    first = nodes.split(",")[0]
    if "[" in first:  # e.g. node[003-010,012] -> node003
        prefix, rest = nodes.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return f"{first}:{os.environ.get('NEO_COORDINATOR_PORT', '12345')}"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start multi-host JAX (`jax.distributed.initialize`); returns True when it was called.

    Sources, first found wins: the arguments; NEO_COORDINATOR / NEO_NUM_PROCESSES / NEO_PROCESS_ID;
    SLURM (first node of the step's node list, SLURM_NTASKS, SLURM_PROCID). On Cloud TPU (TPU_* env set by
    the VM) JAX discovers everything itself. A single process (count 1, or nothing set) is a no-op.
    """
    coordinator = coordinator or os.environ.get("NEO_COORDINATOR")
    num_processes = num_processes or _env_int("NEO_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("NEO_PROCESS_ID")
    if coordinator is None and num_processes is None and "SLURM_NTASKS" in os.environ:
        num_processes, process_id = _env_int("SLURM_NTASKS"), _env_int("SLURM_PROCID")
        coordinator = _slurm_coordinator() if (num_processes or 1) > 1 else None
    if coordinator is None and num_processes is None and os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
        jax.distributed.initialize()  # Cloud TPU pod slice: auto-detected
        return True
    if num_processes is None or num_processes <= 1:
        return False
    if coordinator is None or process_id is None:
        raise ValueError(f"multi-process run ({num_processes} processes) needs a coordinator address and a "
                         f"process id: pass them or set NEO_COORDINATOR=host:port and NEO_PROCESS_ID")
    log.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", coordinator,
             num_processes, process_id)
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True
