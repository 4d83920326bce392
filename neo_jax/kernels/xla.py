"""Dense XLA attention: the reference every other backend is tested against.

Materialises [B, heads, Lq, Lk] scores. q/k: [B, L, heads, Dqk], v: [B, L, kv_heads, Dv] (GQA).
A query with no allowed key (padding) returns exactly zero, never NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from neo_jax.model.mask import MaskInfo, mask_from_info


def attention(q, k, v, info: MaskInfo, *, scale: float):
    b, lq, h, _ = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {kvh}")
    g = h // kvh
    qg = q.reshape(b, lq, kvh, g, q.shape[-1])
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = mask_from_info(info)[:, None, None]  # [B, 1, 1, Lq, Lk]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m)  # exp(-inf) = 0 at masked pairs
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, v.shape[-1]).astype(q.dtype)
