"""Native-RoPE: (T, H, W) position indexes and rotary application (NEO_PAPER.md §1.5, §1.2).

Positions are data: `native_positions` runs in numpy (data pipeline) or jnp (decoding) with one
definition (`xp` selects the array module). Rotary angles are computed from integer positions inside
jit, in float32, with no precomputed tables.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def native_positions(tokens, image_grids, *, img_start_id: int, img_context_id: int, xp=np):
    """Native (T, H, W) indexes of one document.

    Args:
      tokens: int [L] token ids of one document.
      image_grids: int [n_images, 2]: each image's merged-token grid (rows, cols), in order.
      img_start_id: id of `<img>`; img_context_id: id of `<IMG_CONTEXT>`.
      xp: `numpy` (default) or `jax.numpy`.

    Returns int32 [L, 3]. Text: T = running index, H = W = 0. All `<IMG_CONTEXT>` tokens of an image share
    T = T(`<img>`) + 1; H/W = row/col of the token in its image's grid (row-major, restarting per image);
    `</img>` gets one more. Formula: T_i = sum_{j<=i}([tok_j != ctx] + [tok_{j-1} == <img>]) - 1.
    """
    tokens = xp.asarray(tokens)
    grids = xp.asarray(image_grids, dtype=xp.int32).reshape(-1, 2)
    is_ctx = tokens == img_context_id
    after_start = xp.concatenate([xp.zeros((1,), bool), tokens[:-1] == img_start_id])
    t = xp.cumsum((~is_ctx).astype(xp.int32) + after_start.astype(xp.int32)) - 1

    if xp is np and grids.shape[0]:
        n_ctx, n_grid = int(is_ctx.sum()), int((grids[:, 0] * grids[:, 1]).sum())
        if n_ctx != n_grid:
            raise ValueError(
                f"document has {n_ctx} <IMG_CONTEXT> tokens but image_grids {grids.tolist()} "
                f"hold {n_grid}; each image needs rows*cols context tokens"
            )
    if grids.shape[0] == 0:
        zeros = xp.zeros_like(t)
        return xp.stack([t, zeros, zeros], axis=-1).astype(xp.int32)

    # k-th context token of the document -> (image, index inside the image).
    k = xp.cumsum(is_ctx.astype(xp.int32)) - 1
    sizes = grids[:, 0] * grids[:, 1]
    ends = xp.cumsum(sizes)
    img = xp.sum(k[:, None] >= ends[None, :], axis=1)
    img = xp.minimum(img, grids.shape[0] - 1)
    local = k - (ends - sizes)[img]
    cols = grids[img, 1]
    h = xp.where(is_ctx, local // xp.maximum(cols, 1), 0)
    w = xp.where(is_ctx, local % xp.maximum(cols, 1), 0)
    return xp.stack([t, h, w], axis=-1).astype(xp.int32)


def inv_freq(dim: int, theta: float):
    """theta^(-(0, 2, ..., dim-2)/dim), float32 [dim/2]."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, pos, theta: float):
    """Rotate-half (NeoX) rotary on the last axis of x [..., L, heads, D] by integer pos [..., L]."""
    d = x.shape[-1]
    ang = pos.astype(jnp.float32)[..., None] * inv_freq(d, theta)  # [..., L, D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[..., None, :]  # [..., L, 1, D]
    xf = x.astype(jnp.float32)
    return (xf * jnp.cos(ang) + _rotate_half(xf) * jnp.sin(ang)).astype(x.dtype)


def apply_native_rope(x_t, x_h, x_w, positions, *, theta_t: float, theta_hw: float):
    """Native-RoPE: T on x_t by positions[..., 0]; H on x_h by [..., 1]; W on x_w by [..., 2].

    Returns the concatenation [T | H | W] on the last axis (the 256-wide q or k of MHNA).
    """
    return jnp.concatenate(
        [
            apply_rope(x_t, positions[..., 0], theta_t),
            apply_rope(x_h, positions[..., 1], theta_hw),
            apply_rope(x_w, positions[..., 2], theta_hw),
        ],
        axis=-1,
    )


def _interleaved(x, pos, theta: float):
    d = x.shape[-1]
    ang = pos.astype(jnp.float32)[..., None] * inv_freq(d, theta)  # [..., D/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape)


