"""`neo-jax sweep`: run an ablation grid one run after another, or emit one launch command per run, then
collect the results into a table shaped like the paper's Table 3 (Markdown and CSV).

    neo-jax sweep --grid configs/ablations/cpu_repro.py --workdir /tmp/abl             # run here, in order
    neo-jax sweep --grid configs/ablations/table3.py --workdir gs://b/t3 --emit --prefix "launch/tpu/..."
    neo-jax sweep --grid configs/ablations/table3.py --workdir gs://b/t3 --collect      # table only

A grid file defines `get_grid()` -> dict(base: config name, stages: [stage, ...], steps: {stage: N},
seeds: [...], eval: a `neo-jax eval --data` spec, runs: [dict(id, attention, rope, overrides {key: value})], and
optionally overrides: {key: value} shared by every run, applied before the run's own).
Run `<id>_seed<s>` trains its stages in order (each later stage starts from the previous one's params via
`init_from`) in `<workdir>/<id>_seed<s>/<stage>`, then evaluates the last stage into `.../eval.json`. A run
whose eval.json exists is not run again, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shlex
import sys


def load_grid(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("neo_grid", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"--grid {path!r}: no such file")
    module = importlib.util.module_from_spec(spec)
    grid_dir = os.path.dirname(os.path.abspath(path))  # grids import their siblings (cpu_repro <- table3)
    if grid_dir not in sys.path:
        sys.path.insert(0, grid_dir)
    spec.loader.exec_module(module)
    grid = module.get_grid()
    missing = {"base", "stages", "steps", "seeds", "eval", "runs"} - set(grid)
    if missing:
        raise ValueError(f"grid {path} lacks {sorted(missing)}")
    ids = [r["id"] for r in grid["runs"]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"grid {path}: run ids repeat: {ids}")
    return grid


def run_dir(workdir: str, run: dict, seed: int) -> str:
    return os.path.join(workdir, f"{run['id']}_seed{seed}")


def run_overrides(grid: dict, run: dict) -> dict:
    """The grid's shared overrides, then the run's own (which win)."""
    return {**grid.get("overrides", {}), **run["overrides"]}


def stage_overrides(grid: dict, run: dict, seed: int, stage: str, init_from: str) -> list[str]:
    """The `key=value` overrides of one stage of one run: `run_overrides`, the seed, the step budget,
    init_from."""
    out = [f"{k}={v}" for k, v in run_overrides(grid, run).items()]
    out += [f"seed={seed}", f"data.seed={seed}", f"train.total_steps={grid['steps'][stage]}"]
    if init_from:
        out.append(f"init_from={init_from}")
    return out


def _meta(grid, run, seed):
    return {"id": run["id"], "attention": run["attention"], "rope": run["rope"], "seed": seed,
            "steps": {s: grid["steps"][s] for s in grid["stages"]},
            "overrides": run_overrides(grid, run),
            "base": grid["base"], "eval": grid["eval"]}


def run_grid(grid: dict, workdir: str, *, train_fn=None, eval_fn=None, log=print) -> list[dict]:
    """Trains and evaluates every run x seed in order (skipping finished ones); returns their metas."""
    from neo_jax import config as config_lib

    train_fn = train_fn or _train
    eval_fn = eval_fn or _evaluate
    done = []
    for run in grid["runs"]:
        for seed in grid["seeds"]:
            rdir = run_dir(workdir, run, seed)
            meta = _meta(grid, run, seed)
            os.makedirs(rdir, exist_ok=True)
            with open(os.path.join(rdir, "run.json"), "w") as f:
                json.dump(meta, f, indent=1)
            if os.path.exists(os.path.join(rdir, "eval.json")):
                log(f"sweep: {os.path.basename(rdir)} already evaluated, skipped")
                done.append(meta)
                continue
            prev = ""
            for stage in grid["stages"]:
                cfg = config_lib.load(f"{grid['base']}:{stage}", stage_overrides(grid, run, seed, stage, prev))
                log(f"sweep: training {os.path.basename(rdir)} stage {stage} ({grid['steps'][stage]} steps)")
                sdir = os.path.join(rdir, stage)
                train_fn(cfg, sdir)
                prev = sdir
            eval_fn(prev, grid["eval"], os.path.join(rdir, "eval.json"))
            done.append(meta)
    return done


def emit_commands(grid: dict, workdir: str, prefix: str = "") -> list[str]:
    """One shell line per run x seed: its stages' `neo-jax train` and the `neo-jax eval`, chained by &&.
    Each run's run.json (what `--collect` reads) is written now when the workdir is local."""
    lines = []
    for run in grid["runs"]:
        for seed in grid["seeds"]:
            rdir = run_dir(workdir, run, seed)
            if "://" not in workdir:
                os.makedirs(rdir, exist_ok=True)
                with open(os.path.join(rdir, "run.json"), "w") as f:
                    json.dump(_meta(grid, run, seed), f, indent=1)
            cmds, prev = [], ""
            for stage in grid["stages"]:
                sdir = os.path.join(rdir, stage)
                over = " ".join(shlex.quote(f"--config.{o}") for o in stage_overrides(grid, run, seed, stage, prev))
                cmds.append(f"neo-jax train --config {grid['base']}:{stage} --workdir {shlex.quote(sdir)} {over}")
                prev = sdir
            cmds.append(f"neo-jax eval --ckpt {shlex.quote(prev)} --data {shlex.quote(grid['eval'])} "
                        f"--out {shlex.quote(os.path.join(rdir, 'eval.json'))}")
            line = " && ".join(cmds)
            lines.append(f"{prefix} {shlex.quote(line)}" if prefix else line)
    return lines


