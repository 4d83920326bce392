"""Attention backends behind one interface (DESIGN.md principle 3).

`attention(q, k, v, info, scale=..., impl=...)`: q/k [B, L, heads, Dqk], v [B, L, kv_heads, Dv],
`info` a `neo_jax.model.mask.MaskInfo`. `impl="xla"` is the dense reference.
"""
from __future__ import annotations

from neo_jax.kernels import xla

IMPLS = ("auto", "xla")


def attention(q, k, v, info, *, scale: float, impl: str = "auto"):
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    return xla.attention(q, k, v, info, scale=scale)
