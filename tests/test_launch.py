"""Launch scripts: slice arithmetic, and the exact commands their --dry-run prints (gcloud is never run:
PATH is set to a directory holding only a failing `gcloud`/`xpk`/`kubectl`, so any real call fails)."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.tpu import slices

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,chips,hosts,runtime", [
    ("v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v5e-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v6e-256", 256, 64, "v2-alpha-tpuv6e"),
    ("v6e-4", 4, 1, "v2-alpha-tpuv6e"),
])
def test_slice_sizes(name, chips, hosts, runtime):
    s = slices.parse(name)
    assert (s.chips, s.hosts, s.runtime_version) == (chips, hosts, runtime)
    assert s.chips_per_host == (chips if hosts == 1 else 4)


@pytest.mark.parametrize("bad", ["v5p-7", "v5litepod-512", "v6e-6", "v3-8", "tpu-128", "v4-4"])
def test_bad_slice_names_say_why(bad):
    with pytest.raises(ValueError, match=bad.split("-")[0]):
        slices.parse(bad)


@pytest.fixture(scope="module")
def fake_path(tmp_path_factory):
    """gcloud / xpk / kubectl / git that fail loudly: a dry run must not call any of them."""
    d = tmp_path_factory.mktemp("bin")
    for tool in ("gcloud", "xpk", "kubectl", "git", "srun", "sbatch"):
        (d / tool).write_text(f"#!/bin/sh\necho 'dry run called {tool}' >&2\nexit 97\n")
        (d / tool).chmod(0o755)
    (d / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 98\n"
                                "echo gpu-a017; echo gpu-a018; echo gpu-a019\n")
    (d / "scontrol").chmod(0o755)
    return f"{d}:/usr/bin:/bin"


def run(argv, fake_path, env=None, ok=True):
    e = {"PATH": fake_path, "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    done = subprocess.run(argv, cwd=REPO, env=e, capture_output=True, text=True, timeout=60)
    assert "dry run called" not in done.stderr, done.stderr
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def commands(stdout):
    """Printed command lines (comments dropped), split like a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def flag(argv, name):
    hits = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(hits) == 1, (name, argv)
    return hits[0]


TPU = [sys.executable, "launch/tpu/tpu_vm.py"]


@pytest.mark.parametrize("accel,runtime,hosts", [("v5p-128", "v2-alpha-tpuv5", 16),
                                                 ("v5litepod-256", "v2-alpha-tpuv5-lite", 64),
                                                 ("v4-32", "tpu-ubuntu2204-base", 4)])
