"""`neo-jax train` and `neo-jax demo`.

    neo-jax train --config configs/neo_2b.py:pt --workdir gs://bucket/run1 [--config.x=y ...]
    neo-jax train --config configs/neo_2b.py:mt --workdir W2 --config.init_from=W1   # next stage
    neo-jax demo --workdir /tmp/neo_demo                                           # pt -> mt -> sft + eval

`train` resumes when the workdir holds a checkpoint (rerun the same command after a preemption).
"""
from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool = False) -> None:
    """neo_jax at INFO (or DEBUG), everything else (Orbax's absl chatter, grain) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("neo_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="train (or resume) one stage; --config.x=y overrides")
    t.add_argument("--config", required=True, help="config file and stage, e.g. configs/neo_2b.py:pt")
    t.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")
    t.add_argument("--stop-at", type=int, default=None,
                   help="save and stop after this step (the schedule still runs to train.total_steps)")
    t.add_argument("-v", "--verbose", action="store_true")
    t.set_defaults(func=_train, accepts_overrides=True)

    d = subparsers.add_parser("demo", help="train a small NEO from scratch on built-in data (pt -> mt -> sft) "
                                           "on the CPU and answer held-out questions")
    d.add_argument("--workdir", default="neo_demo", help="one sub-directory per stage (default ./neo_demo)")
    d.add_argument("--eval-size", type=int, default=600, help="held-out questions to answer at the end")
    d.add_argument("--config", default="demo", help="the demo config (its stages are run in order)")
    d.add_argument("-v", "--verbose", action="store_true")
    d.set_defaults(func=_demo, accepts_overrides=True)


def _train(args) -> int:
    setup_logging(args.verbose)
    from neo_jax import config
    from neo_jax.parallel.mesh import initialize_distributed

    initialize_distributed()
    cfg = config.load(args.config, args.overrides)
    from neo_jax.train.loop import train

    summary = train(cfg, args.workdir, stop_at=args.stop_at)
    last = summary["history"][-1] if summary["history"] else {}
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    status = "preempted at" if summary["preempted"] else "finished at"
    print(f"{status} step {summary['step']}{loss}; checkpoints in {summary['checkpoint']}")
    return 0


def _demo(args) -> int:
    setup_logging(args.verbose)
    if args.eval_size <= 0:
        print(f"neo-jax demo: --eval-size must be positive, got {args.eval_size}", file=sys.stderr)
        return 2
    from neo_jax.train.demo import run

    return 0 if run(args.workdir, eval_size=args.eval_size, overrides=args.overrides, spec=args.config) else 1
