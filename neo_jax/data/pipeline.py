"""The Grain input pipeline: sources -> per-host slice -> shuffle -> repeat -> mix -> decode/encode
(threads, optionally worker processes) -> count skips -> pack (L tokens, P patches) -> batch.

    it = make_pipeline(cfg)          # cfg.data as made by data_config(stage); cfg.model optional
    batch = next(it)                 # dict of numpy arrays, leading dim = per-host batch (DESIGN.md)
    state = it.get_state(); ...; it.set_state(state)   # restore continues with identical batches
    it.stats()                       # {"skip_<reason>": n, "records_read": n, "pack_efficiency": x}
    arrays = to_global_arrays(batch, mesh)             # global jax.Arrays sharded over the batch axes
"""
from __future__ import annotations

import dataclasses

import grain
import ml_collections
import numpy as np

from neo_jax.data import encode as encode_lib
from neo_jax.data import pack as pack_lib
from neo_jax.data import sources as sources_lib
from neo_jax.data.skips import BAD_RECORD, REASONS, Skip

# Paper resolution ranges (NEO_PAPER.md §1.8, Tab 5): PT 256^2-1024^2, MT/SFT 256^2-2048^2.
PIXELS = {"pt": (256 * 256, 1024 * 1024), "mt": (256 * 256, 2048 * 2048), "sft": (256 * 256, 2048 * 2048)}
# Packed length of the official scripts (2B): PT 16384, MT 32768, SFT 34816 (rounded to 32768).
SEQ_LEN = {"pt": 16384, "mt": 32768, "sft": 32768}
GLOBAL_ROWS = {"pt": 32, "mt": 16, "sft": 8}


def data_config(stage: str = "pt") -> ml_collections.ConfigDict:
    """Data defaults of a stage. `sources` is a list of dicts, each with `kind` and `weight`:
      {"kind": "annotations", "path": "a.jsonl", "root": "/images"}   official JSON/JSONL
      {"kind": "arrayrecord", "path": "/shards/*.array_record"}       built by `neo-jax data build`
      {"kind": "text", "path": "t.jsonl"}                             text-only (language) records
      {"kind": "synthetic", "split": "train", "size": 10000, "seed": 0, "qtypes": [...]}
    With `text_ratio` set, text sources together get that share (paper 3:7) and the others the rest."""
    min_px, max_px = PIXELS[stage]
    c = ml_collections.ConfigDict()
    c.sources = []
    c.text_ratio = 0.3 if stage in ("pt", "mt") else -1.0  # < 0: use the source weights as given
    c.tokenizer = "builtin"  # or a tokenizer.json / directory / sentencepiece .model
    c.seq_len = SEQ_LEN[stage]
    c.patch_budget = 3 * SEQ_LEN[stage]  # P = 4 x (most image tokens a row may hold): 75% of L here
    c.batch_size = GLOBAL_ROWS[stage]  # global rows per step; each host gets batch_size / process_count
    c.pack_bins = 0  # first-fit bins; 0 = max(per-host batch, 16) (more bins, less padding, more memory)
    c.min_pixels, c.max_pixels = min_px, max_px
    c.loss_weighting = "square"
    c.truncate = False  # oversize samples are skipped (counted); True cuts them at seq_len (never in an image)
    c.shuffle = True
    c.seed = 0
    c.num_epochs = -1  # < 0: repeat forever
    c.num_threads = 8
    c.prefetch = 64
    c.num_workers = 0  # > 0: decode in that many worker processes (grain mp_prefetch)
    return c


