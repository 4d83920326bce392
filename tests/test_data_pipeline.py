"""The Grain pipeline: packing invariants, determinism, restore, host slices, bad input, ArrayRecord, CLI."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from neo_jax.data import pipeline, sources
from neo_jax.data.skips import REASONS
from neo_jax.data.tokenizer import load_tokenizer


def small_config(**kw):
    c = pipeline.data_config("pt")
    c.sources = [{"kind": "synthetic", "size": 64}]
    c.seq_len, c.patch_budget, c.batch_size = 128, 96, 2
    c.min_pixels, c.max_pixels = 32 * 32, 128 * 96
    c.num_threads, c.prefetch, c.pack_bins = 2, 8, 4
    c.update(kw)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_row(row, tok, L, P):
    seg = row["segment_ids"]
    assert row["tokens"].shape == (L,) and row["patches"].shape == (P, 768) and row["positions"].shape == (L, 3)
    n = int(seg.max())
    assert n >= 1 and list(np.unique(seg[seg > 0])) == list(range(1, n + 1))
    assert (seg[:np.count_nonzero(seg)] > 0).all() and (np.diff(seg[seg > 0]) >= 0).all()  # contiguous docs
    assert (row["tokens"][seg == 0] == tok.pad_id).all() and (row["loss_weights"][seg == 0] == 0).all()
    for s in range(1, n + 1):  # each document whole: template start ... <|im_end|>\n, T from 0
        idx = np.flatnonzero(seg == s)
        toks = row["tokens"][idx]
        assert toks[0] == tok.im_start_id and toks[-2] == tok.im_end_id
        assert row["positions"][idx[0], 0] == 0 and (np.diff(row["positions"][idx, 0]) >= 0).all()
        np.testing.assert_array_equal(row["targets"][idx[:-1]], toks[1:])
        assert row["loss_weights"][idx[-1]] == 0
    n_ctx = int((row["tokens"] == tok.img_context_id).sum())
    used = 4 * n_ctx
    assert used <= P and not row["patches"][used:].any() and not row["patch_positions"][used:].any()
    assert np.abs(row["patches"][:used]).sum(-1).min() > 0


def test_rows_respect_both_budgets_and_never_split_documents():
    tok = load_tokenizer("builtin")
    c = small_config(patch_budget=96)  # tight patch budget: 2 images (<= 48 patches each) per row
    it = pipeline.make_pipeline(c, process_index=0, process_count=1)
    docs = []
    for batch in take(it, 6):
        assert batch["tokens"].shape == (2, 128)
        for b in range(2):
            check_row({k: v[b] for k, v in batch.items()}, tok, 128, 96)
            docs.append(int(batch["segment_ids"][b].max()))
    assert max(docs) >= 2
    stats = it.stats()
    assert stats["pack_efficiency"] > 0.5 and stats["records_read"] > 12
    assert all(stats[f"skip_{r}"] == 0 for r in REASONS)


def test_same_seed_same_batches_and_restore_mid_epoch():
    c = small_config()
    a = pipeline.make_pipeline(c, process_index=0, process_count=1)
    first = take(a, 2)
    state = a.get_state()
    json.dumps(state)  # the state is plain data (stored in the checkpoint)
    rest = take(a, 3)
    b = pipeline.make_pipeline(c, process_index=0, process_count=1)
    assert_batches_equal(take(b, 2), first)
    restored = pipeline.make_pipeline(c, process_index=0, process_count=1)
    restored.set_state(state)
    assert_batches_equal(take(restored, 3), rest)
    other = pipeline.make_pipeline(small_config(seed=1), process_index=0, process_count=1)
    assert not np.array_equal(next(other)["tokens"], first[0]["tokens"])


def test_hosts_read_disjoint_slices_covering_the_data():
    c = small_config(num_epochs=1)
    ids = [[r["id"] for r in pipeline.record_dataset(c, i, 2)] for i in range(2)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(f"synthetic/train/{i}" for i in range(64))
    assert abs(len(ids[0]) - len(ids[1])) <= 1


def test_text_ratio_mixing(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"plain text number {i}."}) + "\n" for i in range(50)))
    c = small_config(sources=[{"kind": "synthetic", "size": 64}, {"kind": "text", "path": str(path)}],
                     text_ratio=0.3)
    ds = pipeline.record_dataset(c, 0, 1)
    kinds = [("text" in ds[i]) for i in range(1000)]
    assert abs(np.mean(kinds) - 0.3) < 0.02
    batch = next(pipeline.make_pipeline(c, process_index=0, process_count=1))
    assert batch["tokens"].shape == (2, 128)


def jpeg(arr, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_fixture(tmp_path_factory):
    """One good record and one of every bad kind, as official JSONL annotations + image files."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = jpeg(rng.integers(0, 256, (64, 96, 3), np.uint8))
    (root / "good.jpg").write_bytes(good)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "garbage.png").write_bytes(b"\x89PNG not really an image")
    Image.fromarray(np.zeros((2, 500, 3), np.uint8)).save(root / "thin.png")
    q = lambda text="<image>\nWhat?": [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]  # noqa
    entries = [
        {"id": "good", "image": "good.jpg", "conversations": q()},
        {"id": "missing", "image": "nope.jpg", "conversations": q()},
        {"id": "truncated", "image": "truncated.jpg", "conversations": q()},
        {"id": "garbage", "image": "garbage.png", "conversations": q()},
        {"id": "empty", "image": "good.jpg", "conversations": []},
        {"id": "no_answer", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "mismatch", "image": ["good.jpg", "good.jpg"], "conversations": q()},
        {"id": "thin", "image": "thin.png", "conversations": q()},
        {"id": "long", "image": "good.jpg", "conversations": q("<image>\n" + "many words " * 200)},
        {"id": "robot", "conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "x"}]},
    ]
    ann = root / "ann.jsonl"
    ann.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return ann, root


EXPECTED_SKIPS = {"missing_file": 1, "bad_image": 2, "empty_conversation": 2, "image_count_mismatch": 1,
                  "aspect_ratio": 1, "oversize": 1, "bad_conversation": 1}


def test_every_bad_input_kind_is_skipped_and_counted(bad_fixture, caplog):
    ann, root = bad_fixture
    c = small_config(sources=[{"kind": "annotations", "path": str(ann), "root": str(root)}], num_epochs=1,
                     shuffle=False, batch_size=1, seq_len=256)
    it = pipeline.make_pipeline(c, process_index=0, process_count=1)
    with caplog.at_level("WARNING"):
        rows = list(it)
    assert len(rows) == 1 and rows[0]["segment_ids"].max() == 1  # only the good record survives
    stats = it.stats()
    assert {r: stats[f"skip_{r}"] for r in REASONS} == {r: EXPECTED_SKIPS.get(r, 0) for r in REASONS}
    assert stats["records_read"] == 10
    for rid in ("missing", "truncated", "garbage", "empty", "mismatch", "thin", "long", "robot"):
        assert sum(f"record {rid} " in m for m in caplog.messages) == 1, rid


def test_arrayrecord_build_cli_and_corrupt_record(bad_fixture, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    from neo_jax.cli import main

    ann, root = bad_fixture
    out = tmp_path / "shards"
    assert main(["data", "build", "--annotations", str(ann), "--root", str(root), "--out", str(out),
                 "--shards", "2", "--workers", "2", "--no-progress"]) == 0
    files = sorted(os.listdir(out))
    assert files == ["ann-00000-of-00002.array_record", "ann-00001-of-00002.array_record"]  # no temp files
    src = sources.ArrayRecordSource(str(out / "*.array_record"))
    assert len(src) == 9  # the missing file cannot be stored; the rest are stored and judged when read
    rec = sources.materialize(src[0])
    assert rec["id"] == "good" and rec["images"][0] == (root / "good.jpg").read_bytes()

    bad = str(tmp_path / "corrupt.array_record")
    w = ArrayRecordWriter(bad, "group_size:1")
    w.write(b"garbage bytes")
    w.write(sources.serialize_record({"id": "cut", "images": [b"abc"], "conversations": []})[:-1])
    w.close()
    c = small_config(sources=[{"kind": "arrayrecord", "path": [str(out / "*.array_record"), bad]}],
                     num_epochs=1, shuffle=False, batch_size=1, seq_len=256)
    it = pipeline.make_pipeline(c, process_index=0, process_count=1)
    assert len(list(it)) == 1
    want = dict(EXPECTED_SKIPS, missing_file=0, bad_record=2)
    assert {r: it.stats()[f"skip_{r}"] for r in REASONS} == {r: want.get(r, 0) for r in REASONS}


def test_token_id_check_and_global_arrays(tiny_config):
    import jax
    from jax.sharding import Mesh

    cfg = tiny_config.copy_and_resolve_references()
    cfg.data = small_config()
    pipeline.make_pipeline(cfg, process_index=0, process_count=1).close()  # tiny uses the builtin ids
    cfg.model.img_context_id = 447
    with pytest.raises(ValueError, match="img_context_id"):
        pipeline.make_pipeline(cfg, process_index=0, process_count=1)
    c = small_config(batch_size=8)
    batch = next(pipeline.make_pipeline(c, process_index=0, process_count=1))
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
    arrays = pipeline.to_global_arrays(batch, mesh)
    assert arrays["tokens"].shape == (8, 128) and arrays["patches"].shape == (8, 96, 768)
    assert {sh.data.shape for sh in arrays["tokens"].addressable_shards} == {(2, 128)}  # 4-way over "data"
    np.testing.assert_array_equal(np.asarray(arrays["positions"]), batch["positions"])


def test_worker_processes_give_the_same_batches_and_restore():
    a = pipeline.make_pipeline(small_config(num_workers=1, num_threads=1), process_index=0, process_count=1)
    first = take(a, 2)
    state = a.get_state()
    rest = take(a, 2)
    a.close()
    b = pipeline.make_pipeline(small_config(num_workers=1, num_threads=1), process_index=0, process_count=1)
    b.set_state(state)
    assert_batches_equal(take(b, 2), rest)
    b.close()
    assert_batches_equal(take(pipeline.make_pipeline(small_config(), process_index=0, process_count=1), 2), first)
