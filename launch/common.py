"""Helpers shared by the launch scripts: print-or-run commands, `KEY=VALUE` env flags, path checks.

Every script builds the exact argv lists it would execute and hands them to `Runner`; with `--dry-run`
the runner prints them (shell-quoted, one per line, ready to paste) and executes nothing, so the tests
and a cautious user see precisely what would reach gcloud / xpk / kubectl.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time


class Runner:
    """Runs argv lists, or prints them when `dry_run` is set. `out` receives the printed lines."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def note(self, text: str) -> None:
        """A comment line (slice facts, what a step does); printed in both modes."""
        print(f"# {text}", file=self.out, flush=True)

    def run(self, argv: list[str], *, check: bool = True, capture: bool = False) -> str:
        print(shlex.join(argv), file=self.out, flush=True)
        if self.dry_run:
            return ""
        done = subprocess.run(argv, check=False, text=True, capture_output=capture)
        if check and done.returncode:
            detail = f": {done.stderr.strip()}" if capture and done.stderr else ""
            raise SystemExit(f"command failed with exit status {done.returncode}: {shlex.join(argv)}{detail}")
        return done.stdout if capture else ""

    def poll(self, argv: list[str], done, *, every_s: float, timeout_s: float, what: str) -> str:
        """Re-runs `argv` (captured) until `done(stdout)` is true; gives up after `timeout_s`."""
        if self.dry_run:
            self.note(f"repeat every {every_s:g}s until {what} (at most {timeout_s:g}s):")
            return self.run(argv)
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.run(argv, capture=True, check=False).strip()
            if done(out):
                return out
            if time.monotonic() > deadline:
                raise SystemExit(f"gave up after {timeout_s:g}s waiting for {what} (last: {out!r})")
            time.sleep(every_s)


def env_pair(text: str) -> tuple[str, str]:
    """argparse type for `--env KEY=VALUE`."""
    key, sep, value = text.partition("=")
    if not sep or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
        raise argparse.ArgumentTypeError(f"--env {text!r} must look like NAME=value (NAME: letters, digits, _)")
    return key, value


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(script arguments, trainer config overrides): everything after a bare `--` goes to `neo-jax train`."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def config_overrides(items: list[str]) -> list[str]:
    """Extra arguments passed through to `neo-jax train`: each must be `--config.key=value`."""
    bad = [i for i in items if not i.startswith("--config.")]
    if bad:
        raise SystemExit(f"unexpected arguments {bad}: pass config overrides as --config.key=value after '--'")
    return items


def check_shared_path(path: str, what: str, hosts: int, allow_local: bool) -> None:
    """Multi-host runs need a directory every host sees (Cloud Storage, or a mount the user vouches for)."""
    if hosts > 1 and not path.startswith("gs://") and not allow_local:
        raise SystemExit(f"{what} {path!r} is a local path, but the slice has {hosts} hosts that must all read "
                         f"and write the same directory: use gs://bucket/... (or pass --allow-local-paths for a "
                         f"shared mount such as Filestore/NFS)")


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the exact commands, run nothing (gcloud/xpk/kubectl are never called)")
