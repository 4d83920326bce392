"""`neo-jax data build`: annotation file -> ArrayRecord shards of self-contained records."""
from __future__ import annotations


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="data tools")
    sub = data.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser("build", help="convert JSON/JSONL annotations + images into ArrayRecord shards")
    build.add_argument("--annotations", required=True, help="official .json or .jsonl annotation file")
    build.add_argument("--root", default="", help="directory the image paths are relative to")
    build.add_argument("--out", required=True, help="output directory for the shards")
    build.add_argument("--shards", type=int, default=8, help="number of shard files")
    build.add_argument("--workers", type=int, default=2, help="parallel writer processes")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(func=_build)


def _build(args) -> int:
    from neo_jax.data.sources import build_shards

    result = build_shards(args.annotations, args.root, args.out, args.shards, args.workers,
                          progress=not args.no_progress)
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(result["skipped"].items())) or "none"
    print(f"wrote {result['written']} records to {len(result['files'])} shards in {args.out} "
          f"(skipped: {skipped})")
    return 0
