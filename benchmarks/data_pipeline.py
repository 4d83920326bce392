"""Data pipeline throughput and packing efficiency, with real JPEG decoding.

    python benchmarks/data_pipeline.py [--images 48] [--seconds 20] [--threads 2]

Writes JPEGs of realistic sizes (640x480 ... 2048x1536, smooth content + noise, quality 90) and a JSONL of
captions with a realistic length mix (half short 8-30 words, half long 60-200 words) to a temp dir, then
prints: time per stage for one record (read, decode, RGB, resize, normalise, patchify, tokenise+template,
positions), pipeline samples/s and rows/s at L=8192 with PT pixel limits (256^2..1024^2), and packing
efficiency (non-pad tokens / all tokens) at L=8192, target >= 0.97.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536), (480, 640), (1536, 2048)]
WORDS = "a photo of the red car parked near an old brick building with people walking on street under blue sky".split()


def make_data(root, n_images, seed=0):
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n_images):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, f"{i}.jpg"), quality=90)
    for i in range(4 * n_images):
        n = int(rng.integers(8, 31)) if rng.random() < 0.5 else int(rng.integers(60, 201))
        caption = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n)) + "."
        entries.append({"id": f"r{i}", "image": f"{i % n_images}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]})
    path = os.path.join(root, "captions.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    return path


def stage_times(ann, root, tok, min_px, max_px, n=24):
    from neo_jax.data import image as im
    from neo_jax.data import template
    from neo_jax.data.encode import image_token_ids
    from neo_jax.data.sources import AnnotationSource
    from neo_jax.model.rope import native_positions

    src = AnnotationSource(ann, root)
    t = dict.fromkeys(["read", "decode", "to_rgb", "resize", "patchify", "normalize", "tokenize", "positions"], 0.0)
    for i in range(n):
        rec = src[i]
        c0 = time.perf_counter()
        with open(rec["images"][0], "rb") as f:
            data = f.read()
        c1 = time.perf_counter()
        img = Image.open(__import__("io").BytesIO(data))
        img.load()
        c2 = time.perf_counter()
        img = im.to_rgb(img)
        c3 = time.perf_counter()
        h, w = im.smart_resize(img.height, img.width, min_pixels=min_px, max_pixels=max_px)
        img = img.resize((w, h), Image.BICUBIC)
        c4 = time.perf_counter()
        p, _ = im.patchify(np.asarray(img))
        c5 = time.perf_counter()
        im.normalize_patches(p)
        c6 = time.perf_counter()
        ids = []
        for piece, _ in template.segments(template.ensure_image_tag(rec["conversations"], 1)):
            for j, part in enumerate(piece.split(template.IMAGE_TAG)):
                ids += (image_token_ids(tok, (h // 32, w // 32)) if j else []) + tok.encode(part)
        c7 = time.perf_counter()
        native_positions(np.asarray(ids), [(h // 32, w // 32)], img_start_id=tok.img_start_id,
                         img_context_id=tok.img_context_id)
        c8 = time.perf_counter()
        for k, (a, b) in zip(t, zip([c0, c1, c2, c3, c4, c5, c6, c7], [c1, c2, c3, c4, c5, c6, c7, c8])):
            t[k] += (b - a) / n
    return t


def pipeline_throughput(ann, root, seconds, threads, workers, L, P):
    from neo_jax.data import pipeline

    c = pipeline.data_config("pt")
    c.sources = [{"kind": "annotations", "path": ann, "root": root}]
    c.seq_len, c.patch_budget, c.batch_size, c.pack_bins = L, P, 2, 8
    c.num_threads, c.num_workers, c.prefetch = threads, workers, 16
    it = pipeline.make_pipeline(c, process_index=0, process_count=1)
    next(it)  # warm up (tokenizer, thread pool)
    r0, t0, rows = it.stats()["records_read"], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        rows += len(next(it)["tokens"])
    dt = time.perf_counter() - t0
    s = it.stats()
    it.close()
    return (s["records_read"] - r0) / dt, rows / dt, s["pack_efficiency"]


def packing_efficiency(doc_lengths, L, P, bins, n_rows=300):
    """First-fit packing of documents with the given (tokens, patches) lengths; patches 1 wide (the packer
    does not look at the width), so many bins fit in memory."""
    import grain

    from neo_jax.data import pack

    def doc(i):
        n, p = doc_lengths[i % len(doc_lengths)]
        return {"tokens": np.ones(n, np.int32), "targets": np.ones(n, np.int32), "loss_weights": np.ones(n, np.float32),
                "positions": np.zeros((n, 3), np.int32), "patches": np.ones((p, 1), np.float32),
                "patch_positions": np.zeros((p, 2), np.int32)}

    ds = grain.MapDataset.range(10**9).shuffle(seed=0).map(doc).to_iter_dataset()
    it = iter(pack.pack(ds, seq_len=L, patch_budget=P, num_bins=bins))
    real = sum(int(np.count_nonzero(next(it)["segment_ids"])) for _ in range(n_rows))
    return real / (n_rows * L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from neo_jax.data.encode import encode_record
    from neo_jax.data.sources import AnnotationSource
    from neo_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    min_px, max_px, L = 256 * 256, 1024 * 1024, 8192
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        ann = make_data(root, args.images)
        print(f"generated {args.images} JPEGs (640x480..2048x1536) + {4 * args.images} captions in "
              f"{time.perf_counter() - t0:.1f}s")
        st = stage_times(ann, root, tok, min_px, max_px)
        total = sum(st.values())
        print("\nstage (one record, serial)      ms    share")
        for k, v in st.items():
            print(f"  {k:28s} {1e3 * v:7.2f}  {v / total:6.1%}")
        print(f"  {'total':28s} {1e3 * total:7.2f}  -> {1 / total:.1f} samples/s per core")

        src = AnnotationSource(ann, root)
        lengths = []
        for i in range(len(src)):
            d = encode_record(src[i], tok, min_pixels=min_px, max_pixels=max_px)
            lengths.append((len(d["tokens"]), len(d["patches"])))
        lengths = np.array(lengths)
        img_share = (lengths[:, 1] / 4).sum() / lengths[:, 0].sum()
        print(f"\ndocuments: tokens mean {lengths[:, 0].mean():.0f} (min {lengths[:, 0].min()}, max "
              f"{lengths[:, 0].max()}), image-token share {img_share:.2f}")

        print("\npipeline (L=8192, P=4L, batch 2 rows, 8 bins)   samples/s   rows/s   pack eff.")
        for threads, workers in ((args.threads, 0), (1, 2)):
            sps, rps, eff = pipeline_throughput(ann, root, args.seconds / 2, threads, workers, L, 4 * L)
            print(f"  threads={threads} workers={workers}                      {sps:8.1f}  {rps:7.2f}   {eff:.3f}")

        print("\npacking efficiency at L=8192 (non-pad / all tokens; target >= 0.97)")
        for P, bins in ((4 * L, 2), (4 * L, 8), (4 * L, 32), (3 * L, 32)):
            eff = packing_efficiency([tuple(x) for x in lengths], L, P, bins)
            print(f"  P={P:6d} ({P // L}L)  bins={bins:3d}   {eff:.4f}   {'ok' if eff >= 0.97 else 'below target'}")


if __name__ == "__main__":
    main()
