"""`neo-jax` command line: each subcommand lives beside the code it drives.

A module listed in COMMANDS exposes `register(subparsers)`, which adds its parser(s) and sets
`func(args) -> int` as the parser default. Command modules keep heavy imports (jax, grain, torch) inside
their handlers so that building the parser stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing register(subparsers)
COMMANDS = {
    "data": "neo_jax.data.cli",
    "plan": "neo_jax.train.plan",
    "convert": "neo_jax.convert.cli",
    "train": "neo_jax.train.cli",
    "demo": "neo_jax.train.cli",
    "generate": "neo_jax.infer.cli",
    "eval": "neo_jax.eval.cli",
    "sweep": "neo_jax.eval.sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neo-jax", description="NEO native vision-language models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).register(sub)
    return parser


def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        print(f"neo-jax {args.command}: unrecognised arguments {extra}", file=sys.stderr)
        return 2
    args.overrides = [e[len("--config."):] if e.startswith("--config.") else e for e in extra]
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        print(f"neo-jax {args.command}: unrecognised arguments {bad} (config overrides look like "
              f"--config.model.dtype=bfloat16)", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
