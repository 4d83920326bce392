"""NEO: one monolithic decoder over patch and word embeddings (NEO_PAPER.md §1).

    model = NEO(cfg)
    params = model.init(rng, batch)["params"]
    logits = model.apply({"params": params}, batch)              # [B, L, vocab] float32
    total, weight = loss_fn(logits, batch["targets"], batch["loss_weights"])

Decoding keeps an explicit KV-cache pytree (`init_cache`) and calls `model.apply(..., method=NEO.decode)`
on a prompt chunk (prefill) and then one token at a time (neo_jax/infer/generate.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import Stack
from neo_jax.model.layers import Dense, RMSNorm, normal_init
from neo_jax.model.mask import MaskInfo, make_mask_info
from neo_jax.model.vision import PatchEmbedding, scatter_image_embeddings

BATCH_FIELDS = {  # name: (trailing shape after [B, L] or [B, P], dtype kind)
    "tokens": ((), "i"), "targets": ((), "i"), "loss_weights": ((), "f"), "segment_ids": ((), "i"),
    "positions": ((3,), "i"), "patches": (("patch_dim",), "f"), "patch_positions": ((2,), "i"),
    "rope_positions": ((3,), "i"),  # optional: a RoPE variant's rotary indexes (rope.rope_positions)
}


def check_batch(batch, cfg: ModelConfig, require=("tokens", "segment_ids", "positions")):
    """Raise ValueError naming the field when a batch breaks the contract (DESIGN.md, "The batch").

    Shapes are always checked (they are static under jit); values (image tokens vs patches) only when
    the arrays are concrete, e.g. on the host before the step.
    """
    for name in require:
        if name not in batch:
            raise ValueError(f"batch is missing {name!r}; a batch holds {sorted(BATCH_FIELDS)}")
    if cfg.rope_kind != "native" and "rope_positions" not in batch:
        raise ValueError(f"rope_kind={cfg.rope_kind!r} needs batch['rope_positions'] (int32 [B, L, 3], from "
                         f"neo_jax.model.rope.rope_positions per document); 'positions' stays Native for the mask")
    b, length = np.shape(batch["tokens"])[:2] if np.ndim(batch["tokens"]) == 2 else (None, None)
    if b is None:
        raise ValueError(f"batch['tokens'] must be [B, L], got shape {np.shape(batch['tokens'])}")
    p = np.shape(batch["patches"])[1] if "patches" in batch and np.ndim(batch["patches"]) >= 2 else None
    for name, (tail, kind) in BATCH_FIELDS.items():
        if name not in batch:
            continue
        arr = batch[name]
        tail = tuple(cfg.patch_dim if t == "patch_dim" else t for t in tail)
        lead = (b, p) if name.startswith("patch") else (b, length)
        if tuple(np.shape(arr)) != lead + tail:
            raise ValueError(f"batch[{name!r}] has shape {tuple(np.shape(arr))}, expected {lead + tail} "
                             f"(B={b}, L={length}, P={p})")
        dk = jnp.dtype(arr.dtype).kind
        if (kind == "i") != (dk in "iu"):
            raise ValueError(f"batch[{name!r}] has dtype {arr.dtype}, expected {'int' if kind == 'i' else 'float'}")
    if p is not None and p % cfg.merge_size ** 2:
        raise ValueError(f"batch['patches'] holds P={p} patches; P must be a multiple of {cfg.merge_size ** 2}")
    if "patches" in batch and not isinstance(batch["tokens"], jax.core.Tracer):
        n_ctx = np.asarray(np.asarray(batch["tokens"]) == cfg.img_context_id).sum(axis=1)
        windows = (p or 0) // cfg.merge_size ** 2
        if (n_ctx > windows).any():
            raise ValueError(f"batch['tokens'] has {int(n_ctx.max())} <IMG_CONTEXT> tokens in a row but "
                             f"batch['patches'] holds only {windows} merge windows (P={p}); raise the patch budget")


class NEO(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.vision = PatchEmbedding(c)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
            embedding_init=nn.with_logical_partitioning(normal_init, ("vocab", "embed")))
        self.prebuffer = Stack(c, c.num_prebuffer_layers) if c.num_prebuffer_layers else None
        self.llm = Stack(c, c.num_llm_layers)
        self.norm = RMSNorm(c)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), c)

    def embed(self, tokens, patches=None, patch_positions=None):
        x = self.embed_tokens(tokens)
        if patches is not None:
            image = self.vision(patches.astype(self.cfg.compute_dtype), patch_positions)
            x = scatter_image_embeddings(x, image, tokens, self.cfg.img_context_id)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    def logits(self, x):
        x = self.norm(x)
        if self.cfg.tie_word_embeddings:
            w = self.embed_tokens.embedding.astype(self.cfg.compute_dtype)
            return jnp.einsum("ble,ve->blv", x, w, preferred_element_type=jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def _head_weight(self):
        """The output projection as an [E, V] array in the compute dtype."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.embedding.T.astype(self.cfg.compute_dtype)
        return self.lm_head.variables["params"]["kernel"].astype(self.cfg.compute_dtype)

    def _stacks(self, x, caches, positions, info, cache_index):
        out = []
        for stack, cache in zip((self.prebuffer, self.llm), caches):
            if stack is None:
                out.append(None)
                continue
            x, cache = stack(x, cache, positions, info, cache_index)
            out.append(cache)
        return x, out

    def hidden(self, batch):
        """Final hidden states [B, L, E] (before the final norm) of packed rows."""
        check_batch(batch, self.cfg)
        x = self.embed(batch["tokens"], batch.get("patches"), batch.get("patch_positions"))
        info = make_mask_info(batch["segment_ids"], batch["positions"], self.cfg.mask_kind)
        x, _ = self._stacks(x, (None, None), batch.get("rope_positions", batch["positions"]), info, None)
        return x

    def __call__(self, batch):
        """Training / scoring forward over packed rows: float32 logits [B, L, vocab]."""
        return self.logits(self.hidden(batch))

    def loss(self, batch, chunk: int = 0):
        """(sum w*CE, sum w) without materialising [B, L, vocab] logits when `chunk` divides L.

        The cross-entropy runs over `chunk`-token slices under jax.checkpoint: the forward keeps one
        slice's logits and the backward recomputes them, so the loss head needs O(B * chunk * vocab)
        memory instead of O(B * L * vocab). Equal to `loss_fn(model(batch), targets, loss_weights)`.
        """
        x = self.norm(self.hidden(batch))
        return chunked_loss(x, self._head_weight(), batch["targets"], batch["loss_weights"], chunk)

    def decode(self, tokens, positions, segment_ids, cache, patches=None, patch_positions=None,
               rope_positions=None):
        """Run a chunk of C tokens (prefill: the prompt; decode: C = 1) against the KV cache.

        tokens/segment_ids [B, C] (segment 0 = left padding), positions [B, C, 3] (Native: the mask key);
        rope_positions [B, C, 3]: the rotary's indexes, required for a RoPE variant (rope_kind != "native").
        The chunk is written at cache["index"]. Returns (float32 logits [B, C, vocab], updated cache).
        """
        c = self.cfg
        if c.rope_kind != "native" and rope_positions is None:
            raise ValueError(f"rope_kind={c.rope_kind!r}: NEO.decode needs rope_positions [B, C, 3]")
        index = cache["index"]
        chunk = tokens.shape[1]
        if c.mask_kind == "causal":
            q_key = jnp.broadcast_to(index + jnp.arange(chunk, dtype=jnp.int32), tokens.shape)
        else:  # one document per row: T is the mask key
            q_key = positions[..., 0].astype(jnp.int32)
        kv_key = jax.lax.dynamic_update_slice_in_dim(cache["key"], q_key, index, axis=1)
        kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                     index, axis=1)
        info = MaskInfo(segment_ids.astype(jnp.int32), kv_seg, q_key, kv_key)
        x = self.embed(tokens, patches, patch_positions)
        rot = positions if rope_positions is None else rope_positions
        x, (pre, llm) = self._stacks(x, (cache["prebuffer"], cache["llm"]), rot, info, index)
        new = dict(cache, prebuffer=pre, llm=llm, key=kv_key, segment_ids=kv_seg, index=index + chunk)
        return self.logits(x), new


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None):
    """An empty KV cache: keys qk_dim (256) wide, values head_dim (128) wide, static max length."""
    dtype = dtype or cfg.compute_dtype

    def stack(n):
        if not n:
            return None
        k = jnp.zeros((n, batch_size, max_len, cfg.num_kv_heads, cfg.qk_dim), dtype)
        v = jnp.zeros((n, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim), dtype)
        return (k, v)

    return {
        "prebuffer": stack(cfg.num_prebuffer_layers),
        "llm": stack(cfg.num_llm_layers),
        "key": jnp.zeros((batch_size, max_len), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def loss_fn(logits, targets, loss_weights):
    """Weighted next-token cross-entropy: (sum_i w_i * CE_i, sum_i w_i), both float32 scalars.

    Returning the two sums (not their ratio) keeps gradient accumulation and multi-host reduction exact.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    w = loss_weights.astype(jnp.float32)
    return jnp.sum(ce * w), jnp.sum(w)


def chunked_loss(x, head, targets, loss_weights, chunk: int = 0):
    """`loss_fn` of logits = x @ head, `chunk` tokens at a time (0 or a non-divisor of L: all at once)."""
    b, length, _ = x.shape
    if not chunk or chunk >= length or length % chunk:
        logits = jnp.einsum("ble,ev->blv", x, head, preferred_element_type=jnp.float32)
        return loss_fn(logits, targets, loss_weights)
    n = length // chunk
    split = lambda a: a.reshape((b, n, chunk) + a.shape[2:]).swapaxes(0, 1)  # noqa: E731

    @jax.checkpoint
    def one(carry, xs):
        xc, tc, wc = xs
        logits = jnp.einsum("ble,ev->blv", xc, head, preferred_element_type=jnp.float32)
        s, w = loss_fn(logits, tc, wc)
        return (carry[0] + s, carry[1] + w), None

    zero = jnp.zeros((), jnp.float32)
    (s, w), _ = jax.lax.scan(one, (zero, zero), (split(x), split(targets), split(loss_weights)))
    return s, w