def apply_vision_rope_2d(x, patch_positions, theta: float):
    """The patch embedding's 2D rotary (interleaved pairs, GPT-J style), computed in float32.

    x: [..., P, Dv]; patch_positions: int [..., P, 2] = (row, col). The first Dv/2 channels rotate by
    the column, the last Dv/2 by the row (official NEOVisionEmbeddings).
    """
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    out = jnp.concatenate(
        [
            _interleaved(xf[..., :half], patch_positions[..., 1], theta),
            _interleaved(xf[..., half:], patch_positions[..., 0], theta),
        ],
        axis=-1,
    )
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Ablation variants (NEO paper Table 3; definitions and sources in docs/rope_variants.md).
#
# Every variant keeps MHNA's 256-wide q/k = [T 128 | H 64 | W 64] ("all models get the same added head dims
# and normalization"). A variant is (a) a rule that gives every token a (t, h, w) triple, the batch field
# `rope_positions`, and (b) a map from each of the T block's frequency pairs to one of t/h/w. The H block
# always rotates by h and the W block by w (theta_hw). The batch field `positions` stays Native: the mixed
# mask is derived from its T.
# ---------------------------------------------------------------------------------------------------------
ROPE_KINDS = ("native", "1d", "il", "mrope", "mmrope", "video")
# How many positions an image of grid (rows, cols) advances the running index, given its first index s.
_MROPE_LIKE = ("il", "mrope", "mmrope")


def _check_kind(kind):
    if kind not in ROPE_KINDS:
        raise ValueError(f"rope_kind={kind!r}; choose one of {ROPE_KINDS}")


def rope_positions(kind, tokens, image_grids, *, img_start_id: int, img_context_id: int, xp=np):
    """The variant's rotary (t, h, w) indexes of ONE document, int32 [L, 3] (text first index 0).

    native: `native_positions`. 1d: p = token index for every token, (p, p, p).
    il / mrope / mmrope (Qwen2-VL M-RoPE layout): text t = h = w = running index; an image starting at index
      s gets t = s, h = s + row, w = s + col; the next token gets s + max(rows, cols) (= max + 1).
    video (VideoRoPE diagonal layout, one frame): text as above; image t = s, h = s + row - (rows - 1) // 2,
      w = s + col - (cols - 1) // 2; the next token gets s + 1 (= max T + 1).
    """
    _check_kind(kind)
    if kind == "native":
        return native_positions(tokens, image_grids, img_start_id=img_start_id, img_context_id=img_context_id,
                                xp=xp)
    tokens = xp.asarray(tokens)
    grids = xp.asarray(image_grids, dtype=xp.int32).reshape(-1, 2)
    n = tokens.shape[0]
    is_ctx = tokens == img_context_id
    if xp is np:  # same contract as native_positions
        native_positions(tokens, grids, img_start_id=img_start_id, img_context_id=img_context_id)
    if kind == "1d" or grids.shape[0] == 0:
        p = xp.arange(n, dtype=xp.int32)
        return xp.stack([p, p, p], axis=-1)
    k = xp.cumsum(is_ctx.astype(xp.int32)) - 1  # k-th context token of the document
    sizes = grids[:, 0] * grids[:, 1]
    ends = xp.cumsum(sizes)
    img = xp.minimum(xp.sum(k[:, None] >= ends[None, :], axis=1), grids.shape[0] - 1)
    local = k - (ends - sizes)[img]
    rows, cols = grids[img, 0], grids[img, 1]
    row, col = local // xp.maximum(cols, 1), local % xp.maximum(cols, 1)
    span = xp.maximum(rows, cols) if kind in _MROPE_LIKE else xp.ones_like(rows)
    last = is_ctx & (local == sizes[img] - 1)
    adv = xp.where(is_ctx, xp.where(last, span, 0), 1).astype(xp.int32)
    start = xp.cumsum(adv) - adv  # text: its index; context tokens: the index s of their image
    if kind == "video":
        row, col = row - (rows - 1) // 2, col - (cols - 1) // 2
    h = xp.where(is_ctx, start + row, start)
    w = xp.where(is_ctx, start + col, start)
    return xp.stack([start, h, w], axis=-1).astype(xp.int32)


