"""The native primitive (pre-norm MHNA + SwiGLU block) and the layer stacks.

Pre-buffer and post-LLM are two `nn.scan` stacks of the same block (parameters stacked on a leading
`layers` axis), each wrapped in `nn.remat` with the configured policy. The KV cache, when given, is a
scanned input/output: per stack a pair (k [layers, B, S, KVH, qk_dim], v [layers, B, S, KVH, d]).
"""
from __future__ import annotations

import flax.linen as nn
import jax

from neo_jax.model.attention import MHNA
from neo_jax.model.config import ModelConfig
from neo_jax.model.layers import MLP, RMSNorm

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """x' = x + MHNA(RMSNorm(x)); out = x' + FFN(RMSNorm(x'))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, kv_cache, positions, info, cache_index):
        c = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        h = RMSNorm(c, name="input_layernorm")(x)
        a, kv_cache = MHNA(c, name="self_attn")(h, positions, info, kv_cache, cache_index)
        x = x + a
        h = RMSNorm(c, name="post_attention_layernorm")(x)
        x = x + MLP(c, name="mlp")(h)
        return x.astype(c.compute_dtype), kv_cache


class Stack(nn.Module):
    """`num` Blocks under nn.scan (and nn.remat unless the policy is "none")."""

    cfg: ModelConfig
    num: int

    @nn.compact
    def __call__(self, x, kv_cache, positions, info, cache_index):
        block = Block
        if self.cfg.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT[self.cfg.remat_policy], prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            out_axes=0,
            length=self.num,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(self.cfg, name="layers")(x, kv_cache, positions, info, cache_index)
