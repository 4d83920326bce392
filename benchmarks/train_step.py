"""Train-step throughput on this CPU, as a fraction of the matmul rate measured in the same run.

Config (DESIGN.md "Targets"): ~110M parameters (hidden 768, 12 layers of which 4 pre-buffer, 12 heads /
4 kv heads, head_dim 64, FFN 2048, vocab 32000 tied, vision_dim 128), stage sft (everything trains), one
packed row of L = 2048 tokens holding 4 documents, each with one 16x16-token (256) image. FLOPs are model
FLOPs (neo_jax/train/flops.py): 6 N per token for the matmuls, attention on the mask's allowed pairs only.
The reference rate is a large float32 jnp.dot timed in the same process.

Then `neo-jax plan` (compile only, fake CPU devices) for neo_2b:pt on 64 and neo_9b:sft on 256 devices.

    python benchmarks/train_step.py [--impls xla,blockwise] [--steps 3] [--no-plan]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neo_jax import config  # noqa: E402
from neo_jax.model.rope import native_positions  # noqa: E402
from neo_jax.parallel import mesh as mesh_lib  # noqa: E402
from neo_jax.parallel.rules import model_config  # noqa: E402
from neo_jax.train import flops as flops_lib, step as step_lib  # noqa: E402

L, DOCS, GRID = 2048, 4, (16, 16)
MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_heads=12, num_kv_heads=4,
             head_dim=64, num_prebuffer_layers=4, num_llm_layers=8, tie_word_embeddings=True, vision_dim=128,
             img_context_id=31997, img_start_id=31998, img_end_id=31999, dtype="float32", remat_policy="none")


def make_row(mcfg, seed=0):
    """One packed row: 4 documents of 512 tokens = text, <img>, 256 <IMG_CONTEXT>, </img>, text."""
    rng = np.random.default_rng(seed)
    ctx, start, end = mcfg.img_context_id, mcfg.img_start_id, mcfg.img_end_id
    n_img = GRID[0] * GRID[1]
    per_doc = L // DOCS
    toks, segs, pos, ppos = [], [], [], []
    for d in range(DOCS):
        head = list(rng.integers(1, ctx - 1, 32))
        tail = list(rng.integers(1, ctx - 1, per_doc - 32 - n_img - 2))
        t = head + [start] + [ctx] * n_img + [end] + tail
        toks += t
        segs += [d + 1] * len(t)
        pos += native_positions(np.array(t), np.array([GRID]), img_start_id=start, img_context_id=ctx).tolist()
        for wr in range(GRID[0]):
            for wc in range(GRID[1]):
                for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                    ppos.append([2 * wr + dr, 2 * wc + dc])
    tokens = np.array([toks], np.int32)
    seg = np.array([segs], np.int32)
    nxt = np.concatenate([tokens[:, 1:], np.zeros((1, 1), np.int32)], 1)
    same = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((1, 1), bool)], 1)
    p = len(ppos)
    return {"tokens": tokens, "targets": np.where(same, nxt, 0).astype(np.int32),
            "loss_weights": (same & (nxt != ctx)).astype(np.float32), "segment_ids": seg,
            "positions": np.array([pos], np.int32),
            "patches": rng.normal(size=(1, p, mcfg.patch_dim)).astype(np.float32),
            "patch_positions": np.array([ppos], np.int32)}


def matmul_rate(n=2048, reps=10):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    x = a
    for _ in range(reps):
        x = f(x)
    x.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def bench_step(impl, steps, batch):
    cfg = config.load("tiny:sft")
    for k, v in MODEL.items():
        cfg.model[k] = v
    cfg.model.attention_impl = impl
    cfg.train.warmup_steps = 10
    mcfg = model_config(cfg.model)
    mesh = mesh_lib.make_mesh(mesh_lib.mesh_config(), devices=jax.devices()[:1])
    state, shardings = step_lib.create_train_state(cfg, mesh, 0)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step = step_lib.make_train_step(cfg, mesh, shardings)
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return n_params, compile_s, float(np.median(times)), float(m["loss"]), mcfg


def run_plan(spec, mesh, batch_size, timeout):
    cmd = [sys.executable, "-m", "neo_jax.cli", "plan", "--config", spec, "--mesh", mesh,
           "--batch-size", str(batch_size)]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"  {spec} on {mesh}: compile did not finish within {timeout} s on this machine"
    if out.returncode:
        return f"  {spec} on {mesh}: failed ({out.stderr.strip().splitlines()[-1]})"
    return out.stdout.rstrip() + f"\n  (wall {time.perf_counter() - t:.0f} s)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="xla,blockwise")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-plan", action="store_true")
    ap.add_argument("--plan-timeout", type=int, default=1800)
    args = ap.parse_args()
    mcfg = model_config({**config.load("tiny").model.to_dict(), **MODEL})
    batch = make_row(mcfg)
    counted = flops_lib.batch_flops(mcfg, batch)
    dense_pairs = L * (L + 1) // 2
    pairs = flops_lib.attention_pairs(batch["segment_ids"], batch["positions"])
    print(f"row: L={L}, {DOCS} documents with one {GRID[0]}x{GRID[1]} image each; allowed pairs {pairs} "
          f"({pairs / dense_pairs:.3f} of causal); step FLOPs: matmul {counted['matmul'] / 1e9:.1f} G, "
          f"attention {counted['attention'] / 1e9:.1f} G")
    print("matmul rate: f32 2048^3 jnp.dot, timed just before and just after each impl's steps (mean)")
    print(f"{'impl':10} {'params':>8} {'compile s':>9} {'step s':>7} {'tokens/s':>9} {'GFLOP/s':>8} "
          f"{'matmul GFLOP/s':>15} {'ratio':>6} {'loss':>7}")
    for impl in args.impls.split(","):
        before = matmul_rate()
        n, compile_s, step_s, loss, _ = bench_step(impl, args.steps, batch)
        rate = (before + matmul_rate()) / 2
        achieved = counted["total"] / step_s
        print(f"{impl:10} {n / 1e6:7.1f}M {compile_s:9.1f} {step_s:7.2f} {L / step_s:9.0f} "
              f"{achieved / 1e9:8.1f} {rate / 1e9:15.1f} {achieved / rate:6.2f} {loss:7.3f}", flush=True)
    if not args.no_plan:
        print("\nneo-jax plan (compile only on fake CPU devices; per-device figures):")
        print(run_plan("neo_2b:pt", "fsdp=64", 64, args.plan_timeout), flush=True)
        print(run_plan("neo_9b:sft", "fsdp=256", 256, args.plan_timeout), flush=True)


if __name__ == "__main__":
    main()
