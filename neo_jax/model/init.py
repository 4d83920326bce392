"""Parameter creation and the post-LLM initialisation rule (NEO_PAPER.md §1.7), as pure functions.

`init_params` gives the pre-buffer rule by construction: every projection N(0, 0.02), every norm 1
(the patch embedding keeps PyTorch's default Conv init). `post_llm_init` then places a Qwen3 LLM:
LLM layer i -> NEO layer i + L1 (i.e. the `llm` stack), q_proj_hw = quarters 1 and 3 of each head's q_proj
outputs duplicated for H and W, k_proj_hw = 0, H/W norms = 1; embeddings, final norm, lm_head from the LLM.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.model.config import ModelConfig
from neo_jax.model.neo import NEO

# Qwen3 weights in NEO layout (kernels [in, out], stacked on a leading layer axis).
LLM_LAYER_KEYS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "": ("input_layernorm", "post_attention_layernorm"),
}


def dummy_batch(cfg: ModelConfig, batch_size: int = 1, seq_len: int = 8, patch_budget: int = 4):
    """A zero batch with the contract's shapes and dtypes (for init and eval_shape)."""
    i32 = jnp.int32
    rope = {} if cfg.rope_kind == "native" else {"rope_positions": jnp.zeros((batch_size, seq_len, 3), i32)}
    return rope | {
        "tokens": jnp.zeros((batch_size, seq_len), i32),
        "targets": jnp.zeros((batch_size, seq_len), i32),
        "loss_weights": jnp.zeros((batch_size, seq_len), jnp.float32),
        "segment_ids": jnp.ones((batch_size, seq_len), i32),
        "positions": jnp.zeros((batch_size, seq_len, 3), i32),
        "patches": jnp.zeros((batch_size, patch_budget, cfg.patch_dim), jnp.float32),
        "patch_positions": jnp.zeros((batch_size, patch_budget, 2), i32),
    }


def init_boxed(cfg: ModelConfig, rng):
    """Parameters still wrapped in nn.LogicallyPartitioned (use with jax.eval_shape for shardings)."""
    return NEO(cfg).init(rng, dummy_batch(cfg))["params"]


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, rng):
    """Plain parameter tree (pre-buffer rule for every layer)."""
    return nn.unbox(init_boxed(cfg, rng))


def param_logical_axes(cfg: ModelConfig):
    """Tree of PartitionSpecs of logical axis names, matching `init_params`' structure."""
    return nn.get_partition_spec(jax.eval_shape(lambda: init_boxed(cfg, jax.random.PRNGKey(0))))


def q_hw_from_q(q_kernel, num_heads: int, head_dim: int):
    """q_proj_hw kernel from a q_proj kernel [..., E, heads*d]: per head, output dims [0:d/4] and
    [d/2:3d/4] (the RoPE pairs of the highest T frequencies), concatenated to d/2 and used for H and W."""
    xp = jnp if isinstance(q_kernel, jax.Array) else np
    q = q_kernel.reshape(q_kernel.shape[:-1] + (num_heads, head_dim))
    quarter = head_dim // 4
    half = xp.concatenate([q[..., :quarter], q[..., 2 * quarter: 3 * quarter]], axis=-1)
    return xp.concatenate([half, half], axis=-1).reshape(q_kernel.shape)


def post_llm_init(params, llm, cfg: ModelConfig):
    """Return `params` with the post-LLM stack, embeddings, final norm and lm_head taken from `llm`.

    llm = {"embed_tokens": [V, E], "norm": [E], "lm_head": [E, V] (untied only),
           "layers": {"self_attn": {q_proj, k_proj, v_proj, o_proj: [n, in, out], q_norm, k_norm: [n, d]},
                      "mlp": {gate_proj, up_proj, down_proj}, "input_layernorm", "post_attention_layernorm"}}
    with n == cfg.num_llm_layers. Shapes are checked; a mismatch names the key.
    """
    out = jax.tree_util.tree_map(lambda x: x, params)  # shallow structural copy
    layers = out["llm"]["layers"]
    src = llm["layers"]

    def put(dst, key, value, where):
        value = jnp.asarray(value)
        if dst[key].shape != value.shape:
            raise ValueError(f"{where}: LLM weight has shape {value.shape}, NEO expects {dst[key].shape}")
        dst[key] = value.astype(dst[key].dtype)

    for group, names in LLM_LAYER_KEYS.items():
        for name in names:
            s = src[group][name] if group else src[name]
            d = layers[group][name] if group else layers[name]
            put(d, "kernel" if "proj" in name else "scale", s, f"layers.{group + '.' if group else ''}{name}")
    attn = layers["self_attn"]
    if cfg.hw_branch:
        put(attn["q_proj_hw"], "kernel", q_hw_from_q(jnp.asarray(src["self_attn"]["q_proj"]),
                                                     cfg.num_heads, cfg.head_dim), "q_proj_hw")
        attn["k_proj_hw"]["kernel"] = jnp.zeros_like(attn["k_proj_hw"]["kernel"])
        for n in ("q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w"):
            attn[n]["scale"] = jnp.ones_like(attn[n]["scale"])
    put(out["embed_tokens"], "embedding", llm["embed_tokens"], "embed_tokens")
    put(out["norm"], "scale", llm["norm"], "norm")
    if not cfg.tie_word_embeddings:
        if "lm_head" not in llm:
            raise ValueError("the NEO config has untied embeddings but the LLM has no lm_head; set "
                             "model.tie_word_embeddings=True or provide lm_head")
        put(out["lm_head"], "kernel", llm["lm_head"], "lm_head")
    return out
