"""GPU path: a Pallas (Triton) flash-attention kernel driven by per-query key ranges.

On a packed row the mixed mask is exactly `k in [lo(q), hi(q)]` (plus same segment, which only matters
when padding sits inside a document): lo(q) = first kv index of q's document, hi(q) = the horizon, the
last kv index of the document whose mask key is <= q's (`splash.horizon`). A query tile therefore loops
over the key tiles [min lo, max hi] only, with no [L, L] tensor anywhere. The backward is two kernels:
dq loops like the forward; dk/dv loops, per key tile, over the query tiles [min q_lo(k), max q_hi(k)]
that can see it (per-key query ranges, computed the same way). Both recompute scores from the saved
log-sum-exp. dk/dv come out per query head and are summed over each GQA group outside the kernel.

Off GPU the same kernels run in Pallas interpret mode, which is how the tests check them on CPU.
`tokamax` (pip, jax>=0.9.2) has an equivalent `Mask(k_start, k_end)` kernel; it is not a dependency.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from neo_jax.kernels.sharding import shard_attention
from neo_jax.kernels.splash import horizon
from neo_jax.model.mask import MaskInfo

DEFAULT_BLOCK = 64
_BIG = 2**30


def _round_up(x, m):
    return -(-x // m) * m


def ranges(info: MaskInfo):
    """Per-query key range (lo, hi) [B, Lq] and per-key query range (q_lo, q_hi) [B, Lk]; empty = lo > hi.

    Assumes packed rows: non-padding tokens sorted by (segment, key) on both sides (see `horizon`).
    """
    qs, ks = info.q_segment_ids, info.kv_segment_ids
    hi = horizon(info)
    ksorted = jax.lax.cummax(jnp.where(ks != 0, ks, 0), axis=1)
    search = jax.vmap(functools.partial(jnp.searchsorted, side="left"))
    lo = search(ksorted, qs).astype(jnp.int32)
    qvalid = (qs != 0) & (hi >= lo)
    lo, hi = jnp.where(qvalid, lo, _BIG), jnp.where(qvalid, hi, -1)
    # Queries sorted by (segment, hi): the keys k of a segment are seen by q in [first hi >= k, seg end].
    big = ks.shape[1] + 1
    qcomp = jax.lax.cummax(jnp.where(qvalid, qs * big + hi, -1), axis=1)
    q_lo = search(qcomp, ks * big + jnp.arange(ks.shape[1])).astype(jnp.int32)
    q_hi = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(qcomp, ks * big + big - 1) - 1
    kvalid = (ks != 0) & (q_lo <= q_hi)
    return lo, hi, jnp.where(kvalid, q_lo, _BIG), jnp.where(kvalid, q_hi.astype(jnp.int32), -1)


def _mask(lo, hi, qs, k0, ks, n):
    kidx = k0 + jax.lax.broadcasted_iota(jnp.int32, (lo.shape[0], n), 1)
    return (kidx >= lo[:, None]) & (kidx <= hi[:, None]) & (qs[:, None] == ks[None, :])


def _span(lo, hi, block):
    """First and one-past-last tile index covering [min lo, max hi] (empty when all ranges are empty)."""
    return jnp.min(lo) // block, jnp.max(hi) // block + 1


def _fwd_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale, bk):
    q, lo, hi, qs = q_ref[...], lo_ref[...], hi_ref[...], qs_ref[...]
    bq, dv = q.shape[0], v_ref.shape[-1]

    def body(j, carry):
        m, l, acc = carry
        sl = pl.ds(j * bk, bk)
        s = jnp.dot(q, k_ref[sl, :].T, preferred_element_type=jnp.float32) * scale
        s = jnp.where(_mask(lo, hi, qs, j * bk, ks_ref[sl], bk), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        v = v_ref[sl, :]
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(-1), acc

    j0, j1 = _span(lo, hi, bk)
    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, dv), jnp.float32))
    m, l, acc = jax.lax.fori_loop(j0, j1, body, init)
    empty = l == 0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qs_ref, ks_ref, dq_ref,
               *, scale, bk):
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    lo, hi, qs = lo_ref[...], hi_ref[...], qs_ref[...]

    def body(j, dq):
        sl = pl.ds(j * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        p = jnp.where(_mask(lo, hi, qs, j * bk, ks_ref[sl], bk), jnp.exp(s - lse[:, None]), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, None]) * scale).astype(k.dtype)
        return dq + jnp.dot(ds, k, preferred_element_type=jnp.float32)

    j0, j1 = _span(lo, hi, bk)
    dq = jax.lax.fori_loop(j0, j1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qs_ref, k_ref, v_ref, ks_ref,
                qlo_ref, qhi_ref, dk_ref, dv_ref, *, scale, bq):
    k, v, ks = k_ref[...], v_ref[...], ks_ref[...]
    bk = k.shape[0]
    k0 = pl.program_id(2) * bk

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * bq, bq)
        q, do = q_ref[sl, :], do_ref[sl, :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        allowed = _mask(lo_ref[sl], hi_ref[sl], qs_ref[sl], k0, ks, bk)
        p = jnp.where(allowed, jnp.exp(s - lse_ref[sl][:, None]), 0.0)
        dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_ref[sl][:, None]) * scale).astype(q.dtype)
        return dk + jnp.dot(ds.T, q, preferred_element_type=jnp.float32), dv

    i0, i1 = _span(qlo_ref[...], qhi_ref[...], bq)
    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(i0, i1, body, init)
    dk_ref[...], dv_ref[...] = dk, dv


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret):
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=interpret, **params)


def _prep(q, k, v, info, block):
    """Heads-major, padded layouts and the ranges. q [B, H, Lq, D], k/v [B, KVH, Lk, D]."""
    b, lq, h, _ = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {kvh}")
    lqp, lkp = _round_up(lq, block), _round_up(lk, block)
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa
    info = MaskInfo(pad(info.q_segment_ids, lqp), pad(info.kv_segment_ids, lkp), pad(info.q_key, lqp),
                    pad(info.kv_key, lkp))
    r = ranges(info)
    t = lambda x, n: pad(x, n).transpose(0, 2, 1, 3)  # noqa
    return t(q, lqp), t(k, lkp), t(v, lkp), info, r


def _forward(q, k, v, info, scale, block, interpret):
    b, lq, h, d = q.shape
    qh, kh, vh, info, (lo, hi, _, _) = _prep(q, k, v, info, block)
    g, lqp, lkp, dv = h // k.shape[2], qh.shape[2], kh.shape[2], v.shape[-1]
    row_q = pl.BlockSpec((None, block), lambda b_, h_, i: (b_, i))
    row_k = pl.BlockSpec((None, lkp), lambda b_, h_, i: (b_, 0))
    o, lse = _call(
        functools.partial(_fwd_kernel, scale=scale, bk=block), (b, h, lqp // block),
        [pl.BlockSpec((None, None, block, d), lambda b_, h_, i: (b_, h_, i, 0)),
         pl.BlockSpec((None, None, lkp, d), lambda b_, h_, i: (b_, h_ // g, 0, 0)),
         pl.BlockSpec((None, None, lkp, dv), lambda b_, h_, i: (b_, h_ // g, 0, 0)),
         row_q, row_q, row_q, row_k],
        [pl.BlockSpec((None, None, block, dv), lambda b_, h_, i: (b_, h_, i, 0)),
         pl.BlockSpec((None, None, block), lambda b_, h_, i: (b_, h_, i))],
        [jax.ShapeDtypeStruct((b, h, lqp, dv), q.dtype), jax.ShapeDtypeStruct((b, h, lqp), jnp.float32)],
        interpret)(qh, kh, vh, lo, hi, info.q_segment_ids, info.kv_segment_ids)
    return o, lse


def _backward(q, k, v, info, o, lse, do, scale, block, interpret):
    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    qh, kh, vh, info, (lo, hi, q_lo, q_hi) = _prep(q, k, v, info, block)
    g, lqp, lkp, dv = h // kvh, qh.shape[2], kh.shape[2], v.shape[-1]
    doh = jnp.pad(do, [(0, 0), (0, lqp - lq), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)
    delta = jnp.sum(doh.astype(jnp.float32) * o.astype(jnp.float32), -1)
    qs, ks = info.q_segment_ids, info.kv_segment_ids
    tile = lambda n: pl.BlockSpec((None, n), lambda b_, h_, i: (b_, i))  # noqa: E731
    whole = lambda n: pl.BlockSpec((None, n), lambda b_, h_, i: (b_, 0))  # noqa: E731
    head_tile = lambda n, w: pl.BlockSpec((None, None, n, w), lambda b_, h_, i: (b_, h_, i, 0))  # noqa
    head_whole = lambda n, w: pl.BlockSpec((None, None, n, w), lambda b_, h_, i: (b_, h_, 0, 0))  # noqa
    kv_whole = lambda n, w: pl.BlockSpec((None, None, n, w), lambda b_, h_, i: (b_, h_ // g, 0, 0))  # noqa
    kv_tile = lambda n, w: pl.BlockSpec((None, None, n, w), lambda b_, h_, i: (b_, h_ // g, i, 0))  # noqa
    lse_tile = pl.BlockSpec((None, None, block), lambda b_, h_, i: (b_, h_, i))
    lse_whole = pl.BlockSpec((None, None, lqp), lambda b_, h_, i: (b_, h_, 0))

    dq = _call(functools.partial(_dq_kernel, scale=scale, bk=block), (b, h, lqp // block),
               [head_tile(block, d), kv_whole(lkp, d), kv_whole(lkp, dv), head_tile(block, dv), lse_tile,
                lse_tile, tile(block), tile(block), tile(block), whole(lkp)],
               head_tile(block, d), jax.ShapeDtypeStruct(qh.shape, q.dtype),
               interpret)(qh, kh, vh, doh, lse, delta, lo, hi, qs, ks)
    dk, dvv = _call(functools.partial(_dkv_kernel, scale=scale, bq=block), (b, h, lkp // block),
                    [head_whole(lqp, d), head_whole(lqp, dv), lse_whole, lse_whole, whole(lqp),
                     whole(lqp), whole(lqp), kv_tile(block, d), kv_tile(block, dv), tile(block),
                     tile(block), tile(block)],
                    [head_tile(block, d), head_tile(block, dv)],
                    [jax.ShapeDtypeStruct((b, h, lkp, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, h, lkp, dv), jnp.float32)],
                    interpret)(qh, doh, lse, delta, lo, hi, qs, kh, vh, ks, q_lo, q_hi)
    group = lambda x: x.reshape(b, kvh, g, lkp, -1).sum(2).transpose(0, 2, 1, 3)[:, :lk]  # noqa: E731
    dq = dq.transpose(0, 2, 1, 3)[:, :lq]
    return dq, group(dk).astype(k.dtype), group(dvv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, info, scale, block, interpret):
    o, _ = _forward(q, k, v, info, scale, block, interpret)
    return o.transpose(0, 2, 1, 3)[:, :q.shape[1]]


def _attention_fwd(q, k, v, info, scale, block, interpret):
    o, lse = _forward(q, k, v, info, scale, block, interpret)
    return o.transpose(0, 2, 1, 3)[:, :q.shape[1]], (q, k, v, info, o, lse)


def _attention_bwd(scale, block, interpret, res, do):
    q, k, v, info, o, lse = res
    dq, dk, dv = _backward(q, k, v, info, o, lse, do, scale, block, interpret)
    return dq, dk, dv, jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), info)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, info: MaskInfo, *, scale: float, block: int = DEFAULT_BLOCK,
              interpret: bool | None = None, mesh=None):
    """Mixed-mask attention from per-query key ranges. q/k [B, L, H|KVH, Dqk], v [B, Lk, KVH, Dv].

    Any Lq, Lk (padded to `block` internally). interpret: Pallas interpret mode; default off GPU.
    mesh: default the `jax.set_mesh` context mesh; the kernels then run per device under `shard_map`,
    batch over (data, fsdp), heads over tensor (`sharding.shard_attention`).
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    args = (float(scale), int(block), bool(interpret))
    body = lambda q, k, v, info: _attention(q, k, v, info, *args)  # noqa: E731
    return shard_attention(body, q, k, v, info, mesh=mesh, name="gpu")