def next_rope_index(kind, rope_pos, valid):
    """First rotary index for generated text after a prompt: int32 [B].

    rope_pos int [B, L, 3]; valid bool [B, L] (False for padding). native / video: max T + 1 (NEO's decoding
    rule; VideoRoPE continues text from the largest temporal index). 1d / il / mrope / mmrope: max over t, h,
    w + 1 (Qwen2-VL's rule, since h/w of an image run past its t).
    """
    _check_kind(kind)
    vals = rope_pos[..., 0] if kind in ("native", "video") else jnp.max(rope_pos, axis=-1)
    return (jnp.max(jnp.where(valid, vals, -1), axis=1) + 1).astype(jnp.int32)


def text_rope_position(kind, index):
    """The (t, h, w) of a text token at running index `index` (int [...]) -> int32 [..., 3].

    native: (i, 0, 0); every other variant gives text t = h = w = i.
    """
    _check_kind(kind)
    index = jnp.asarray(index, jnp.int32)
    hw = jnp.zeros_like(index) if kind == "native" else index
    return jnp.stack([index, hw, hw], axis=-1)


def t_block_axes(kind, pairs: int):
    """Which of (t=0, h=1, w=2) drives each of the T block's `pairs` frequency pairs (highest frequency first).

    mrope: contiguous sections t/h/w = 1/4, 3/8, 3/8 of the pairs (Qwen2-VL's [16, 24, 24] of 64).
    il: round-robin t, h, w, t, ... (Mogao's interleaved allocation).
    mmrope: Lumos-1's meta groups, 2:3:3 per group: in each 16 pairs [t x4, (h h w w) x3]; when the pairs do
      not fill groups of 16, groups of 8 pairs [t t h w h w h w].
    video: VideoRoPE's low-frequency temporal allocation: the first 3/4 of the pairs alternate h, w; the last
      (lowest-frequency) 1/4 are t.
    native / 1d: all t.
    """
    _check_kind(kind)
    j = np.arange(pairs)
    if kind in ("native", "1d"):
        axes = np.zeros(pairs, np.int32)
    elif kind == "mrope":
        axes = np.where(j < pairs // 4, 0, np.where(j < pairs // 4 + 3 * pairs // 8, 1, 2))
    elif kind == "il":
        axes = j % 3
    elif kind == "mmrope":
        group = np.array([0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 2, 2]) if pairs % 16 == 0 else \
            np.array([0, 0, 1, 2, 1, 2, 1, 2])
        axes = group[j % len(group)]
    else:  # video
        n_hw = 3 * pairs // 4
        axes = np.where(j < n_hw, 1 + j % 2, 0)
    return np.asarray(axes, np.int32)


def apply_sectioned_rope(x, pos3, axes, theta: float):
    """Rotate-half rotary where frequency pair j turns by pos3[..., axes[j]] (M-RoPE style).

    x [..., L, heads, D]; pos3 int [..., L, 3]; axes int [D/2] (static numpy).
    """
    d = x.shape[-1]
    pos = jnp.take(pos3.astype(jnp.float32), jnp.asarray(axes), axis=-1)  # [..., L, D/2]
    ang = pos * inv_freq(d, theta)
    ang = jnp.concatenate([ang, ang], axis=-1)[..., None, :]
    xf = x.astype(jnp.float32)
    return (xf * jnp.cos(ang) + _rotate_half(xf) * jnp.sin(ang)).astype(x.dtype)


def apply_variant_rope(kind, x_t, x_h, x_w, rope_pos, *, theta_t: float, theta_hw: float):
    """MHNA's q or k rotation for a RoPE variant: [T block | H block by h | W block by w] (see t_block_axes)."""
    _check_kind(kind)
    if kind in ("native", "1d"):  # T block by t only (for 1d, t = h = w)
        return apply_native_rope(x_t, x_h, x_w, rope_pos, theta_t=theta_t, theta_hw=theta_hw)
    return jnp.concatenate(
        [
            apply_sectioned_rope(x_t, rope_pos, t_block_axes(kind, x_t.shape[-1] // 2), theta_t),
            apply_rope(x_h, rope_pos[..., 1], theta_hw),
            apply_rope(x_w, rope_pos[..., 2], theta_hw),
        ],
        axis=-1,
    )
