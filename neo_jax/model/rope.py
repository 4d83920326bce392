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
