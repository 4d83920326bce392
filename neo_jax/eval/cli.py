"""`neo-jax eval`: score a checkpoint on VLMEvalKit TSV benchmarks and the synthetic held-out split.

    neo-jax eval --ckpt /tmp/neo_demo/sft --data MMBench_DEV_EN.tsv --data POPE.tsv --out results.json
    neo-jax eval --ckpt /tmp/neo_demo/sft --data synthetic:500      # built-in held-out split, 500 questions

Answers are decoded greedily in batches (neo_jax/infer/generate.py) with prompts built exactly as
`neo-jax generate` builds them; the last batch is padded to the batch size so one compiled decoder serves
the run. The printed table and the JSON (summary + every prediction) are written per benchmark.
"""
from __future__ import annotations

import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on VLMEvalKit TSV files / synthetic data")
    p.add_argument("--ckpt", required=True, help="training workdir (or its checkpoints/ directory)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--data", action="append", required=True,
                   help="a VLMEvalKit .tsv, or synthetic[:N[:seed]] for the built-in held-out split (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows of each benchmark")
    p.add_argument("--out", default="eval_results.json", help="results JSON path")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the run")
    p.set_defaults(func=_eval)


def load_rows(spec: str, limit: int | None):
    """(benchmark name, rows) of one --data value."""
    from neo_jax.eval import vlmeval

    if spec == "synthetic" or spec.startswith("synthetic:"):
        parts = spec.split(":")[1:]
        try:
            size = int(parts[0]) if parts and parts[0] else 200
            seed = int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            raise ValueError(f"--data {spec!r}: use synthetic[:N[:seed]] with integers") from None
        size = min(size, limit) if limit else size
        return "synthetic_test", vlmeval.synthetic_rows(size=size, seed=seed)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--data {spec!r}: no such file (a VLMEvalKit .tsv or synthetic[:N])")
    return os.path.splitext(os.path.basename(spec))[0], vlmeval.read_tsv(spec, limit)


def load_answer_fn(args):
    """answer_fn(prompts, images) -> answers for the checkpoint, greedy, batches padded to --batch-size."""
    from neo_jax.data.pipeline import check_token_ids
    from neo_jax.data.tokenizer import load_tokenizer
    from neo_jax.infer.cli import answer, load_model

    model_cfg, params, saved = load_model(args.ckpt, args.step)
    data = saved.get("data", {})
    tok = load_tokenizer(args.tokenizer or data.get("tokenizer", "builtin"))
    check_token_ids(tok, saved["model"])
    pixels = dict(min_pixels=int(data.get("min_pixels", 256 * 256)), max_pixels=int(data.get("max_pixels", 1024 ** 2)))

    def answer_fn(prompts, images):
        n = len(prompts)
        pad = args.batch_size - n
        out = answer(model_cfg, params, tok, list(prompts) + [prompts[-1]] * pad, list(images) + [images[-1]] * pad,
                     max_new_tokens=args.max_new_tokens, **pixels)
        return out[:n]

    return answer_fn


def _eval(args) -> int:
    from neo_jax.eval import vlmeval

    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        print(f"neo-jax eval: need --batch-size >= 1 (got {args.batch_size}), --max-new-tokens >= 1 (got "
              f"{args.max_new_tokens}), --limit >= 1 (got {args.limit})", file=sys.stderr)
        return 2
    try:
        benches = [load_rows(spec, args.limit) for spec in args.data]
    except (ValueError, FileNotFoundError) as e:
        print(f"neo-jax eval: {e}", file=sys.stderr)
        return 2
    answer_fn = load_answer_fn(args)
    results = {}
    for name, rows in benches:
        r = vlmeval.evaluate(rows, answer_fn, args.batch_size,
                             progress=lambda i, n, name=name: print(f"{name}: {i}/{n}", file=sys.stderr))
        if name == "synthetic_test":
            from neo_jax.data.synthetic import chance

            r["chance"] = sum(chance(row["category"]) for row in rows) / max(len(rows), 1)
            for category, v in r["by_category"].items():
                v["chance"] = chance(category)
        results[name] = r
    summary = {name: {k: v for k, v in r.items() if k != "predictions"} for name, r in results.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"ckpt": args.ckpt, "step": args.step, "summary": summary, "results": results}, f, indent=1)
    print(vlmeval.format_table(results))
    print(f"results: {args.out}")
    return 0
