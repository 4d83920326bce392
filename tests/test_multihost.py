"""Two CPU processes joined by `jax.distributed.initialize` (coordinator on 127.0.0.1) train exactly like
one process holding all the devices, each reading only its own data slice, and each layout restores the
checkpoint the other wrote (tests/multihost_worker.py does the work; see its docstring).

Both layouts run at the same time: one process with 4 fake CPU devices, and two processes with 2 each,
all on a (data, fsdp, tensor) = (1, 2, 2) mesh with the same global batch; next to them, `neo-jax train`
itself runs on two processes. Every wait is bounded; a hang kills the processes and fails the test.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.multihost_worker import OVERRIDES

WORKER = Path(__file__).with_name("multihost_worker.py")
STEPS, SAVE_AT = 2, 1
TIMEOUT_S = 360  # whole test; on a quiet 2-core machine it takes about a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and
           not k.startswith("NEO_")}
    return {**env, **extra}


def start_cli(workdir, coordinator, process_id):
    """`neo-jax train` itself, as the SLURM script starts it: NEO_* variables, no flags."""
    env = clean_env(NEO_COORDINATOR=coordinator, NEO_NUM_PROCESSES="2", NEO_PROCESS_ID=str(process_id),
                    XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                    JAX_DEFAULT_MATMUL_PRECISION="highest")
    overrides = OVERRIDES + ["log.every=1", "log.tensorboard=False", "log.progress=False"]
    argv = [sys.executable, "-m", "neo_jax.cli", "train", "--config", "tiny", "--workdir", str(workdir),
            "--stop-at", str(STEPS), *(f"--config.{o}" for o in overrides)]
    return subprocess.Popen(argv, env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def start(out, workdir, devices, restore, *extra):
    env = clean_env()
    argv = [sys.executable, str(WORKER), "--out", str(out), "--workdir", str(workdir), "--devices",
            str(devices), "--steps", str(STEPS), "--save-at", str(SAVE_AT), "--restore", str(restore),
            "--wait-s", str(TIMEOUT_S - 30), *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost")
    coordinator = f"127.0.0.1:{free_port()}"
    cli_coordinator = f"127.0.0.1:{free_port()}"
    procs = {
        "cli0": start_cli(work / "cli", cli_coordinator, 0),
        "cli1": start_cli(work / "cli", cli_coordinator, 1),
        "single": start(work / "single.json", work, 4, work / "ckpt_2proc"),
        "p0": start(work / "p0.json", work, 2, work / "ckpt_1proc", "--coordinator", coordinator,
                    "--num-processes", "2", "--process-id", "0"),
        "p1": start(work / "p1.json", work, 2, work / "ckpt_1proc", "--coordinator", coordinator,
                    "--num-processes", "2", "--process-id", "1"),
    }
    logs = {}
    try:
        for name, p in procs.items():
            logs[name], _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-host workers did not finish within {TIMEOUT_S}s")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for name, p in procs.items():
        assert p.returncode == 0, f"worker {name} failed:\n{logs.get(name, '')[-4000:]}"
    out = {name: json.loads((work / f"{name}.json").read_text()) for name in procs if not name.startswith("cli")}
    out["cli"] = {"workdir": work / "cli", "log": logs["cli0"]}
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
    NEO_PROCESS_ID as launch/gpu/train.sbatch does) trains like the worker's single process, and the
    checkpoint it leaves holds each host's data position."""
    workdir, log = runs["cli"]["workdir"], runs["cli"]["log"]
    assert f"finished at step {STEPS}" in log, log[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], runs["single"]["losses"], rtol=1e-5)
    data = sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").glob("process_*"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
