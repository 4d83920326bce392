"""Multi-Head Native Attention (MHNA, NEO_PAPER.md §1.4).

Per head: q = [RMSNorm_q(q_proj x) rotated by T | RMSNorm_h(q_hw[:d/2]) by H | RMSNorm_w(q_hw[d/2:]) by W]
(d = head_dim = 128 for NEO: T 128 channels at theta 1e6, H and W 64 each at theta 1e4); the same for k with
k_proj / k_proj_hw; v = v_proj x stays d wide; logits scaled by 1/sqrt(d); GQA.
With `hw_branch=False` the layer is plain Qwen3 attention (the LLM reference).
"""
from __future__ import annotations

import flax.linen as nn
import jax

from neo_jax import kernels
from neo_jax.model import rope
from neo_jax.model.config import ModelConfig
from neo_jax.model.layers import Dense, RMSNorm
from neo_jax.model.mask import MaskInfo


class MHNA(nn.Module):
    cfg: ModelConfig

    def _qk(self, x, positions, n_heads, proj, axis):
        """The 2d-wide rotated query or key of every head: [B, L, n, qk_dim]."""
        c = self.cfg
        b, length, _ = x.shape
        d = c.head_dim
        t = Dense(n_heads * d, ("embed", axis), c, name=f"{proj}_proj")(x).reshape(b, length, n_heads, d)
        t = RMSNorm(c, "head_dim", name=f"{proj}_norm")(t)
        if not c.hw_branch:
            return rope.apply_rope(t, positions[..., 0], c.rope_theta)
        hw = Dense(n_heads * d, ("embed", axis), c, name=f"{proj}_proj_hw")(x).reshape(b, length, n_heads, d)
        h = RMSNorm(c, "head_dim", name=f"{proj}_norm_h")(hw[..., : d // 2])
        w = RMSNorm(c, "head_dim", name=f"{proj}_norm_w")(hw[..., d // 2:])
        return rope.apply_variant_rope(c.rope_kind, t, h, w, positions, theta_t=c.rope_theta,
                                       theta_hw=c.rope_theta_hw)

    @nn.compact
    def __call__(self, x, positions, info: MaskInfo, kv_cache=None, cache_index=None):
        """x [B, L, E]; positions int [B, L, 3] for the rotary (a RoPE variant's `rope_positions`); info
        describes the mask between these queries and the keys.

        kv_cache: None (training) or (k [B, S, KVH, qk_dim], v [B, S, KVH, d]): this call's keys/values
        are written at [cache_index, cache_index + L) and the queries attend over all S cache slots.
        Returns (out [B, L, E], updated kv_cache or None).
        """
        c = self.cfg
        b, length, _ = x.shape
        q = self._qk(x, positions, c.num_heads, "q", "heads")
        k = self._qk(x, positions, c.num_kv_heads, "k", "kv_heads")
        v = Dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), c, name="v_proj")(x)
        v = v.reshape(b, length, c.num_kv_heads, c.head_dim)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "act_kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", "head_dim"))
        if kv_cache is not None:
            ck, cv = kv_cache
            ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            kv_cache = (ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        out = kernels.attention(q, k, v, info, scale=c.head_dim ** -0.5, impl=c.attention_impl)
        out = out.reshape(b, length, c.num_heads * c.head_dim)
        return Dense(c.hidden_size, ("heads", "embed"), c, name="o_proj")(out), kv_cache
