"""Dense (xla) vs blockwise attention on this CPU: peak memory and time, forward and forward+backward.

Also prints the fraction of [q, k] tiles the mixed mask needs on realistic packed rows (captions with
one image each; interleaved multi-image documents) next to the causal-only half.

Peak memory is XLA's compiled memory analysis (temporaries + outputs), not process RSS. Shapes: batch 1,
2 q heads on 1 kv head, Dqk 256 (T128|H64|W64), Dv 128, float32.
Run: python benchmarks/attention.py [--lengths 1024,2048,4096,8192,16384] [--tile 512]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.kernels import blockwise, xla
from neo_jax.model import mask as mask_lib
from neo_jax.model.rope import native_positions

CTX, START, END = 9, 7, 8
DENSE_LIMIT_BYTES = 3 * 2**30  # keeps the run under ~5 min on 2 cores; above it dense is compiled, not run


def _doc(rng, images, text_range):
    toks, grids = [], []
    for _ in range(images):
        toks += [1] * int(rng.integers(*text_range))
        r, c = (int(x) for x in rng.integers(8, 25, 2))  # merged grid: 256..768 px images -> 64..576 tokens
        grids.append([r, c])
        toks += [START] + [CTX] * (r * c) + [END]
    toks += [1] * int(rng.integers(*text_range))
    return np.array(toks), np.array(grids).reshape(-1, 2)


def packed_row(rng, length, kind):
    """segment_ids, positions [L, 3] of one packed row: 'caption' (1 image + short text per document)
    or 'interleaved' (2-5 images with paragraphs between)."""
    segs, pos, n = [], [], 0
    while True:
        if kind == "caption":
            toks, grids = _doc(rng, 1, (20, 120))
        else:
            toks, grids = _doc(rng, int(rng.integers(2, 6)), (50, 400))
        if n + len(toks) > length:
            break
        pos.append(native_positions(toks, grids, img_start_id=START, img_context_id=CTX))
        segs.append(np.full(len(toks), len(segs) + 1))
        n += len(toks)
    pad = length - n
    seg = np.concatenate(segs + [np.zeros(pad, int)])
    p = np.concatenate(pos + [np.zeros((pad, 3), int)])
    return seg[None].astype(np.int32), p[None].astype(np.int32)


def tile_fractions(lengths, tile, seed=0):
    print(f"\nTiles computed (tile {tile}), fraction of all [q, k] tiles; causal-only half = (n+1)/2n")
    print(f"{'L':>6} {'row':>12} {'mixed':>7} {'causal_only':>12} {'packed_causal':>14} {'mixed/causal':>13}")
    rng = np.random.default_rng(seed)
    for length in lengths:
        n = length // tile
        half = (n + 1) / (2 * n)
        for kind in ("caption", "interleaved"):
            seg, pos = packed_row(rng, length, kind)
            mixed = np.asarray(mask_lib.tile_pattern(seg, pos, tile, "mixed")) != mask_lib.EMPTY
            causal = np.asarray(mask_lib.tile_pattern(seg, pos, tile, "causal")) != mask_lib.EMPTY
            print(f"{length:>6} {kind:>12} {mixed.mean():7.3f} {half:12.3f} {causal.mean():14.3f} "
                  f"{mixed.sum() / causal.sum():13.3f}")


def _time(fn, *args, reps=2):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _mem(compiled):
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes


def bench(lengths, tile, seed=0):
    print(f"Dense (xla) vs blockwise (tile {tile}), caption rows, B=1, H=2, KVH=1, Dqk=256, Dv=128, f32")
    print(f"{'L':>6} {'pass':>8} {'dense_MiB':>10} {'block_MiB':>10} {'mem_ratio':>9} "
          f"{'dense_s':>8} {'block_s':>8} {'speedup':>8}")
    rng = np.random.default_rng(seed)
    for length in lengths:
        seg, pos = packed_row(rng, length, "caption")
        info = mask_lib.make_mask_info(seg, pos)
        ks = jax.random.split(jax.random.PRNGKey(length), 3)
        q = jax.random.normal(ks[0], (1, length, 2, 256))
        k = jax.random.normal(ks[1], (1, length, 1, 256))
        v = jax.random.normal(ks[2], (1, length, 1, 128))
        impls = {"dense": lambda q, k, v, i: xla.attention(q, k, v, i, scale=128**-0.5),
                 "block": lambda q, k, v, i: blockwise.attention(q, k, v, i, scale=128**-0.5, tile_q=tile,
                                                                 tile_k=tile)}
        for name in ("fwd", "fwd+bwd"):
            row = {}
            for impl, f in impls.items():
                fn = f if name == "fwd" else jax.grad(lambda q, k, v, i, f=f: jnp.sum(f(q, k, v, i)),
                                                      argnums=(0, 1, 2))
                compiled = jax.jit(fn).lower(q, k, v, info).compile()
                mem = _mem(compiled)
                if impl == "dense" and mem > DENSE_LIMIT_BYTES:
                    row[impl] = (mem, None)
                    continue
                try:
                    row[impl] = (mem, _time(compiled, q, k, v, info))
                except Exception as e:  # noqa: BLE001  (out of memory is the expected failure)
                    row[impl] = (mem, None)
                    print(f"  {impl} {name} failed at L={length}: {type(e).__name__}")
            (dm, dt), (bm, bt) = row["dense"], row["block"]
            fmt = lambda t: "    skip" if t is None else f"{t:8.3f}"  # noqa: E731
            speed = "       -" if dt is None else f"{dt / bt:8.2f}"
            print(f"{length:>6} {name:>8} {dm / 2**20:10.1f} {bm / 2**20:10.1f} {dm / bm:9.1f} "
                  f"{fmt(dt)} {fmt(bt)} {speed}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--tile", type=int, default=blockwise.DEFAULT_TILE)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    tile_fractions([8192, 16384], 512)
    tile_fractions([8192], 128)
    bench(lengths, args.tile)


if __name__ == "__main__":
    main()