def make_source(spec) -> object:
    """A random-access source from one `sources` entry."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind == "synthetic":
        from neo_jax.data.synthetic import QTYPES, SyntheticSource

        return SyntheticSource(spec.get("split", "train"), spec.get("size", 10_000), spec.get("seed", 0),
                               tuple(spec.get("qtypes", QTYPES)))
    if kind in ("annotations", "text"):
        return sources_lib.AnnotationSource(spec["path"], spec.get("root", ""), spec.get("name"))
    if kind == "arrayrecord":
        return sources_lib.ArrayRecordSource(spec["path"])
    raise ValueError(f"data source kind {kind!r} unknown; use annotations | arrayrecord | text | synthetic")


def source_weights(specs, text_ratio: float) -> list[float]:
    """Source weights; with text_ratio >= 0, text sources share text_ratio and the others 1 - text_ratio."""
    w = np.array([float(s.get("weight", 1.0)) for s in specs])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"source weights {w.tolist()} must be >= 0 with a positive sum")
    if text_ratio < 0:
        return list(w / w.sum())
    is_text = np.array([s.get("kind") == "text" for s in specs])
    if (text_ratio > 0 and not is_text.any()) or (text_ratio < 1 and is_text.all()):
        return list(w / w.sum())  # nothing to mix in: the ratio cannot apply
    out = np.where(is_text, text_ratio * w / max(w[is_text].sum(), 1e-12),
                   (1 - text_ratio) * w / max(w[~is_text].sum(), 1e-12))
    return list(out / out.sum())


@dataclasses.dataclass
class EncodeRecord:
    """Source item -> encoded document, or a skip marker (bad input never raises out of the map)."""
    tokenizer: str
    min_pixels: int
    max_pixels: int
    loss_weighting: str
    seq_len: int
    patch_budget: int
    truncate: bool
    rope_kind: str = "native"  # a RoPE ablation variant adds rope_positions (docs/rope_variants.md)

    def __call__(self, item):
        from neo_jax.data.tokenizer import load_tokenizer

        rid = str(item.get("id", "?")) if isinstance(item, dict) else "?"
        try:
            record = sources_lib.materialize(item)
            return encode_lib.encode_record(
                record, load_tokenizer(self.tokenizer), min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                loss_weighting=self.loss_weighting, seq_len=self.seq_len, patch_budget=self.patch_budget,
                truncate=self.truncate, rope_kind=self.rope_kind)
        except Skip as e:
            return pack_lib.skip_marker(e.reason, rid, str(e))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # malformed record
            return pack_lib.skip_marker(BAD_RECORD, rid, f"{type(e).__name__}: {e}")


def check_token_ids(tok, model_cfg) -> None:
    """The model's image/special ids must be the tokenizer's; a mismatch names both and the fix."""
    for key, have in (("img_context_id", tok.img_context_id), ("img_start_id", tok.img_start_id),
                      ("img_end_id", tok.img_end_id)):
        want = model_cfg.get(key) if hasattr(model_cfg, "get") else getattr(model_cfg, key, None)
        if want is not None and want != have:
            raise ValueError(f"config.model.{key}={want} but tokenizer gives {have}; set "
                             f"--config.model.{key}={have} or use the model's tokenizer")
    vocab = model_cfg.get("vocab_size") if hasattr(model_cfg, "get") else None
    if vocab is not None and tok.vocab_size > vocab:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but config.model.vocab_size={vocab}")


class Pipeline:
    """Iterator of per-host batches with checkpointable state and skip/packing statistics."""

    def __init__(self, dataset: grain.IterDataset, counter: "pack_lib.CountSkips"):
        self._it = iter(dataset)
        self._counter_ds = counter
        self._tokens = self._real = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self._tokens += batch["segment_ids"].size
        self._real += int(np.count_nonzero(batch["segment_ids"]))
        return batch

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def stats(self) -> dict:
        """Counters for step metrics: skips per reason, records read, non-pad share of emitted tokens."""
        it = self._counter_ds.iterator  # None until the first batch is requested
        out = {f"skip_{r}": int(it.counts[r]) if it else 0 for r in REASONS}
        out["records_read"] = it.seen if it else 0
        out["pack_efficiency"] = self._real / self._tokens if self._tokens else 0.0
        return out

    def close(self):
        if hasattr(self._it, "close"):
            self._it.close()


def record_dataset(d, process_index: int, process_count: int) -> grain.MapDataset:
    """Source items of this host: each source sliced [process_index::process_count] (disjoint slices
    covering the data), shuffled with its own seed (a new order each epoch), repeated, then mixed."""
    specs = [dict(s) for s in d.sources]
    parts = []
    for i, spec in enumerate(specs):
        ds = grain.MapDataset.source(make_source(spec))[process_index::process_count]
        if d.shuffle:
            ds = ds.shuffle(seed=d.seed + 7919 * i)
        parts.append(ds.repeat(None if d.num_epochs < 0 else d.num_epochs))
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, source_weights(specs, d.text_ratio))


def make_pipeline(cfg, *, process_index: int | None = None, process_count: int | None = None) -> Pipeline:
    """Builds the pipeline from `cfg.data` (or a data ConfigDict itself); checks cfg.model's ids if given."""
    from neo_jax.data.tokenizer import load_tokenizer

    d = cfg.data if "data" in cfg else cfg
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not d.sources:
        raise ValueError("config.data.sources is empty; add e.g. {'kind': 'synthetic'} or "
                         "{'kind': 'annotations', 'path': ..., 'root': ...}")
    if d.batch_size % process_count:
        raise ValueError(f"data.batch_size={d.batch_size} is not divisible by {process_count} hosts")
    tok = load_tokenizer(d.tokenizer)
    if "model" in cfg:
        check_token_ids(tok, cfg.model)
    per_host = d.batch_size // process_count
    rope_kind = cfg.model.get("rope_kind", "native") if "model" in cfg else "native"

    ds = record_dataset(d, process_index, process_count)
    ds = ds.map(EncodeRecord(d.tokenizer, d.min_pixels, d.max_pixels, d.loss_weighting, d.seq_len,
                             d.patch_budget, d.truncate, rope_kind))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.num_threads, prefetch_buffer_size=d.prefetch))
    if d.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    counter = pack_lib.CountSkips(it)
    rows = pack_lib.pack(counter, seq_len=d.seq_len, patch_budget=d.patch_budget,
                         num_bins=d.pack_bins or max(per_host, 16), pad_id=tok.pad_id, seed=d.seed,
                         rope=rope_kind != "native")
    return Pipeline(rows.batch(per_host, drop_remainder=True), counter)


def to_global_arrays(batch: dict, mesh, sharding=None, batch_axes=("data", "fsdp")):
    """Per-host numpy batch -> global jax.Arrays (jax.make_array_from_process_local_data).

    `sharding`: one jax.sharding.Sharding for every key, a dict key -> Sharding, or None to shard the
    leading (batch) dim over the mesh axes in `batch_axes` that the mesh has."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if sharding is None:
        axes = tuple(a for a in batch_axes if a in mesh.axis_names)
        sharding = NamedSharding(mesh, PartitionSpec(axes or None))
    out = {}
    for k, v in batch.items():
        s = sharding[k] if isinstance(sharding, dict) else sharding
        out[k] = jax.make_array_from_process_local_data(s, np.asarray(v))
    return out