def test_tpu_vm_up_dry_run(fake_path, accel, runtime, hosts):
    done = run(TPU + ["up", "--dry-run", "--name", "neo", "--zone", "us-east5-a", "--project", "p",
                      "--accelerator", accel, "--spot", "--config", "configs/neo_2b.py:pt",
                      "--workdir", "gs://bkt/run", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_x=1", "--",
                      "--config.mesh.fsdp=8"], fake_path)
    assert f"{hosts} host(s) x" in done.stdout and f"all {hosts} worker(s)" in done.stdout
    create, describe, archive, scp, setup, train = commands(done.stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert flag(create, "accelerator-type") == accel and flag(create, "runtime-version") == runtime
    assert flag(create, "node-id") == "neo" and "--spot" in create and flag(create, "project") == "p"
    assert describe[4] == "describe" and archive[:2] == ["git", "-C"]
    assert scp[4] == "scp" and flag(scp, "worker") == "all"
    assert flag(setup, "worker") == "all" and "'jax[tpu]==0.10.2' -e" in flag(setup, "command") and "[gcs]" in flag(setup, "command")
    assert train[4] == "ssh" and flag(train, "worker") == "all"
    remote = flag(train, "command")
    assert "neo-jax train --config=configs/neo_2b.py:pt --workdir=gs://bkt/run --config.mesh.fsdp=8" in remote
    assert "LIBTPU_INIT_ARGS=--xla_tpu_x=1" in remote and "PYTHONUNBUFFERED=1" in remote
    assert "NEO_COORDINATOR" not in remote  # Cloud TPU: JAX discovers the hosts itself


def test_tpu_vm_other_subcommands(fake_path):
    base = ["--dry-run", "--name", "n", "--zone", "europe-west4-a"]
    (logs,) = commands(run(TPU + ["logs", *base, "--worker", "3"], fake_path).stdout)
    assert flag(logs, "worker") == "3" and "neo-train.log" in flag(logs, "command")
    (stop,) = commands(run(TPU + ["stop", *base], fake_path).stdout)
    assert flag(stop, "worker") == "all" and "kill -TERM" in flag(stop, "command")
    (delete,) = commands(run(TPU + ["delete", *base], fake_path).stdout)
    assert delete[3:6] == ["queued-resources", "delete", "n"] and "--quiet" in delete
    (copy,) = commands(run(TPU + ["ssh", *base, "--command", "gcloud storage cp -r gs://b/q /tmp/"],
                           fake_path).stdout)
    assert flag(copy, "worker") == "all" and flag(copy, "command") == "gcloud storage cp -r gs://b/q /tmp/"
    (clone,) = commands(run(TPU + ["install", *base, "--git", "https://x/neo.git", "--ref", "v1"],
                            fake_path).stdout)
    assert "git clone --quiet https://x/neo.git" in flag(clone, "command")


def test_tpu_vm_refuses_local_workdir_on_multihost(fake_path):
    args = ["train", "--dry-run", "--name", "n", "--zone", "z", "--config", "configs/tiny.py",
            "--workdir", "/tmp/run"]
    done = run(TPU + args + ["--accelerator", "v5p-16"], fake_path, ok=False)
    assert done.returncode != 0 and "gs://" in done.stderr and "2 hosts" in done.stderr
    run(TPU + args + ["--accelerator", "v5p-8"], fake_path)  # one host: a local disk is fine
    bad = run(TPU + args + ["--accelerator", "v5p-8", "--", "--mesh.fsdp=2"], fake_path, ok=False)
    assert "--config.key=value" in bad.stderr


XPK = [sys.executable, "launch/tpu/xpk.py"]


@pytest.mark.parametrize("accel,slices_,pods", [("v5p-128", 1, 16), ("v6e-256", 2, 128)])
def test_xpk_dry_run(fake_path, accel, slices_, pods):
    scope = ["--cluster", "c", "--zone", "us-east5-a"]
    (create,) = commands(run(XPK + ["cluster-create", "--dry-run", *scope, "--accelerator", accel,
                                    "--num-slices", str(slices_)], fake_path).stdout)
    assert create[:3] == ["xpk", "cluster", "create"] and flag(create, "tpu-type") == accel
    done = run(XPK + ["run", "--dry-run", *scope, "--accelerator", accel, "--num-slices", str(slices_),
                      "--workload", "w1", "--config", "configs/neo_9b.py:sft", "--workdir", "gs://b/sft",
                      "--docker-image", "gcr.io/p/neo:1", "--", "--config.mesh.fsdp=-1"], fake_path)
    assert f"{pods} pod(s)" in done.stdout
    (submit,) = commands(done.stdout)
    assert submit[:3] == ["xpk", "workload", "create"] and flag(submit, "num-slices") == str(slices_)
    assert flag(submit, "docker-image") == "gcr.io/p/neo:1" and flag(submit, "workload") == "w1"
    assert flag(submit, "command").endswith(
        "neo-jax train --config=configs/neo_9b.py:sft --workdir=gs://b/sft --config.mesh.fsdp=-1")
    get_creds, follow = commands(run(XPK + ["logs", "--dry-run", *scope, "--workload", "w1"], fake_path).stdout)
    assert flag(get_creds, "region") == "us-east5" and flag(follow, "selector").endswith("=w1")


def test_slurm_dry_run(fake_path):
    env = {"CONFIG": "configs/neo_2b.py:pt", "WORKDIR": "/lustre/runs/a", "SLURM_JOB_NODELIST": "gpu-a[017-019]",
           "SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": "1", "SLURM_SUBMIT_DIR": str(REPO)}
    out = run(["bash", "launch/gpu/train.sbatch", "--dry-run", "--config.mesh.fsdp=24"], fake_path, env).stdout
    assert "NEO_COORDINATOR=gpu-a017:12345 NEO_NUM_PROCESSES=3 NEO_PER_GPU=0" in out
    srun = commands(out)[-1]
    assert srun[0] == "srun" and flag(srun, "ntasks") == "3" and flag(srun, "nodes") == "3"
    assert srun[srun.index("train") - 2].endswith("launch/gpu/task.sh")
    assert srun[-3:] == ["--config=configs/neo_2b.py:pt", "--workdir=/lustre/runs/a", "--config.mesh.fsdp=24"]
    per_gpu = run(["bash", "launch/gpu/train.sbatch", "--dry-run"], fake_path,
                  {**env, "SLURM_NTASKS_PER_NODE": "8", "PER_GPU": "1"}).stdout
    assert "NEO_NUM_PROCESSES=24 NEO_PER_GPU=1" in per_gpu
    missing = run(["bash", "launch/gpu/train.sbatch", "--dry-run"], fake_path,
                  {k: v for k, v in env.items() if k != "WORKDIR"}, ok=False)
    assert missing.returncode != 0 and "WORKDIR" in missing.stderr


def test_slurm_task_sets_process_id_and_gpu(fake_path):
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "NEO_PER_GPU": "1"}
    out = run(["bash", "launch/gpu/task.sh", "sh", "-c", "echo $NEO_PROCESS_ID $CUDA_VISIBLE_DEVICES"],
              fake_path, env).stdout
    assert out.split() == ["5", "1"]


def test_single_node_dry_run(fake_path):
    out = run(["bash", "launch/gpu/single_node.sh", "--dry-run", "configs/neo_9b.py:sft", "/data/r",
               "--config.mesh.fsdp=8"], fake_path).stdout
    assert commands(out)[-1] == ["neo-jax", "train", "--config=configs/neo_9b.py:sft", "--workdir=/data/r",
                                 "--config.mesh.fsdp=8"]
