"""FLOPs of a train step counted from the config, and model FLOPs utilisation (MFU).

Model FLOPs (no remat recompute, no padding): a train step costs 3x its forward (forward + backward for
activations and weights).
  matmuls     6 * (per-token matmul parameters) * tokens; per token: q/k/v/o and q_hw/k_hw projections,
              the SwiGLU MLP of every layer and the lm_head; per image token also the PEL (4 patches through
              patch_embedding, then dense_embedding).
  attention   6 * heads * (qk_dim + head_dim) per allowed (query, key) pair and layer: QK^T is qk_dim
              (T + H + W channels) wide, PV head_dim wide.
Allowed pairs come from the mask itself (`attention_pairs`): exactly, or as (non-empty tiles) x tile^2 —
what a tile-skipping kernel computes (`neo_jax.model.mask.tile_pattern`).
"""
from __future__ import annotations

import numpy as np

from neo_jax.model import mask as mask_lib
from neo_jax.parallel.rules import model_config

# Dense bf16 peak FLOP/s per chip (vendor figures), for MFU; extend as needed.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def layer_matmul_params(cfg_model) -> int:
    """Matmul weights one token goes through in one decoder layer."""
    c = model_config(cfg_model)
    e, d, h, kv, f = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size
    qk = (h + kv) * d * (2 if c.hw_branch else 1)
    return e * qk + e * kv * d + h * d * e + 3 * e * f


def token_matmul_params(cfg_model) -> int:
    c = model_config(cfg_model)
    return c.num_layers * layer_matmul_params(c) + c.hidden_size * c.vocab_size


def image_token_matmul_params(cfg_model) -> int:
    """Extra matmul weights per image token (one 2x2 merge window) in the patch embedding."""
    c = model_config(cfg_model)
    m = c.merge_size ** 2
    return m * c.patch_dim * c.vision_dim + m * c.vision_dim * c.hidden_size


def attention_flops_per_pair(cfg_model) -> int:
    """Train-step FLOPs per allowed (query, key) pair, summed over layers."""
    c = model_config(cfg_model)
    return 6 * c.num_layers * c.num_heads * (c.qk_dim + c.head_dim)


def attention_pairs(segment_ids, positions, kind: str = "mixed", tile: int | None = None) -> int:
    """Allowed (query, key) pairs of packed rows (numpy, no [L, L] mask). With `tile`, the pairs of every
    non-empty [tile x tile] block instead (the work of a tile-skipping kernel)."""
    seg = np.asarray(segment_ids)
    seg = seg.reshape(-1, seg.shape[-1])
    pos = np.asarray(positions).reshape(seg.shape + (3,))
    if tile is not None:
        pat = mask_lib.tile_pattern(seg, pos, tile, kind, xp=np)
        return int((pat != mask_lib.EMPTY).sum()) * tile * tile
    key = mask_lib.mask_key(seg, pos, kind, xp=np).astype(np.int64)
    # Allowed keys of q: same segment and key <= key(q). With v = (segment, key) packed into one sortable
    # integer per token, that count is #(v <= v_q) - #(v < (segment_q, 0)): one searchsorted per row.
    v = seg.astype(np.int64) << 32 | key
    total = 0
    for s_row, v_row in zip(seg, v):
        vv = np.sort(v_row[s_row != 0])
        first = vv & ~np.int64(0xFFFFFFFF)  # (segment, key 0)
        total += int((np.searchsorted(vv, vv, side="right") - np.searchsorted(vv, first, side="left")).sum())
    return total


def step_flops(cfg_model, *, tokens: int, image_tokens: int, pairs: int) -> dict:
    """{"matmul", "attention", "total"} train-step FLOPs for these counts."""
    matmul = 6 * (token_matmul_params(cfg_model) * tokens + image_token_matmul_params(cfg_model) * image_tokens)
    attention = attention_flops_per_pair(cfg_model) * pairs
    return {"matmul": float(matmul), "attention": float(attention), "total": float(matmul + attention)}


def batch_flops(cfg_model, batch, tile: int | None = None) -> dict:
    """Train-step FLOPs of a concrete (host) batch: non-padding tokens, its image tokens, its mask."""
    c = model_config(cfg_model)
    seg = np.asarray(batch["segment_ids"])
    tokens = int((seg != 0).sum())
    image_tokens = int(((np.asarray(batch["tokens"]) == c.img_context_id) & (seg != 0)).sum())
    pairs = attention_pairs(seg, batch["positions"], c.mask_kind, tile)
    return step_flops(c, tokens=tokens, image_tokens=image_tokens, pairs=pairs)


def dense_step_flops(cfg_model, batch_size: int, seq_len: int, image_tokens_per_row: int = 0) -> dict:
    """Upper bound without a batch: full rows of one document each (causal pairs L(L+1)/2 per row)."""
    pairs = batch_size * seq_len * (seq_len + 1) // 2
    return step_flops(cfg_model, tokens=batch_size * seq_len, image_tokens=batch_size * image_tokens_per_row,
                      pairs=pairs)


def peak_flops(device=None) -> float | None:
    """Per-chip bf16 peak of a known accelerator (None for CPUs and unknown kinds)."""
    if device is None:
        import jax

        device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name):
            return PEAK_FLOPS[name]
    return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
    """Achieved model FLOP/s over the peak of all devices (None when the peak is unknown)."""
    if not peak_per_device or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (num_devices * peak_per_device)
