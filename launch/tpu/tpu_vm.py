#!/usr/bin/env python3
"""Train neo-jax on a Cloud TPU VM slice: create (queued resource), install, train, logs, stop, delete.

    python launch/tpu/tpu_vm.py up --name neo --zone us-east5-a --accelerator v5p-128 \\
        --config configs/neo_2b.py:pt --workdir gs://my-bucket/neo_2b_pt -- --config.mesh.fsdp=64
    python launch/tpu/tpu_vm.py logs   --name neo --zone us-east5-a
    python launch/tpu/tpu_vm.py ssh    --name neo --zone us-east5-a --command "df -h /tmp"
    python launch/tpu/tpu_vm.py stop   --name neo --zone us-east5-a     # SIGTERM: checkpoint, then exit
    python launch/tpu/tpu_vm.py delete --name neo --zone us-east5-a

Every subcommand takes --dry-run and then prints the exact gcloud commands without calling gcloud.
On the slice, every worker runs the same `neo-jax train`; JAX finds the other hosts by itself on Cloud TPU
(`jax.distributed.initialize()` with no arguments, called by neo_jax.parallel.mesh.initialize_distributed),
so no coordinator address is passed. Each host reads its own slice of the data and all hosts write one
Orbax checkpoint, hence the workdir (and data) must be on Cloud Storage (gs://) for multi-host slices.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from launch.common import (Runner, add_dry_run, check_shared_path, config_overrides, env_pair,  # noqa: E402
                           split_overrides)
from launch.tpu.slices import parse  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
REMOTE_DIR = "neo-jax"  # checkout on each worker, relative to $HOME
VENV = "~/neo-venv"
LOG = "~/neo-train.log"
PIDFILE = "~/neo-train.pid"
DEFAULT_ENV = {
    # Python-side logs without buffering, so `logs` follows them live.
    "PYTHONUNBUFFERED": "1",
    # libtpu's own log noise off the console (the training log stays readable).
    "TPU_STDERR_LOG_LEVEL": "2",
    "TPU_MIN_LOG_LEVEL": "2",
}


def _scope(a) -> list[str]:
    return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def ssh(a, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *_scope(a), f"--worker={worker}",
            f"--command={command}"]


# ------------------------------------------------------------------------------------------- subcommands


def create(a, r: Runner) -> None:
    s = parse(a.accelerator)
    r.note(s.describe())
    argv = ["gcloud", "compute", "tpus", "queued-resources", "create", a.queued_resource or a.name,
            f"--node-id={a.name}", *_scope(a), f"--accelerator-type={s.name}",
            f"--runtime-version={a.runtime_version or s.runtime_version}"]
    if a.spot:
        argv.append("--spot")
    if a.reserved:
        argv.append("--reserved")
    if a.valid_until_duration:
        argv.append(f"--valid-until-duration={a.valid_until_duration}")
    r.run(argv)


def wait(a, r: Runner) -> None:
    argv = ["gcloud", "compute", "tpus", "queued-resources", "describe", a.queued_resource or a.name,
            *_scope(a), "--format=value(state.state)"]
    r.poll(argv, lambda out: out == "ACTIVE", every_s=30, timeout_s=a.wait_timeout_s,
           what="the queued resource is ACTIVE")


def install(a, r: Runner) -> None:
    """Copy the code to every worker (git archive of HEAD, or a git clone there), then a Python venv with
    jax[tpu] and neo-jax with its [gcs] extra (gcsfs: etils.epath, hence Orbax's metadata, reaches gs:// through it).
    uv provides the Python: jax 0.10 needs >= 3.11, the TPU images ship 3.10."""
    if a.git:
        fetch = (f"rm -rf ~/{REMOTE_DIR} && git clone --quiet {shlex.quote(a.git)} ~/{REMOTE_DIR} && "
                 f"git -C ~/{REMOTE_DIR} checkout --quiet {shlex.quote(a.ref)}")
    else:
        archive = f"/tmp/neo-jax-{a.name}.tar.gz"
        r.note(f"committed files of {a.source} (HEAD); uncommitted edits are not shipped")
        r.run(["git", "-C", str(a.source), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
        r.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{a.name}:~/neo-jax.tar.gz",
               *_scope(a), "--worker=all"])
        fetch = f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/neo-jax.tar.gz -C ~/{REMOTE_DIR}"
    setup = " && ".join([
        "set -e",
        fetch,
        "python3 -m pip install --user --quiet uv",
        f"~/.local/bin/uv venv --quiet --allow-existing --python {a.python} {VENV}",
        f"~/.local/bin/uv pip install --quiet --python {VENV}/bin/python "
        f"'jax[tpu]=={a.jax_version}' -e ~/{REMOTE_DIR}'[gcs]'",
        f"{VENV}/bin/python -c 'import jax, neo_jax; print(\"jax\", jax.__version__, \"ok\")'",
    ])
    r.run(ssh(a, setup))


def train_command(a) -> str:
    """The shell line run on every worker: detached, logging to ~/neo-train.log, pid in ~/neo-train.pid."""
    env = dict(DEFAULT_ENV)
    env.update(dict(a.env or []))
    argv = [f"{VENV}/bin/neo-jax", "train", f"--config={a.config}", f"--workdir={a.workdir}",
            *config_overrides(a.overrides)]
    env_words = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    run = " ".join(shlex.quote(w) if not w.startswith("~/") else w for w in argv)
    return (f"cd ~/{REMOTE_DIR} && {env_words} setsid nohup {run} > {LOG} 2>&1 < /dev/null & "
            f"echo $! > {PIDFILE}")


def train(a, r: Runner) -> None:
    s = parse(a.accelerator)
    r.note(s.describe())
    check_shared_path(a.workdir, "--workdir", s.hosts, a.allow_local_paths)
    r.note(f"start neo-jax train on all {s.hosts} worker(s) at once; logs in {LOG} on each")
    r.run(ssh(a, train_command(a)))


def logs(a, r: Runner) -> None:
    r.run(ssh(a, f"tail -n +1 -F {LOG}", worker=a.worker), check=False)


def run_on_workers(a, r: Runner) -> None:
    r.run(ssh(a, a.command_line, worker=a.worker))


def stop(a, r: Runner) -> None:
    r.note("SIGTERM to the trainer on every worker: it saves a checkpoint at the next step, then exits")
    r.run(ssh(a, f"test -f {PIDFILE} && kill -TERM $(cat {PIDFILE}) || echo no trainer running"))


def delete(a, r: Runner) -> None:
    r.run(["gcloud", "compute", "tpus", "queued-resources", "delete", a.queued_resource or a.name,
           *_scope(a), "--force", "--quiet"])


def up(a, r: Runner) -> None:
    create(a, r)
    wait(a, r)
    install(a, r)
    train(a, r)


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help, *, slice_=False, code=False, run=False):
        c = sub.add_parser(name, help=help)
        c.set_defaults(func=func)
        c.add_argument("--name", required=True, help="TPU VM (node) name")
        c.add_argument("--zone", required=True)
        c.add_argument("--project", default=None, help="default: gcloud's configured project")
        c.add_argument("--queued-resource", default=None, help="queued resource id (default: --name)")
        add_dry_run(c)
        if slice_:
            c.add_argument("--accelerator", required=True, help="e.g. v4-32, v5litepod-256, v5p-128, v6e-256")
            c.add_argument("--runtime-version", default=None, help="default: the generation's JAX runtime")
            c.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
            c.add_argument("--reserved", action="store_true", help="use the project's reserved capacity")
            c.add_argument("--valid-until-duration", default=None, help="give up queueing after e.g. 6h")
            c.add_argument("--wait-timeout-s", type=float, default=6 * 3600)
        if code:
            c.add_argument("--source", type=Path, default=REPO, help="local checkout to ship (git archive HEAD)")
            c.add_argument("--git", default=None, help="instead: clone this repository URL on every worker")
            c.add_argument("--ref", default="main", help="branch/tag/commit for --git")
            c.add_argument("--python", default="3.11")
            c.add_argument("--jax-version", default="0.10.2")
        if run:
            if not slice_:
                c.add_argument("--accelerator", required=True, help="slice type (for the host count)")
            c.add_argument("--config", required=True, help="e.g. configs/neo_2b.py:pt (path inside the repo)")
            c.add_argument("--workdir", required=True, help="gs://bucket/run: checkpoints, metrics, logs")
            c.add_argument("--env", type=env_pair, action="append", help="extra NAME=value for the trainer")
            c.add_argument("--allow-local-paths", action="store_true",
                           help="accept a non-gs:// workdir on a multi-host slice (shared NFS/Filestore mount)")
        return c

    command("create", create, "queue a TPU VM slice", slice_=True)
    wt = command("wait", wait, "wait until the queued resource is ACTIVE")
    wt.add_argument("--wait-timeout-s", type=float, default=6 * 3600)
    command("install", install, "ship the code and install jax[tpu] + neo-jax on every worker", code=True)
    command("train", train, "start neo-jax train on every worker (detached)", run=True)
    command("up", up, "create + wait + install + train", slice_=True, code=True, run=True)
    lg = command("logs", logs, "follow a worker's training log")
    lg.add_argument("--worker", default="0", help="worker index, or 'all'")
    ex = command("ssh", run_on_workers, "run a shell command on the workers (e.g. copy weights from gs://)")
    ex.add_argument("--command", dest="command_line", required=True)
    ex.add_argument("--worker", default="all", help="worker index, or 'all'")
    command("stop", stop, "SIGTERM the trainers (checkpoint, then exit)")
    command("delete", delete, "delete the slice (queued resource and its VMs)")
    return p


def main(argv=None) -> int:
    argv, extra = split_overrides(list(sys.argv[1:] if argv is None else argv))
    a = build_parser().parse_args(argv)
    a.overrides = extra
    if extra and a.command not in ("train", "up"):
        raise SystemExit(f"config overrides {extra} only apply to train/up")
    a.func(a, Runner(a.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
