"""Blockwise (flash) attention in pure JAX for the mixed mask; runs on CPU, GPU and TPU.

Online softmax over key tiles, with a `custom_vjp` whose backward recomputes the scores from the saved
output and log-sum-exp, so memory is O(L x tile) in both passes (DESIGN.md "The mixed mask").

Work follows the tile pattern (`tile_pattern_from_info`): for every query tile the non-empty key tiles
are compacted to the front of an index list and a `fori_loop` with a *dynamic* trip count walks only
those, so EMPTY tiles cost nothing (no `lax.cond` per tile, no wasted grid steps). FULL tiles skip the
mask. Query tiles are visited sequentially by `lax.map`/`lax.scan` (a `vmap` over tiles would turn the
dynamic trip counts into the maximum and lose the skipping); each step works on all heads at once.

The backward is one pass over query tiles: it accumulates dq locally and adds dk/dv tiles into
full-length carries, so scores are recomputed once, not twice as in a split dq / dkv backward.

Under a mesh the whole kernel runs per device in `shard_map` (neo_jax/kernels/sharding.py): the SPMD
partitioner cannot split these dynamic-slice loops over the batch and would replicate every row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neo_jax.kernels.sharding import shard_attention
from neo_jax.model.mask import EMPTY, FULL, MaskInfo, tile_pattern_from_info

DEFAULT_TILE = 512


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tiles(lq: int, lk: int, tile_q: int, tile_k: int):
    return min(tile_q, _round_up(lq, 8)), min(tile_k, _round_up(lk, 8))


def _pad(x, length, axis=1):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def _plan(info: MaskInfo, tq: int, tk: int):
    """Tile pattern [B, nq, nk], non-empty k-tile indices first [B, nq, nk], their count [B, nq]."""
    pattern = tile_pattern_from_info(info, tq, tk)
    order = jnp.argsort(pattern == EMPTY, axis=-1, stable=True).astype(jnp.int32)
    return pattern, order, jnp.sum(pattern != EMPTY, axis=-1).astype(jnp.int32)


def _tile_mask(qs, qc, ks, kc):
    return (qs[:, None] == ks[None, :]) & (qs[:, None] != 0) & (kc[None, :] <= qc[:, None])


def _scores(qt, kt, scale, full, qs, qc, ks, kc):
    """qt [KVH, G, tq, D], kt [KVH, tk, D] -> f32 scores [KVH, G, tq, tk], -inf where not allowed."""
    s = jnp.einsum("hgqd,hkd->hgqk", qt, kt, preferred_element_type=jnp.float32) * scale
    return jax.lax.cond(full, lambda s: s, lambda s: jnp.where(_tile_mask(qs, qc, ks, kc), s, -jnp.inf), s)


def _layout(q, k, v, info, tq, tk):
    """Pad to whole tiles and move heads in front: q [B, nq, KVH, G, tq, D], k/v [B, KVH, Lk, D]."""
    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {kvh}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must agree on [B, Lk, kv_heads]")
    lqp, lkp = _round_up(lq, tq), _round_up(lk, tk)
    info = MaskInfo(_pad(info.q_segment_ids, lqp), _pad(info.kv_segment_ids, lkp),
                    _pad(info.q_key, lqp), _pad(info.kv_key, lkp))
    qp = _pad(q, lqp).reshape(b, lqp // tq, tq, kvh, h // kvh, d).transpose(0, 1, 3, 4, 2, 5)
    kp = _pad(k, lkp).transpose(0, 2, 1, 3)
    vp = _pad(v, lkp).transpose(0, 2, 1, 3)
    return qp, kp, vp, info


def _forward(q, k, v, info, scale, tq, tk, with_stats=False):
    """Returns out [B, Lq, H, Dv] (q dtype), lse [B, nq, KVH, G, tq] (+inf where no key), stats."""
    b, lq, h, _ = q.shape
    qp, kp, vp, pinfo = _layout(q, k, v, info, tq, tk)
    pattern, order, count = _plan(pinfo, tq, tk)
    nq, nk, dv = qp.shape[1], pattern.shape[-1], v.shape[-1]
    qseg = pinfo.q_segment_ids.reshape(b, nq, tq)
    qkey = pinfo.q_key.reshape(b, nq, tq)

    def q_tile(x):
        bi, qt, qs, qc, row_order, n, row_pat = x
        kvh, g = qt.shape[:2]

        def body(t, carry):
            m, l, acc, seen = carry
            j = row_order[t]
            kt = jax.lax.dynamic_slice_in_dim(kp[bi], j * tk, tk, axis=1)
            vt = jax.lax.dynamic_slice_in_dim(vp[bi], j * tk, tk, axis=1)
            ks = jax.lax.dynamic_slice_in_dim(pinfo.kv_segment_ids[bi], j * tk, tk)
            kc = jax.lax.dynamic_slice_in_dim(pinfo.kv_key[bi], j * tk, tk)
            full = row_pat[j] == FULL
            s = _scores(qt, kt, scale, full, qs, qc, ks, kc)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + p.sum(-1)
            pv = jnp.einsum("hgqk,hkd->hgqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
            acc = alpha[..., None] * acc + pv
            if with_stats:
                seen = seen.at[j].add(jnp.where(full, FULL, 1).astype(jnp.int32))
            return m_new, l, acc, seen

        init = (jnp.full((kvh, g, tq), -jnp.inf, jnp.float32), jnp.zeros((kvh, g, tq), jnp.float32),
                jnp.zeros((kvh, g, tq, dv), jnp.float32), jnp.zeros((nk,), jnp.int32))
        m, l, acc, seen = jax.lax.fori_loop(0, n, body, init)
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
        return out.astype(q.dtype), lse, seen

    flat = lambda a: a.reshape((b * nq,) + a.shape[2:])  # noqa: E731
    xs = (jnp.repeat(jnp.arange(b), nq), flat(qp), flat(qseg), flat(qkey), flat(order), flat(count),
          flat(pattern))
    out, lse, seen = jax.lax.map(q_tile, xs)
    kvh, g = qp.shape[2:4]
    out = out.reshape(b, nq, kvh, g, tq, dv).transpose(0, 1, 4, 2, 3, 5).reshape(b, nq * tq, h, dv)
    stats = {"visited": seen.reshape(b, nq, nk), "pattern": pattern}
    return out[:, :lq], lse.reshape(b, nq, kvh, g, tq), stats


def _backward(q, k, v, info, out, lse, dout, scale, tq, tk):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    qp, kp, vp, pinfo = _layout(q, k, v, info, tq, tk)
    pattern, order, count = _plan(pinfo, tq, tk)
    nq, kvh, g = qp.shape[1:4]
    dv_dim = v.shape[-1]
    heads = lambda x: _pad(x, nq * tq).reshape(b, nq, tq, kvh, g, -1).transpose(0, 1, 3, 4, 2, 5)  # noqa
    dop = heads(dout)
    delta = jnp.sum(dop.astype(jnp.float32) * heads(out).astype(jnp.float32), -1)  # [B, nq, KVH, G, tq]
    qseg = pinfo.q_segment_ids.reshape(b, nq, tq)
    qkey = pinfo.q_key.reshape(b, nq, tq)

    def q_tile(carry, x):
        dk_all, dv_all = carry
        bi, qt, dot, lse_t, dl, qs, qc, row_order, n, row_pat = x

        def body(t, c):
            dq, dk_all, dv_all = c
            j = row_order[t]
            kt = jax.lax.dynamic_slice_in_dim(kp[bi], j * tk, tk, axis=1)
            vt = jax.lax.dynamic_slice_in_dim(vp[bi], j * tk, tk, axis=1)
            ks = jax.lax.dynamic_slice_in_dim(pinfo.kv_segment_ids[bi], j * tk, tk)
            kc = jax.lax.dynamic_slice_in_dim(pinfo.kv_key[bi], j * tk, tk)
            s = _scores(qt, kt, scale, row_pat[j] == FULL, qs, qc, ks, kc)
            p = jnp.exp(s - lse_t[..., None])  # 0 where masked, and for rows with no key (lse = +inf)
            dvt = jnp.einsum("hgqk,hgqd->hkd", p.astype(dot.dtype), dot, preferred_element_type=jnp.float32)
            dp = jnp.einsum("hgqd,hkd->hgqk", dot, vt, preferred_element_type=jnp.float32)
            ds = (p * (dp - dl[..., None]) * scale).astype(qt.dtype)
            dq = dq + jnp.einsum("hgqk,hkd->hgqd", ds, kt, preferred_element_type=jnp.float32)
            dkt = jnp.einsum("hgqk,hgqd->hkd", ds, qt, preferred_element_type=jnp.float32)
            start = (bi, 0, j * tk, 0)
            dk_all = jax.lax.dynamic_update_slice(
                dk_all, jax.lax.dynamic_slice(dk_all, start, (1, kvh, tk, d)) + dkt[None], start)
            dv_all = jax.lax.dynamic_update_slice(
                dv_all, jax.lax.dynamic_slice(dv_all, start, (1, kvh, tk, dv_dim)) + dvt[None], start)
            return dq, dk_all, dv_all

        dq0 = jnp.zeros(qt.shape, jnp.float32)
        dq, dk_all, dv_all = jax.lax.fori_loop(0, n, body, (dq0, dk_all, dv_all))
        return (dk_all, dv_all), dq

    flat = lambda a: a.reshape((b * nq,) + a.shape[2:])  # noqa: E731
    xs = (jnp.repeat(jnp.arange(b), nq), flat(qp), flat(dop), flat(lse), flat(delta), flat(qseg),
          flat(qkey), flat(order), flat(count), flat(pattern))
    init = (jnp.zeros(kp.shape, jnp.float32), jnp.zeros(vp.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(q_tile, init, xs)
    dq = dq.reshape(b, nq, kvh, g, tq, d).transpose(0, 1, 4, 2, 3, 5).reshape(b, nq * tq, h, d)[:, :lq]
    dk = dk.transpose(0, 2, 1, 3)[:, :lk]
    dv = dv.transpose(0, 2, 1, 3)[:, :lk]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, info, scale, tq, tk):
    return _forward(q, k, v, info, scale, tq, tk)[0]


def _attention_fwd(q, k, v, info, scale, tq, tk):
    out, lse, _ = _forward(q, k, v, info, scale, tq, tk)
    return out, (q, k, v, info, out, lse)


def _attention_bwd(scale, tq, tk, res, dout):
    q, k, v, info, out, lse = res
    dq, dk, dv = _backward(q, k, v, info, out, lse, dout, scale, tq, tk)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), info)  # integer inputs
    return dq, dk, dv, zeros


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, info: MaskInfo, *, scale: float, tile_q: int = DEFAULT_TILE,
              tile_k: int = DEFAULT_TILE, mesh=None):
    """Mixed-mask attention, O(L x tile) memory. q/k [B, L, H|KVH, Dqk], v [B, Lk, KVH, Dv].

    Lq may differ from Lk (decode, chunked prefill); lengths need not be tile multiples (padded
    internally as segment 0). A query with no allowed key returns exactly 0 (and zero gradients).
    mesh: default the `jax.set_mesh` context mesh; the loops then run per device under `shard_map`,
    batch over (data, fsdp), heads over tensor (`sharding.shard_attention`).
    """
    tq, tk = _tiles(q.shape[1], k.shape[1], tile_q, tile_k)
    body = lambda q, k, v, info: _attention(q, k, v, info, float(scale), tq, tk)  # noqa: E731
    return shard_attention(body, q, k, v, info, mesh=mesh, name="blockwise")


def attention_with_stats(q, k, v, info: MaskInfo, *, scale: float, tile_q: int = DEFAULT_TILE,
                         tile_k: int = DEFAULT_TILE):
    """Forward only, plus what the loop actually did: `visited` int32 [B, nq, nk] holds FULL (2) for a
    tile computed without a mask, PARTIAL (1) for one computed with the mask, 0 for one never touched;
    `pattern` is the tile pattern it was planned from. Equal arrays = exactly the non-empty tiles ran."""
    tq, tk = _tiles(q.shape[1], k.shape[1], tile_q, tile_k)
    out, _, stats = _forward(q, k, v, info, float(scale), tq, tk, with_stats=True)
    return out, stats
