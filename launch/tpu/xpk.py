#!/usr/bin/env python3
"""Train neo-jax as an XPK workload on GKE TPU node pools (one or more slices).

    python launch/tpu/xpk.py cluster-create --cluster neo --zone us-east5-a --accelerator v5p-128
    python launch/tpu/xpk.py run --cluster neo --zone us-east5-a --accelerator v5p-128 \\
        --workload neo-2b-pt --config configs/neo_2b.py:pt --workdir gs://my-bucket/neo_2b_pt \\
        -- --config.mesh.fsdp=64
    python launch/tpu/xpk.py logs   --cluster neo --zone us-east5-a --workload neo-2b-pt
    python launch/tpu/xpk.py delete --cluster neo --zone us-east5-a --workload neo-2b-pt [--cluster-too]

Every subcommand takes --dry-run (prints the exact xpk / gcloud / kubectl commands, runs none).
The container either comes ready-made (--docker-image, e.g. built from launch/tpu/Dockerfile) or xpk builds
it from --base-docker-image plus this checkout (--script-dir), and the command installs neo-jax first.
A preempted or failed pod restarts the whole JobSet (--max-restarts); `neo-jax train` then resumes from
the latest checkpoint in the gs:// workdir.
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
ENV = {"PYTHONUNBUFFERED": "1", "TPU_STDERR_LOG_LEVEL": "2", "TPU_MIN_LOG_LEVEL": "2"}


def _scope(a) -> list[str]:
    return [f"--cluster={a.cluster}", f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def _region(zone: str) -> str:
    return zone.rsplit("-", 1)[0]  # us-east5-a -> us-east5 (xpk clusters are regional)


def cluster_create(a, r: Runner) -> None:
    s = parse(a.accelerator)
    r.note(s.describe() + f"; {a.num_slices} slice(s)")
    argv = ["xpk", "cluster", "create", *_scope(a), f"--tpu-type={s.name}", f"--num-slices={a.num_slices}"]
    if a.spot:
        argv.append("--spot")
    elif a.reservation:
        argv.append(f"--reservation={a.reservation}")
    else:
        argv.append("--on-demand")
    r.run(argv)


def workload_command(a) -> str:
    """What every pod runs (cwd: the image's copy of the checkout)."""
    env = dict(ENV)
    env.update(dict(a.env or []))
    train = ["neo-jax", "train", f"--config={a.config}", f"--workdir={a.workdir}", *config_overrides(a.overrides)]
    line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(train)
    if a.docker_image:
        return line
    install = shlex.join(["pip", "install", "--quiet", f"jax[tpu]=={a.jax_version}", "-e", ".[gcs]"])
    return f"{install} && {line}"


def run(a, r: Runner) -> None:
    s = parse(a.accelerator)
    hosts = s.hosts * a.num_slices
    r.note(s.describe() + f"; {a.num_slices} slice(s) = {hosts} pod(s), one neo-jax process each")
    check_shared_path(a.workdir, "--workdir", hosts, a.allow_local_paths)
    argv = ["xpk", "workload", "create", *_scope(a), f"--workload={a.workload}", f"--tpu-type={s.name}",
            f"--num-slices={a.num_slices}", f"--max-restarts={a.max_restarts}"]
    if a.docker_image:
        argv.append(f"--docker-image={a.docker_image}")
    else:
        argv += [f"--base-docker-image={a.base_docker_image}", f"--script-dir={a.source}"]
    argv.append(f"--command={workload_command(a)}")
    r.run(argv)


def logs(a, r: Runner) -> None:
    r.run(["gcloud", "container", "clusters", "get-credentials", a.cluster, f"--region={_region(a.zone)}"]
          + ([f"--project={a.project}"] if a.project else []))
    r.run(["kubectl", "logs", "--follow", "--prefix", f"--max-log-requests={a.max_log_requests}",
           f"--selector=jobset.sigs.k8s.io/jobset-name={a.workload}"], check=False)


def delete(a, r: Runner) -> None:
    r.run(["xpk", "workload", "delete", *_scope(a), f"--workload={a.workload}"])
    if a.cluster_too:
        r.run(["xpk", "cluster", "delete", *_scope(a)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        c = sub.add_parser(name, help=help)
        c.set_defaults(func=func)
        c.add_argument("--cluster", required=True)
        c.add_argument("--zone", required=True)
        c.add_argument("--project", default=None)
        add_dry_run(c)
        return c

    c = command("cluster-create", cluster_create, "create a GKE cluster with TPU node pools")
    c.add_argument("--accelerator", required=True, help="e.g. v5p-128, v5litepod-256, v6e-256, v4-32")
    c.add_argument("--num-slices", type=int, default=1)
    c.add_argument("--spot", action="store_true")
    c.add_argument("--reservation", default=None)

    w = command("run", run, "submit the training workload")
    w.add_argument("--workload", required=True, help="workload (JobSet) name")
    w.add_argument("--accelerator", required=True)
    w.add_argument("--num-slices", type=int, default=1, help="> 1: multislice over DCN (data axis)")
    w.add_argument("--config", required=True, help="e.g. configs/neo_2b.py:pt (inside the image's checkout)")
    w.add_argument("--workdir", required=True, help="gs://bucket/run")
    w.add_argument("--env", type=env_pair, action="append", help="extra NAME=value for the trainer")
    w.add_argument("--docker-image", default=None, help="prebuilt image with neo-jax (launch/tpu/Dockerfile)")
    w.add_argument("--base-docker-image", default="python:3.11-slim", help="used when no --docker-image")
    w.add_argument("--source", type=Path, default=REPO, help="checkout xpk copies into the image")
    w.add_argument("--jax-version", default="0.10.2")
    w.add_argument("--max-restarts", type=int, default=10, help="JobSet restarts (preemptions) before failing")
    w.add_argument("--allow-local-paths", action="store_true")

    lg = command("logs", logs, "follow the workload's pod logs")
    lg.add_argument("--workload", required=True)
    lg.add_argument("--max-log-requests", type=int, default=64)

    d = command("delete", delete, "delete the workload (and the cluster with --cluster-too)")
    d.add_argument("--workload", required=True)
    d.add_argument("--cluster-too", action="store_true")
    return p


def main(argv=None) -> int:
    argv, extra = split_overrides(list(sys.argv[1:] if argv is None else argv))
    a = build_parser().parse_args(argv)
    a.overrides = extra
    if extra and a.command != "run":
        raise SystemExit(f"config overrides {extra} only apply to run")
    if getattr(a, "num_slices", 1) < 1:
        raise SystemExit(f"--num-slices={a.num_slices} must be >= 1")
    a.func(a, Runner(a.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
