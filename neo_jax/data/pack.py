"""Packing documents into fixed-shape rows with two budgets: L tokens and P patches.

Grain's first-fit packer (`grain.experimental.FirstFitPackIterDataset`) handles several features with
different lengths, so the token features are packed to L and the patch features to P in one pass;
a document goes into a row only if both fit, and is never split. Tokens and patches of a row are
appended in the same document order, so the k-th `<IMG_CONTEXT>` of a row meets merge window k
(patches 4k..4k+3). Segment ids start at 1; padding is segment 0 with zero features (tokens = pad id).

Skipped records travel through the parallel map as small markers; `CountSkips` (in the consuming
thread) drops them, counts them per reason and logs each record id once. Its counts are part of the
iterator state, so a restored pipeline reports the same totals.
"""
from __future__ import annotations

import logging

import grain
import grain.experimental as gexp

from neo_jax.data.encode import FEATURES, ROPE_FEATURE
from neo_jax.data.skips import REASONS

log = logging.getLogger(__name__)
TOKEN_FEATURES = ("tokens", "targets", "loss_weights", "positions")
PATCH_FEATURES = ("patches", "patch_positions")
MAX_LOGGED_IDS = 10_000  # per process: beyond this, skips are still counted but no longer logged


def skip_marker(reason: str, rid: str, message: str) -> dict:
    return {"skip": reason, "id": rid, "message": message}


class _CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self.counts = dict.fromkeys(REASONS, 0)
        self.seen = 0
        self._logged = set()

    def __next__(self):
        while True:
            item = next(self._parent)
            self.seen += 1
            if "skip" not in item:
                return item
            reason = item["skip"]
            self.counts[reason] += 1
            key = (reason, item["id"])
            if key not in self._logged and len(self._logged) < MAX_LOGGED_IDS:
                self._logged.add(key)
                log.warning("skipped record %s (%s): %s", item["id"], reason, item["message"])

    def get_state(self):
        return {"parent": self._parent.get_state(), "counts": dict(self.counts), "seen": self.seen}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.counts = dict.fromkeys(REASONS, 0) | dict(state["counts"])
        self.seen = int(state["seen"])


class CountSkips(grain.IterDataset):
    """Drops skip markers, counting them per reason. The latest iterator is kept as `self.iterator`
    (its `counts` and `seen` are read by Pipeline.stats)."""

    iterator = None

    def __iter__(self):
        self.iterator = _CountSkipsIterator(self._parent.__iter__())
        return self.iterator


def pack(ds: grain.IterDataset, *, seq_len: int, patch_budget: int, num_bins: int, pad_id: int = 0,
         seed: int = 0, shuffle_bins: bool = True, rope: bool = False) -> grain.IterDataset:
    """Packs encoded documents (dicts of encode.FEATURES) into rows of the batch contract.

    Every document must already fit (encode.py skips or truncates oversize ones). `num_bins` rows are
    filled first-fit and all emitted once a document fits in none of them; more bins, fewer pad tokens.
    Rows are dicts: tokens, targets, loss_weights, segment_ids [L]; positions [L, 3]; patches [P, 768];
    patch_positions [P, 2]; with `rope`, also rope_positions [L, 3] (a RoPE variant's rotary indexes)."""
    feats = FEATURES + ((ROPE_FEATURE,) if rope else ())
    token_feats = TOKEN_FEATURES + ((ROPE_FEATURE,) if rope else ())
    lengths = {k: seq_len for k in token_feats} | {k: patch_budget for k in PATCH_FEATURES}
    padding = dict.fromkeys(feats, None) | {"tokens": pad_id}
    packed = gexp.FirstFitPackIterDataset(
        ds.map(lambda d: {k: d[k] for k in feats}), length_struct=lengths, num_packing_bins=num_bins,
        seed=seed, shuffle_bins=shuffle_bins, padding_struct=padding)
    return packed.map(lambda row: _finalize_row(row, feats))


def _finalize_row(row: dict, feats=FEATURES) -> dict:
    out = {k: row[k] for k in feats}
    out["segment_ids"] = row["tokens_segment_ids"]
    return out
