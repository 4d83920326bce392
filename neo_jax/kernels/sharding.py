"""Run an attention kernel per device under `shard_map`: batch over (data, fsdp), heads over tensor.

Attention is independent per (row, kv-head group), so every device can run the single-device kernel on
its own rows and heads with no communication. Without this, XLA's SPMD partitioner has to shard the
kernels' tile loops itself: blockwise's `dynamic_slice` inside `while` / `lax.map` and the Pallas calls
of splash / gpu are opaque to it, so it all-gathers q/k/v and every device computes every row of the
global batch (per-device memory and work then grow with the mesh; see launch/README.md).

The mesh is the `mesh` argument, else the context mesh set by `jax.set_mesh` (as the train step does,
neo_jax/train/step.py `sharding_context`). The deprecated `with mesh:` context is not visible to
`jax.sharding.get_abstract_mesh` and is not used. With no mesh, a one-device mesh, or inside an
enclosing `shard_map` (manual axes), the kernel is called directly.
An axis that does not divide its dimension is left out (that dimension replicated) with a log line:
heads stay whole when the kv heads do not divide over `tensor`; the batch drops data/fsdp that do not
divide its rows (e.g. batch-1 decode).
"""
from __future__ import annotations

import logging
import math

import jax
from jax.sharding import AxisType, PartitionSpec as P

from neo_jax.model.mask import MaskInfo

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
log = logging.getLogger(__name__)
_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def context_mesh(mesh=None):
    """`mesh`, else the `jax.set_mesh` context mesh; None when there is none or it has one device."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if not mesh.axis_names or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def partition(mesh, batch: int, kv_heads: int, name: str):
    """(batch mesh axes or None, head mesh axis or None) that divide this call's rows and kv heads."""
    names = set(mesh.axis_names)
    batch_axes, size = [], 1
    for a in BATCH_AXES:
        if a not in names or mesh.shape[a] == 1:
            continue
        if batch % (size * mesh.shape[a]):
            _log_once(f"attention[{name}]: batch {batch} does not divide over {a}={mesh.shape[a]} "
                      f"(after {size}); rows replicated over {a!r}")
            continue
        batch_axes.append(a)
        size *= mesh.shape[a]
    heads = None
    if HEAD_AXIS in names and mesh.shape[HEAD_AXIS] > 1:
        if kv_heads % mesh.shape[HEAD_AXIS]:
            _log_once(f"attention[{name}]: kv heads {kv_heads} do not divide over {HEAD_AXIS}="
                      f"{mesh.shape[HEAD_AXIS]}; heads replicated over {HEAD_AXIS!r} (each device "
                      f"computes all heads of its rows)")
        else:
            heads = HEAD_AXIS
    return tuple(batch_axes) or None, heads


def shard_attention(body, q, k, v, info: MaskInfo, *, mesh=None, name: str = "attention"):
    """`body(q, k, v, info)` (a single-device kernel on [B, L, heads, D] arrays) run per device.

    q [B, Lq, H, Dqk], k [B, Lk, KVH, Dqk], v [B, Lk, KVH, Dv], info rows [B, Lq|Lk]; returns body's
    [B, Lq, H, Dv], sharded like q. Differentiable whenever `body` is (custom_vjp kernels included).
    """
    mesh = context_mesh(mesh)
    if mesh is None:
        return body(q, k, v, info)
    if any(t == AxisType.Manual for t in mesh.axis_types):
        _log_once(f"attention[{name}]: inside shard_map (manual mesh axes); kernel called per shard")
        return body(q, k, v, info)
    batch, heads = partition(mesh, q.shape[0], k.shape[2], name)
    if batch is None and heads is None:
        return body(q, k, v, info)
    x, row = P(batch, None, heads, None), P(batch, None)
    info_spec = MaskInfo(row, row, row, row)
    if any(t == AxisType.Explicit for t in mesh.axis_types):  # sharding is in the type: move it
        q, k, v = (jax.sharding.reshard(a, x) for a in (q, k, v))
        info = jax.tree.map(lambda a: jax.sharding.reshard(a, row), info)
    # check_vma=False: Pallas calls and custom_vjp kernels carry no varying-manual-axes annotations.
    return jax.shard_map(body, mesh=mesh, in_specs=(x, x, x, info_spec), out_specs=x,
                         check_vma=False)(q, k, v, info)
