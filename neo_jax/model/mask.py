"""The mixed attention mask as data (DESIGN.md "The mixed mask").

Allowed(q, k) = same segment (non-zero) AND key[k] <= key[q], where the mask key is
  mixed:  c = T + segment_start   (T restarts per document; all tokens of an image share T)
  causal: c = token index.
Both keys are non-decreasing along a packed row, so a [q-tile, k-tile] block is empty when
min c(k-tile) > max c(q-tile) and full when max c(k-tile) <= min c(q-tile) inside one segment.
Only the XLA reference materialises the dense [L, L] mask; kernels use `MaskInfo` and `tile_pattern`.

Contract: non-padding segment ids are non-decreasing along the row (the packer writes 1, 2, 3, ...);
padding (segment 0) may sit anywhere, attends nowhere and is attended by none.
"""
from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np

KINDS = ("mixed", "causal")
EMPTY, PARTIAL, FULL = 0, 1, 2


@flax.struct.dataclass
class MaskInfo:
    """Everything a kernel needs to evaluate the mask: allowed = seg_q == seg_k != 0 and key_k <= key_q."""

    q_segment_ids: jnp.ndarray  # int32 [B, Lq]
    kv_segment_ids: jnp.ndarray  # int32 [B, Lk]
    q_key: jnp.ndarray  # int32 [B, Lq]
    kv_key: jnp.ndarray  # int32 [B, Lk]


def _check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"mask kind {kind!r} is not one of {KINDS}")


def mask_key(segment_ids, positions, kind: str = "mixed", xp=jnp):
    """Monotone mask key c [..., L] (see module doc). positions: int [..., L, 3] (T, H, W)."""
    _check_kind(kind)
    segment_ids = xp.asarray(segment_ids)
    length = segment_ids.shape[-1]
    idx = xp.broadcast_to(xp.arange(length, dtype=xp.int32), segment_ids.shape)
    if kind == "causal":
        return idx
    # segment_start[i] = index of the first token of i's segment = i - (T-independent running count).
    new_doc = xp.concatenate(
        [xp.ones(segment_ids.shape[:-1] + (1,), bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    start = _cummax(xp.where(new_doc, idx, 0), xp)
    return (xp.asarray(positions)[..., 0] + start).astype(xp.int32)


def _cummax(x, xp):
    if xp is np:
        return np.maximum.accumulate(x, axis=-1)
    import jax

    return jax.lax.cummax(x, axis=x.ndim - 1)


def make_mask_info(segment_ids, positions, kind: str = "mixed") -> MaskInfo:
    """Self-attention MaskInfo for a batch of packed rows."""
    key = mask_key(segment_ids, positions, kind)
    seg = jnp.asarray(segment_ids, jnp.int32)
    return MaskInfo(seg, seg, key, key)


def mask_from_info(info: MaskInfo, xp=jnp):
    """bool [B, Lq, Lk] dense mask."""
    qs, ks = info.q_segment_ids[..., :, None], info.kv_segment_ids[..., None, :]
    return (qs == ks) & (qs != 0) & (info.kv_key[..., None, :] <= info.q_key[..., :, None])


def dense_mask(segment_ids, positions, kind: str = "mixed", xp=jnp):
    """bool [..., L, L]: allowed[q, k]. The O(L^2) reference; kernels use `tile_pattern`."""
    seg = xp.asarray(segment_ids)
    key = mask_key(seg, positions, kind, xp=xp)
    return mask_from_info(MaskInfo(seg, seg, key, key), xp=xp)


def _tile_stats(x, valid, tile, xp, big):
    """Per-tile min/max over valid entries of x [..., L] -> ([..., n], [..., n]); all-invalid -> (big, -big)."""
    shape = x.shape[:-1] + (x.shape[-1] // tile, tile)
    x, valid = x.reshape(shape), valid.reshape(shape)
    return xp.where(valid, x, big).min(-1), xp.where(valid, x, -big).max(-1), valid.all(-1)


def tile_pattern_from_info(info: MaskInfo, tile_q: int, tile_k: int, xp=jnp):
    """int8 [B, Lq/tile_q, Lk/tile_k]: EMPTY (0) / PARTIAL (1) / FULL (2) per [q-tile, k-tile].

    EMPTY guarantees no allowed pair; FULL guarantees every pair is allowed. Derived from per-tile
    min/max of the (monotone) segment ids and mask key, so it is O(L^2 / tile^2), never O(L^2).
    """
    lq, lk = info.q_key.shape[-1], info.kv_key.shape[-1]
    if lq % tile_q or lk % tile_k:
        raise ValueError(f"lengths ({lq}, {lk}) must be multiples of the tile sizes ({tile_q}, {tile_k})")
    big = np.int32(2**30)
    qv, kv = info.q_segment_ids != 0, info.kv_segment_ids != 0
    qs_min, qs_max, q_all = _tile_stats(info.q_segment_ids, qv, tile_q, xp, big)
    ks_min, ks_max, k_all = _tile_stats(info.kv_segment_ids, kv, tile_k, xp, big)
    qc_min, qc_max, _ = _tile_stats(info.q_key, qv, tile_q, xp, big)
    kc_min, kc_max, _ = _tile_stats(info.kv_key, kv, tile_k, xp, big)
    e = lambda a: a[..., :, None]  # noqa: E731  (q-tile axis)
    f = lambda a: a[..., None, :]  # noqa: E731  (k-tile axis)
    empty = (e(qs_max) < f(ks_min)) | (e(qs_min) > f(ks_max)) | (e(qc_max) < f(kc_min))
    one_segment = (e(qs_min) == e(qs_max)) & (f(ks_min) == f(ks_max)) & (e(qs_min) == f(ks_min))
    full = e(q_all) & f(k_all) & one_segment & (f(kc_max) <= e(qc_min))
    return xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(xp.int8)


def tile_pattern(segment_ids, positions, tile: int, kind: str = "mixed", xp=jnp):
    """Tile pattern of self-attention over packed rows (square tiles)."""
    seg = xp.asarray(segment_ids)
    key = mask_key(seg, positions, kind, xp=xp)
    return tile_pattern_from_info(MaskInfo(seg, seg, key, key), tile, tile, xp=xp)
