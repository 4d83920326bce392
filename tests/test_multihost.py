"""Two CPU processes joined by `jax.distributed.initialize` (coordinator on 127.0.0.1) train exactly like
one process holding all the devices, each reading only its own data slice, and each layout restores the
checkpoint the other wrote (tests/multihost_worker.py does the work; see its docstring).

Both layouts run at the same time: one process with 4 fake CPU devices, and two processes with 2 each,
all on a (data, fsdp, tensor) = (1, 2, 2) mesh with the same global batch. Every wait is bounded; a hang
kills the processes and fails the test.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
STEPS, SAVE_AT = 2, 1
TIMEOUT_S = 240  # whole test; on a quiet 2-core machine it takes about a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(out, workdir, devices, restore, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    argv = [sys.executable, str(WORKER), "--out", str(out), "--workdir", str(workdir), "--devices",
            str(devices), "--steps", str(STEPS), "--save-at", str(SAVE_AT), "--restore", str(restore),
            "--wait-s", str(TIMEOUT_S - 30), *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = {
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
    return {name: json.loads((work / f"{name}.json").read_text()) for name in procs}


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
