"""Prefill + KV-cache decoding (greedy or sampled), one jit-compiled function.

Prompts are left-padded to a common length (segment 0 = padding, attends nowhere). Each generated token
gets T = (max T of its row so far) + 1 and H = W = 0 (NEO_PAPER.md §1.5). With a RoPE variant
(cfg.rope_kind != "native") the prompt also carries `rope_positions` and generated tokens continue the
variant's own text index (rope.next_rope_index / rope.text_rope_position). Decoding stops when every row
has produced `eos_id` or after `max_new_tokens`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neo_jax.model import rope
from neo_jax.model.config import ModelConfig
from neo_jax.model.neo import NEO, init_cache


def _pick(logits, rng, temperature, top_k):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id", "temperature", "top_k"))
def generate(cfg: ModelConfig, params, prompt, *, max_new_tokens: int, eos_id: int, temperature: float = 0.0,
             top_k: int = 0, rng=None):
    """prompt: dict(tokens, positions, segment_ids [B, Lp(,3)], patches, patch_positions, and rope_positions
    [B, Lp, 3] when cfg.rope_kind != "native").

    Returns (tokens int32 [B, max_new_tokens] with eos_id after a row's end, lengths int32 [B]).
    """
    model = NEO(cfg)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    b, lp = prompt["tokens"].shape
    cache = init_cache(cfg, b, lp + max_new_tokens)
    variant = cfg.rope_kind != "native"
    if variant and "rope_positions" not in prompt:
        raise ValueError(f"rope_kind={cfg.rope_kind!r}: the prompt needs 'rope_positions' (rope.rope_positions)")
    logits, cache = model.apply({"params": params}, prompt["tokens"], prompt["positions"], prompt["segment_ids"],
                                cache, prompt.get("patches"), prompt.get("patch_positions"),
                                prompt.get("rope_positions"), method=NEO.decode)
    valid = prompt["segment_ids"] > 0
    next_t = jnp.max(jnp.where(valid, prompt["positions"][..., 0], -1), axis=1) + 1
    # The variant's running text index advances with T, from its own start (equal to next_t for native).
    rope_offset = rope.next_rope_index(cfg.rope_kind, prompt["rope_positions"], valid) - next_t if variant else 0
    rng, sub = jax.random.split(rng)
    first = _pick(logits[:, -1], sub, temperature, top_k)
    out = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
    done = first == eos_id
    lengths = jnp.where(done, 1, max_new_tokens).astype(jnp.int32)

    def cond(state):
        i, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, cache, done, next_t, lengths, rng = state
        tok = out[:, i - 1]
        pos = jnp.stack([next_t, jnp.zeros_like(next_t), jnp.zeros_like(next_t)], -1)[:, None]
        rpos = rope.text_rope_position(cfg.rope_kind, next_t + rope_offset)[:, None] if variant else None
        logits, cache = model.apply({"params": params}, tok[:, None], pos, jnp.ones((b, 1), jnp.int32), cache,
                                    rope_positions=rpos, method=NEO.decode)
        rng, sub = jax.random.split(rng)
        nxt = jnp.where(done, eos_id, _pick(logits[:, 0], sub, temperature, top_k))
        out = out.at[:, i].set(nxt)
        newly = ~done & (nxt == eos_id)
        lengths = jnp.where(newly, i + 1, lengths)
        return i + 1, out, cache, done | newly, next_t + 1, lengths, rng

    state = (jnp.int32(1), out, cache, done, next_t, lengths, rng)
    _, out, *_, lengths, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths
