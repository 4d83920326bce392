"""Record -> one document's arrays: chat template, image expansion, labels, shifted targets, weights, positions.

A record is a dict: `id`, `conversations` (official human/gpt turns) and `images` (paths, bytes or PIL
images, in `<image>` order), optional `system`; or `id` and `text` for plain language-model text.

Output (one document, unpacked): tokens, targets (targets[t] = tokens[t+1]; the last token has weight 0),
loss_weights (0 where not supervised; otherwise the per-sample weight), positions [n, 3], patches [p, 768],
patch_positions [p, 2]. Only assistant contents plus their `<|im_end|>\\n` are supervised (NEO_PAPER.md §2.4).
"""
from __future__ import annotations

import numpy as np

from neo_jax.data import image as image_lib
from neo_jax.data import template
from neo_jax.data.skips import BAD_CONVERSATION, EMPTY_CONVERSATION, IMAGE_COUNT_MISMATCH, OVERSIZE, Skip
from neo_jax.model.rope import native_positions, rope_positions

WEIGHTINGS = ("token", "sample", "square")
FEATURES = ("tokens", "targets", "loss_weights", "positions", "patches", "patch_positions")
ROPE_FEATURE = "rope_positions"  # added when a RoPE ablation variant is configured (rope_kind != "native")


def sample_weight(num_supervised: int, weighting: str) -> float:
    """Per-token weight of a sample with n supervised tokens: token 1, sample 1/n, square 1/sqrt(n)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss_weighting {weighting!r} is not one of {WEIGHTINGS}")
    if num_supervised == 0:
        return 0.0
    return {"token": 1.0, "sample": 1.0 / num_supervised, "square": num_supervised ** -0.5}[weighting]


def image_token_ids(tok, grid) -> list[int]:
    """`<img>` + `<IMG_CONTEXT>` x rows*cols + `</img>`."""
    return [tok.img_start_id] + [tok.img_context_id] * (grid[0] * grid[1]) + [tok.img_end_id]


def check_conversation(record) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Skip(EMPTY_CONVERSATION, "record has no conversation turns")
    try:
        roles = [template.role_of(t) for t in turns]
    except (ValueError, AttributeError) as e:
        raise Skip(BAD_CONVERSATION, str(e)) from None
    if not all(isinstance(t.get("value", ""), str) for t in turns):
        raise Skip(BAD_CONVERSATION, "a turn's value is not a string")
    if "assistant" not in roles:
        raise Skip(EMPTY_CONVERSATION, "conversation has no assistant (gpt) turn to learn from")
    return turns


def _truncate(tokens, supervised, grids, seq_len, tok):
    """Cuts a document to seq_len tokens, never inside an image; returns (tokens, supervised, n_images)."""
    cut = seq_len
    starts = np.flatnonzero(tokens == tok.img_start_id)
    ends = np.flatnonzero(tokens == tok.img_end_id)
    for s, e in zip(starts, ends):
        if s < cut <= e:  # the image would be split: cut before its <img>
            cut = int(s)
    n_images = int(np.sum(ends < cut))
    return tokens[:cut], supervised[:cut], n_images


def encode_record(record, tok, *, min_pixels: int, max_pixels: int, loss_weighting: str = "square",
                  seq_len: int | None = None, patch_budget: int | None = None, truncate: bool = False,
                  rope_kind: str = "native"):
    """Encodes one record; raises Skip(reason) for bad input (see skips.py). Returns a dict of FEATURES
    (plus ROPE_FEATURE, the variant's rotary indexes, when rope_kind != "native")."""
    if "text" in record and "conversations" not in record:
        return _add_rope(_encode_text(record, tok, loss_weighting, seq_len, truncate), np.zeros((0, 2)), tok,
                         rope_kind)
    turns = check_conversation(record)
    images = list(record.get("images") or [])
    turns = template.ensure_image_tag(turns, len(images))
    n_tags = sum(t.get("value", "").count(template.IMAGE_TAG) for t in turns)
    if n_tags != len(images):
        raise Skip(IMAGE_COUNT_MISMATCH, f"{n_tags} <image> tags but {len(images)} images")

    per_image_max = image_lib.per_image_max_pixels(max_pixels, min_pixels, len(images))
    processed = [image_lib.process_image(src, min_pixels=min_pixels, max_pixels=per_image_max,
                                         name=f"{record.get('id', '?')}#{i}") for i, src in enumerate(images)]
    grids = [g for _, _, g in processed]

    ids, sup, k = [], [], 0
    for piece, supervised in template.segments(turns, record.get("system")):
        parts = piece.split(template.IMAGE_TAG)
        for j, part in enumerate(parts):
            if j:
                img = image_token_ids(tok, grids[k])
                ids += img
                sup += [False] * len(img)  # image tokens are inputs, never targets
                k += 1
            if part:
                t = tok.encode(part)
                ids += t
                sup += [supervised] * len(t)
    tokens, supervised = np.asarray(ids, np.int32), np.asarray(sup, bool)

    n_images = len(grids)
    if seq_len is not None and len(tokens) > seq_len:
        if not truncate:
            raise Skip(OVERSIZE, f"{len(tokens)} tokens > seq_len {seq_len}")
        tokens, supervised, n_images = _truncate(tokens, supervised, grids, seq_len, tok)
    patches = [p for p, _, _ in processed[:n_images]]
    ppos = [q for _, q, _ in processed[:n_images]]
    patches = np.concatenate(patches) if patches else np.zeros((0, image_lib.PATCH**2 * 3), np.float32)
    ppos = np.concatenate(ppos) if ppos else np.zeros((0, 2), np.int32)
    if patch_budget is not None and len(patches) > patch_budget:
        raise Skip(OVERSIZE, f"{len(patches)} patches > patch_budget {patch_budget}")
    out = _finish(tokens, supervised, tok, loss_weighting, truncated=n_images < len(grids) or
                  len(tokens) < len(ids))
    out["positions"] = native_positions(tokens, np.asarray(grids[:n_images], np.int32).reshape(-1, 2),
                                        img_start_id=tok.img_start_id, img_context_id=tok.img_context_id)
    out["patches"], out["patch_positions"] = patches, ppos
    return _add_rope(out, np.asarray(grids[:n_images], np.int32).reshape(-1, 2), tok, rope_kind)


def _add_rope(out, grids, tok, rope_kind):
    if rope_kind != "native":
        out[ROPE_FEATURE] = rope_positions(rope_kind, out["tokens"], np.asarray(grids, np.int32).reshape(-1, 2),
                                           img_start_id=tok.img_start_id, img_context_id=tok.img_context_id)
    return out


def _finish(tokens, supervised, tok, loss_weighting, truncated=False):
    """Shift once: target[t] = tokens[t+1], weighted iff tokens[t+1] is supervised."""
    label_mask = np.concatenate([supervised[1:], [False]])
    n = int(label_mask.sum())
    if n == 0:
        if truncated:
            raise Skip(OVERSIZE, f"no supervised token left after truncating to {len(tokens)} tokens")
        raise Skip(EMPTY_CONVERSATION, "no supervised tokens")
    targets = np.concatenate([tokens[1:], [tok.pad_id]]).astype(np.int32)
    weights = np.where(label_mask, sample_weight(n, loss_weighting), 0.0).astype(np.float32)
    return {"tokens": tokens, "targets": targets, "loss_weights": weights}


def _encode_text(record, tok, loss_weighting, seq_len, truncate):
    """Plain text (language-only corpora): every token is supervised, ended by `<|endoftext|>`/pad."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Skip(EMPTY_CONVERSATION, "text record has no text")
    tokens = np.asarray(tok.encode(text) + [tok.pad_id], np.int32)
    if seq_len is not None and len(tokens) > seq_len:
        if not truncate:
            raise Skip(OVERSIZE, f"{len(tokens)} tokens > seq_len {seq_len}")
        tokens = tokens[:seq_len]
    out = _finish(tokens, np.ones(len(tokens), bool), tok, loss_weighting, truncated=True)
    out["positions"] = native_positions(tokens, np.zeros((0, 2), np.int32), img_start_id=tok.img_start_id,
                                        img_context_id=tok.img_context_id)
    out["patches"] = np.zeros((0, image_lib.PATCH**2 * 3), np.float32)
    out["patch_positions"] = np.zeros((0, 2), np.int32)
    return out
