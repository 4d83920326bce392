"""TPU splash attention for the mixed mask, with no O(L^2) mask per example.

The mixed mask is `same segment AND c[k] <= c[q]` with a key `c` that is non-decreasing inside a
segment. For such a key there is a per-query *horizon* h(q) = the last kv index of q's segment with
c[k] <= c[q], and inside q's segment `c[k] <= c[q]  <=>  k <= h(q)`. Upstream splash evaluates a
computable mask as `mask_function(q_sequence[q], k)` where `q_sequence` is an array in its `MaskInfo`;
handing it h(q) instead of the query index turns its causal mask `k <= q_sequence` into the mixed mask,
and its segment ids add the document boundary. So the kernel needs only O(L) per-token data.

Block sparsity is dynamic (it depends on the row), so this module builds splash's `MaskInfo` itself
from `tile_pattern_from_info`: `block_mask` is the EMPTY/PARTIAL/FULL pattern (EMPTY blocks are skipped),
and `data_next` points empty steps at the previous non-empty block so they trigger no new DMA. The grid
keeps its full width (a dynamic pattern has no static bound), so an empty step costs one grid iteration.

Layout: each example runs the single-device kernel (`vmap` over the batch); under a mesh the call is
wrapped in `shard_map` with the batch on (data, fsdp) and heads on tensor (neo_jax/kernels/sharding.py,
shared with the other backends). On CPU the kernel runs in Pallas interpret mode (tests); it needs L
to be a multiple of the block size (128 by default here).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as smi

from neo_jax.kernels.sharding import shard_attention
from neo_jax.model.mask import EMPTY, MaskInfo, tile_pattern_from_info


def horizon(info: MaskInfo):
    """int32 [B, Lq]: last kv index k of q's segment with kv_key[k] <= q_key[q] (-1 if none).

    Assumes the non-padding kv tokens are sorted by (segment, key), as packed rows are. Padding kv tokens
    inherit the running maximum, so the sort holds over the whole row and `searchsorted` applies.
    Exact for int32 while (segments + 1) * (max key + 2) < 2**31 (rows up to ~46k tokens).
    """
    ks, kc = info.kv_segment_ids, info.kv_key
    big = jnp.max(jnp.where(ks != 0, kc, 0)) + 2
    kv = jnp.where(ks != 0, ks * big + kc, -1)
    kv = jax.lax.cummax(kv, axis=kv.ndim - 1)
    qv = info.q_segment_ids * big + jnp.minimum(info.q_key, big - 1)
    return jax.vmap(lambda a, x: jnp.searchsorted(a, x, side="right"))(kv, qv).astype(jnp.int32) - 1


def _fill_empty(pattern, axis):
    """Block index to fetch at each grid step along `axis`: itself when non-empty, else the last
    non-empty index before it (the first one after it for leading empties), so empties cause no DMA."""
    n = pattern.shape[axis]
    shape = [1] * pattern.ndim
    shape[axis] = n
    idx = jnp.arange(n, dtype=jnp.int32).reshape(shape)
    nonempty = pattern != EMPTY
    last = jax.lax.cummax(jnp.where(nonempty, idx, -1), axis=axis)
    first = jax.lax.cummin(jnp.where(nonempty, idx, n), axis=axis, reverse=True)
    first = jnp.where(first == n, 0, first)
    return jnp.where(last >= 0, last, first)


def _smem_int(x, bound):
    return x.astype(jnp.int8 if bound < 127 else jnp.int16 if bound < 32767 else jnp.int32)


def mask_infos(info: MaskInfo, block_q: int, block_kv: int):
    """Splash `MaskInfo`s (fwd / dq, dkv) per example, leading batch axis: block_mask [B, 1, nq, nk]."""
    pattern = tile_pattern_from_info(info, block_q, block_kv)[:, None]  # one head group
    nq, nk = pattern.shape[-2:]
    block_mask = pattern.astype(jnp.int8)
    mask_next = jnp.zeros_like(block_mask)  # only read for stored partial-mask blocks (none here)
    q_sequence = horizon(info)
    fwd = smi.MaskInfo(_smem_int(_fill_empty(pattern, 3), nk), mask_next, block_mask, None, q_sequence)
    dkv = smi.MaskInfo(_smem_int(_fill_empty(pattern, 2), nq), mask_next, block_mask, None, q_sequence)
    return fwd, dkv


def _k_le_horizon(q_sequence, k_sequence):
    return k_sequence <= q_sequence


def _block_sizes(lq, lk, block):
    bq, bkv = min(block, lq), min(block, lk)
    return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _local_attention(q, k, v, info, *, scale, block, interpret):
    """Per-device body: q [b, L, h, D], k/v [b, L, kvh, D|Dv] -> [b, L, h, Dv]."""
    lq, lk = q.shape[1], k.shape[1]
    if lq % min(block, lq) or lk % min(block, lk) or min(lq, lk) % 128:
        raise ValueError(f"splash needs lengths that are multiples of 128 and of block {block}: "
                         f"got Lq={lq}, Lk={lk}; pad the rows or use impl='blockwise'")
    bs = _block_sizes(lq, lk, block)
    fwd, dkv = mask_infos(info, bs.block_q, bs.block_kv)
    kwargs = dict(is_mqa=False, block_sizes=bs, save_residuals=False, mask_value=sk.DEFAULT_MASK_VALUE,
                  attn_logits_soft_cap=None, residual_checkpoint_name=None,
                  mask_function=_k_le_horizon, interpret=interpret)

    def one(fwd_i, dkv_i, qi, ki, vi, qs, ks):
        kernel = sk.SplashAttentionKernel(fwd_i, fwd_i, dkv_i, **kwargs)
        return kernel(qi, ki, vi, segment_ids=sk.SegmentIds(q=qs, kv=ks))

    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    out = jax.vmap(one)(fwd, dkv, qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                        info.q_segment_ids, info.kv_segment_ids)
    out = out.transpose(0, 2, 1, 3)
    # A query with no allowed key: splash leaves 0/0 there; the contract is exactly 0.
    return jnp.where((info.q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def attention(q, k, v, info: MaskInfo, *, scale: float, mesh=None, block: int = 512,
              interpret: bool | None = None):
    """Mixed-mask splash attention. q/k [B, L, H|KVH, Dqk], v [B, L, KVH, Dv]; L % 128 == 0.

    mesh: a `jax.sharding.Mesh` (default: the `jax.set_mesh` context mesh); the kernel then runs per
    device under `shard_map`, batch over (data, fsdp), heads over tensor (`sharding.shard_attention`).
    interpret: Pallas interpret mode; defaults to True off TPU.
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    body = functools.partial(_local_attention, scale=float(scale), block=block, interpret=interpret)
    return shard_attention(body, q, k, v, info, mesh=mesh, name="splash")
