"""Two CPU processes joined by `jax.distributed.initialize` (coordinator on 127.0.0.1) train exactly like
one process holding all the devices, each reading only its own data slice, and each layout restores the
checkpoint the other wrote (tests/multihost_worker.py does the work; see its docstring).

Both layouts run at the same time: one process with 4 fake CPU devices, and two processes with 2 each,
all on a (data, fsdp, tensor) = (1, 2, 2) mesh with the same global batch; next to them, `neo-jax train`
itself runs on two processes until SIGTERM reaches one of them. Every wait is bounded; a hang kills the processes and fails the test.
"""
import json
import os
import re
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.multihost_worker import OVERRIDES

WORKER = Path(__file__).with_name("multihost_worker.py")
STEPS, SAVE_AT = 2, 1
TIMEOUT_S = 360  # whole test; on a quiet 2-core machine it takes about a minute


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open until every port is picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and
           not k.startswith("NEO_")}
    return {**env, **extra}


def popen(argv, log, env, cwd=None):
    """Output to a file, not a pipe: a chatty process never blocks on a full pipe while we poll."""
    with open(log, "w") as f:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)


def start_cli(workdir, coordinator, process_id):
    """`neo-jax train` itself, as the SLURM script starts it: NEO_* variables, no flags. It runs until
    it is preempted (the fixture sends SIGTERM to process 1 once STEPS steps are logged)."""
    env = clean_env(NEO_COORDINATOR=coordinator, NEO_NUM_PROCESSES="2", NEO_PROCESS_ID=str(process_id),
                    XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                    JAX_DEFAULT_MATMUL_PRECISION="highest")
    overrides = OVERRIDES + ["log.every=1", "log.tensorboard=False", "log.progress=False"]
    argv = [sys.executable, "-m", "neo_jax.cli", "train", "--config", "tiny", "--workdir", str(workdir),
            *(f"--config.{o}" for o in overrides)]
    return popen(argv, workdir.with_suffix(f".{process_id}.log"), env, cwd=Path(__file__).resolve().parents[1])


def start(out, workdir, devices, restore, *extra):
    argv = [sys.executable, str(WORKER), "--out", str(out), "--workdir", str(workdir), "--devices",
            str(devices), "--steps", str(STEPS), "--save-at", str(SAVE_AT), "--restore", str(restore),
            "--wait-s", str(TIMEOUT_S - 30), *extra]
    return popen(argv, out.with_suffix(".log"), clean_env())


def logged_steps(metrics: Path) -> int:
    try:
        return len(metrics.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost")
    coordinator, cli_coordinator = (f"127.0.0.1:{p}" for p in free_ports(2))
    cli = work / "cli"
    procs = {
        "cli0": start_cli(cli, cli_coordinator, 0),
        "cli1": start_cli(cli, cli_coordinator, 1),
        "single": start(work / "single.json", work, 4, work / "ckpt_2proc"),
        "p0": start(work / "p0.json", work, 2, work / "ckpt_1proc", "--coordinator", coordinator,
                    "--num-processes", "2", "--process-id", "0"),
        "p1": start(work / "p1.json", work, 2, work / "ckpt_1proc", "--coordinator", coordinator,
                    "--num-processes", "2", "--process-id", "1"),
    }
    logs = {"cli0": cli.with_suffix(".0.log"), "cli1": cli.with_suffix(".1.log"), "single": work / "single.log",
            "p0": work / "p0.log", "p1": work / "p1.log"}
    deadline, signalled = time.monotonic() + TIMEOUT_S, False
    try:
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline:
                pytest.fail(f"multi-host processes did not finish within {TIMEOUT_S}s")
            if not signalled and logged_steps(cli / "metrics.jsonl") >= STEPS:
                procs["cli1"].send_signal(signal.SIGTERM)  # one host preempted
                signalled = True
            time.sleep(0.1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    text = {name: f.read_text() for name, f in logs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{text[name][-4000:]}"
    assert signalled, "neo-jax train finished before it could be preempted"
    out = {name: json.loads((work / f"{name}.json").read_text()) for name in ("single", "p0", "p1")}
    out["cli"] = {"workdir": cli, "logs": [text["cli0"], text["cli1"]]}
    return out


def test_two_processes_form_one_job(runs):
    for pid in (0, 1):
        r = runs[f"p{pid}"]
        assert (r["process_index"], r["process_count"], r["local_devices"]) == (pid, 2, 2)
    assert (runs["single"]["process_count"], runs["single"]["local_devices"]) == (1, 4)


def test_same_losses_as_one_process(runs):
    single = runs["single"]["losses"]
    assert len(single) == STEPS and single[-1] < single[0]  # it trains
    for pid in (0, 1):
        np.testing.assert_allclose(runs[f"p{pid}"]["losses"], single, rtol=1e-5)


def test_each_process_reads_only_its_slice(runs):
    for pid in (0, 1):
        fed = runs[f"p{pid}"]["fed"]
        assert all(list(step) == [str(pid)] for step in fed)
        assert [step[str(pid)] for step in fed] == [step[str(pid)] for step in runs["single"]["fed"]]
    assert runs["p0"]["fed"][0]["0"] != runs["p1"]["fed"][0]["1"]  # the slices differ


def test_checkpoints_restore_across_process_layouts(runs):
    """Saved after SAVE_AT steps by one layout, restored by the other: the next step's loss and rows are
    those of the uninterrupted run."""
    expected = runs["single"]["losses"][SAVE_AT]
    np.testing.assert_allclose(runs["single"]["restored_losses"], [expected], rtol=1e-5)  # from 2 processes
    for pid in (0, 1):  # 2 processes from the single-process checkpoint
        np.testing.assert_allclose(runs[f"p{pid}"]["restored_losses"], [expected], rtol=1e-5)
        assert runs[f"p{pid}"]["restored_fed"] == [runs[f"p{pid}"]["fed"][SAVE_AT]]
    assert runs["single"]["restored_fed"] == [runs["single"]["fed"][SAVE_AT]]


def test_neo_jax_train_cli_on_two_processes(runs):
    """The real entry point (`neo-jax train`, started with NEO_COORDINATOR / NEO_NUM_PROCESSES /
    NEO_PROCESS_ID as launch/gpu/train.sbatch does) trains like the worker's single process; SIGTERM to
    one of its processes stops both at the same step with one checkpoint holding each host's data position."""
    workdir, logs = runs["cli"]["workdir"], runs["cli"]["logs"]
    stops = [re.findall(r"preempted at step (\d+)", log) for log in logs]
    assert all(len(s) == 1 for s in stops) and stops[0] == stops[1], [log[-2000:] for log in logs]
    step = int(stops[0][0])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert step >= STEPS and [r["step"] for r in rows] == list(range(1, step + 1))
    np.testing.assert_allclose([r["loss"] for r in rows[:STEPS]], runs["single"]["losses"], rtol=1e-5)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step]
    data = sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("process_*"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