def _train(cfg, workdir):
    from neo_jax.train.loop import train

    train(cfg, workdir)


def _evaluate(ckpt: str, data: str, out: str, batch_size: int = 16):
    """`neo-jax eval --ckpt ckpt --data data --out out`, in process."""
    from neo_jax import cli

    rc = cli.main(["eval", "--ckpt", ckpt, "--data", data, "--out", out, "--batch-size", str(batch_size)])
    if rc:
        raise RuntimeError(f"neo-jax eval failed for {ckpt} (exit {rc})")


def _mean_std(xs):
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def collect(grid: dict, workdir: str) -> dict:
    """Reads every run's eval.json; writes <workdir>/table.md (mean ± sample std over seeds, per category and
    on average) and table.csv (one line per run x seed). Missing runs are listed, never silently dropped."""
    per_run, rows_csv, missing, chance = {}, [], [], {}
    for run in grid["runs"]:
        for seed in grid["seeds"]:
            path = os.path.join(run_dir(workdir, run, seed), "eval.json")
            if not os.path.exists(path):
                missing.append(os.path.basename(os.path.dirname(path)))
                continue
            with open(path) as f:
                summary = json.load(f)["summary"]
            res = next(iter(summary.values())) if len(summary) == 1 else _merge(summary)
            cats = {k: v["accuracy"] for k, v in res["by_category"].items()}
            chance.update({k: v["chance"] for k, v in res["by_category"].items() if "chance" in v})
            if "chance" in res:
                chance["avg"] = res["chance"]
            per_run.setdefault(run["id"], []).append((seed, cats, res["accuracy"]))
            rows_csv.append({"id": run["id"], "attention": run["attention"], "rope": run["rope"], "seed": seed,
                             "steps": "+".join(f"{s}:{grid['steps'][s]}" for s in grid["stages"]),
                             **{c: f"{100 * v:.2f}" for c, v in cats.items()}, "avg": f"{100 * res['accuracy']:.2f}"})
    cats = sorted({c for r in per_run.values() for _, cs, _ in r for c in cs})
    head = ["ID", "Attention", "RoPE", *cats, "Avg.", "steps", "seeds"]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run in grid["runs"]:
        if run["id"] not in per_run:
            continue
        rs = per_run[run["id"]]
        cells = []
        for c in cats:
            xs = [cs[c] for _, cs, _ in rs if c in cs]
            m, sd = _mean_std(xs) if xs else (float("nan"), 0.0)
            cells.append(f"{100 * m:.1f} ± {100 * sd:.1f}")
        m, sd = _mean_std([a for *_, a in rs])
        steps = "+".join(f"{grid['steps'][s]} {s}" for s in grid["stages"])
        md.append("| " + " | ".join([run["id"], run["attention"], run["rope"], *cells, f"**{100 * m:.1f} ± "
                                     f"{100 * sd:.1f}**", steps, ",".join(str(s) for s, *_ in rs)]) + " |")
    if per_run and set(cats) | {"avg"} <= set(chance):  # e.g. the synthetic split: what guessing would score
        md.append("| - | - | chance | " + " | ".join(f"{100 * chance[c]:.1f}" for c in cats) +
                  f" | {100 * chance['avg']:.1f} | | |")
    if missing:
        md.append(f"\nMissing (not yet evaluated): {', '.join(missing)}")
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    fields = ["id", "attention", "rope", "seed", "steps", *cats, "avg"]
    with open(os.path.join(workdir, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows_csv)
    return {"markdown": "\n".join(md), "rows": rows_csv, "missing": missing}


def _merge(summary):
    """Several benchmarks in one eval.json: one category per benchmark, Avg. = mean of benchmark accuracies."""
    cats = {k: {"accuracy": v["accuracy"]} for k, v in summary.items()}
    return {"by_category": cats, "accuracy": sum(v["accuracy"] for v in summary.values()) / len(summary)}


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run / emit / collect an ablation grid (configs/ablations/)")
    p.add_argument("--grid", required=True, help="a grid file, e.g. configs/ablations/cpu_repro.py")
    p.add_argument("--workdir", required=True, help="one sub-directory per run x seed; table.md/.csv here")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--emit", action="store_true", help="print one launch command per run instead of running")
    mode.add_argument("--collect", action="store_true", help="only gather finished runs into the table")
    p.add_argument("--prefix", default="", help="with --emit: put this before each (quoted) command line")
    p.add_argument("--only", default="", help="comma-separated run ids to keep (default: all)")
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    try:
        grid = load_grid(args.grid)
    except (FileNotFoundError, ValueError) as e:
        print(f"neo-jax sweep: {e}", file=sys.stderr)
        return 2
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {r["id"] for r in grid["runs"]}
        if unknown:
            print(f"neo-jax sweep: --only names unknown runs {sorted(unknown)}", file=sys.stderr)
            return 2
        grid["runs"] = [r for r in grid["runs"] if r["id"] in keep]
    if args.emit:
        print("\n".join(emit_commands(grid, args.workdir, args.prefix)))
        return 0
    if not args.collect:
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("neo_jax").setLevel(logging.INFO)
        run_grid(grid, args.workdir, log=lambda m: print(m, file=sys.stderr))
    table = collect(grid, args.workdir)
    print(table["markdown"])
    print(f"tables: {os.path.join(args.workdir, 'table.md')} and table.csv")
    return 0
