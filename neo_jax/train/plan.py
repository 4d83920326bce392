"""`neo-jax plan`: compile the train step ahead of time for a mesh and print what each device needs.

    neo-jax plan --config configs/neo_2b.py:pt --mesh data=1,fsdp=64,tensor=1 [--batch-size 64 --seq-len 8192]
    neo-jax plan --config tiny --mesh data=8 --mesh fsdp=8            # compare meshes side by side

Nothing is allocated: the state and batch are ShapeDtypeStructs carrying their shardings, and the step is
`.lower(...).compile()`d on fake CPU devices. The device count must be fixed before JAX starts, so the
command re-executes itself once (`python -m neo_jax.train.plan ...`) with
`XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu` (N = the mesh size). Memory comes
from XLA's memory analysis of the per-device program (CPU layouts and fusion decisions, so a guide for TPU /
GPU, not a guarantee); FLOPs both from XLA's cost analysis (per device; loop bodies such as the scanned
layers may be counted once) and from the config (neo_jax/train/flops.py, one document per row).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ENV_DEVICES = "NEO_PLAN_DEVICES"


def parse_mesh(text: str) -> dict:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (missing axes are 1)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in sizes:
            raise ValueError(f"--mesh {text!r}: each part must be data=N, fsdp=N or tensor=N")
        sizes[name.strip()] = int(value)
        if sizes[name.strip()] < 1:
            raise ValueError(f"--mesh {text!r}: sizes must be >= 1 (plan has no real devices to fill -1)")
    return sizes


def register(subparsers):
    p = subparsers.add_parser("plan", help="compile the train step for a mesh on fake CPU devices and "
                                           "print per-device memory, FLOPs and state bytes")
    p.add_argument("--config", required=True, help="e.g. configs/neo_2b.py:pt or tiny")
    p.add_argument("--mesh", action="append", required=True,
                   help="data=N,fsdp=N,tensor=N (repeat to compare meshes of the same device count)")
    p.add_argument("--strategy", default=None, help="dp | fsdp | fsdp_tp (default: the config's mesh.strategy)")
    p.add_argument("--batch-size", type=int, default=None, help="global rows per step (default: data.batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: data.seq_len)")
    p.add_argument("--patch-budget", type=int, default=None, help="patches per row (default: data.patch_budget)")
    p.add_argument("--json", action="store_true", help="print one JSON object per mesh instead of a table")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    meshes = [parse_mesh(m) for m in args.mesh]
    counts = {math.prod(m.values()) for m in meshes}
    if len(counts) != 1:
        raise SystemExit(f"neo-jax plan: all --mesh values must use the same device count, got {sorted(counts)}")
    n = counts.pop()
    if os.environ.get(ENV_DEVICES) != str(n):  # re-exec so the fake device count is set before JAX starts
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{ENV_DEVICES: str(n)})
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        argv = [sys.executable, "-m", "neo_jax.train.plan"] + sys_argv(args)
        sys.stdout.flush()
        os.execve(sys.executable, argv, env)
    return plan(args, meshes)


def sys_argv(args) -> list[str]:
    out = ["--config", args.config] + (["--json"] if args.json else [])
    for m in args.mesh:
        out += ["--mesh", m]
    for flag in ("strategy", "batch_size", "seq_len", "patch_budget"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return out + [f"--config.{o}" for o in args.overrides]


def _bytes_per_device(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def plan_one(cfg, sizes, batch_size, seq_len, patch_budget) -> dict:
    """Compile the step for one mesh; return the figures as a dict."""
    import jax
    import jax.numpy as jnp

    from neo_jax.parallel import mesh as mesh_lib, rules
    from neo_jax.train import flops, step as step_lib

    mesh = mesh_lib.make_mesh(mesh_lib.mesh_config(**sizes))
    mcfg = rules.model_config(cfg.model)
    state, shardings = step_lib.abstract_train_state(cfg, mesh)
    bs = rules.batch_sharding(mesh)
    i32, f32 = jnp.int32, jnp.float32
    shapes = {"tokens": ((batch_size, seq_len), i32), "targets": ((batch_size, seq_len), i32),
              "loss_weights": ((batch_size, seq_len), f32), "segment_ids": ((batch_size, seq_len), i32),
              "positions": ((batch_size, seq_len, 3), i32),
              "patches": ((batch_size, patch_budget, mcfg.patch_dim), f32),
              "patch_positions": ((batch_size, patch_budget, 2), i32)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=bs) for k, (s, d) in shapes.items()}
    t0 = time.perf_counter()
    compiled = step_lib.make_train_step(cfg, mesh, shardings).lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    counted = flops.dense_step_flops(mcfg, batch_size, seq_len, image_tokens_per_row=patch_budget // mcfg.merge_size ** 2)
    return {"mesh": ",".join(f"{k}={v}" for k, v in sizes.items()), "compile_s": seconds,
            "params_bytes": _bytes_per_device(state.params), "opt_bytes": _bytes_per_device(state.opt_state),
            "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "peak_bytes": peak, "xla_flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
            "config_flops": counted["total"], "devices": mesh.size}


def _size(x) -> str:
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if x >= scale:
            return f"{x / scale:8.2f}{unit}"
    return f"{x:8.0f}B"


def plan(args, meshes) -> int:
    from neo_jax import config

    cfg = config.load(args.config, args.overrides)
    if args.strategy:
        cfg.mesh.strategy = args.strategy
    batch_size = args.batch_size or cfg.data.batch_size
    seq_len = args.seq_len or cfg.data.seq_len
    patch_budget = args.patch_budget if args.patch_budget is not None else cfg.data.patch_budget
    if not args.json:
        print(f"plan {args.config}: strategy={cfg.mesh.strategy} stage={cfg.stage} batch={batch_size} rows x "
              f"{seq_len} tokens, {patch_budget} patches/row, grad_accum={cfg.train.grad_accum}, "
              f"dtype={cfg.model.dtype}/{cfg.model.param_dtype}, remat={cfg.model.remat_policy}")
        print(f"{'mesh':26}{'params':>9} {'opt_state':>9} {'arguments':>9} {'temp':>9} {'peak':>9}  (bytes per device)"
              f" | step TFLOP: config  XLA/device | compile s")
    for sizes in meshes:
        r = plan_one(cfg, sizes, batch_size, seq_len, patch_budget)
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        print(f"{r['mesh']:26}{_size(r['params_bytes'])} {_size(r['opt_bytes'])} {_size(r['argument_bytes'])} "
              f"{_size(r['temp_bytes'])} {_size(r['peak_bytes'])}{'':20} | {r['config_flops'] / 1e12:12.4g}"
              f"{r['xla_flops'] / 1e12:12.4g} | {r['compile_s']:8.1f}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="neo-jax")
    register(parser.add_subparsers(dest="command"))
    args, extra = parser.parse_known_args(["plan"] + list(sys.argv[1:] if argv is None else argv))
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments {bad}")
    args.overrides = [e[len("--config."):] for e in extra]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
