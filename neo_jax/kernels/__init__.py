"""Attention backends behind one interface (DESIGN.md principle 3).

`attention(q, k, v, info, scale=..., impl=...)`: q/k [B, Lq|Lk, heads, Dqk], v [B, Lk, kv_heads, Dv],
`info` a `neo_jax.model.mask.MaskInfo`. `impl="xla"` is the dense reference; "blockwise" (pure-JAX
flash), "splash" (TPU Pallas), "gpu" (Pallas Triton over per-query key ranges) are memory-efficient.

`impl="auto"` walks the platform's ordered list and takes the first backend that supports the call;
a named impl is tried first and falls back down the same list when it cannot take the call (e.g.
splash with Lq != Lk at decode). Every skip is logged once (python logging) with its reason.
On CPU, "auto" picks blockwise once the key length reaches `CPU_BLOCKWISE_MIN_LEN` (below it the dense
einsum is as fast and compiles faster; see benchmarks/attention.py).
Under a mesh (`jax.set_mesh`, as the train step runs) blockwise, splash and gpu run per device in
`shard_map`, rows over (data, fsdp) and kv heads over tensor (neo_jax/kernels/sharding.py); the xla
reference is left to the SPMD partitioner (plain einsums, which it shards).
"""
from __future__ import annotations

import logging

import jax

from neo_jax.kernels import blockwise, gpu, splash, xla

IMPLS = ("auto", "xla", "blockwise", "splash", "gpu")
ORDER = {"tpu": ("splash", "blockwise", "xla"), "gpu": ("gpu", "blockwise", "xla"),
         "cpu": ("blockwise", "xla")}
CPU_BLOCKWISE_MIN_LEN = 1024
_BACKENDS = {"xla": xla.attention, "blockwise": blockwise.attention, "splash": splash.attention,
             "gpu": gpu.attention}
_logged: set = set()
log = logging.getLogger(__name__)


def _unsupported(name, q, k, platform, auto):
    """Why backend `name` cannot take this call (None if it can)."""
    lq, lk = q.shape[1], k.shape[1]
    if name == "splash":
        if auto and platform != "tpu":
            return f"platform is {platform}, not tpu"
        if lq != lk:
            return f"Lq={lq} != Lk={lk} (decode / chunked prefill)"
        if lq % 128:
            return f"L={lq} is not a multiple of 128"
    if name == "gpu" and auto and platform != "gpu":
        return f"platform is {platform}, not gpu"
    if name == "blockwise" and auto and platform == "cpu" and lk < CPU_BLOCKWISE_MIN_LEN:
        return f"Lk={lk} < {CPU_BLOCKWISE_MIN_LEN}: the dense einsum is as fast on CPU"
    return None


def _log_once(msg):
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def choose(q, k, impl: str = "auto", platform: str | None = None) -> str:
    """The backend `attention` will run for these shapes (static: shapes and platform only)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    platform = platform or jax.default_backend()
    order = ORDER.get(platform, ("blockwise", "xla"))
    auto = impl == "auto"
    if not auto:
        order = (impl,) + tuple(n for n in order if n not in (impl, "splash", "gpu"))
    for name in order:
        reason = _unsupported(name, q, k, platform, auto)
        if reason is None:
            return name
        _log_once(f"attention: skipping {name}: {reason}")
    return "xla"


def attention(q, k, v, info, *, scale: float, impl: str = "auto"):
    return _BACKENDS[choose(q, k, impl)](q, k, v, info, scale=scale)
