"""The training loop: exact resume (params, optimizer, RNG, data position), resume onto another mesh, stage
chaining, metrics files, and SIGTERM in a real process leaving a restorable checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from neo_jax import config
from neo_jax.train import checkpoint as ckpt_lib
from neo_jax.train.loop import initial_params, train

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = [
    "data.sources=[{'kind': 'synthetic', 'size': 400, 'seed': 3}]", "data.seq_len=128", "data.patch_budget=128",
    "data.batch_size=8", "data.min_pixels=1024", "data.max_pixels=16384", "data.num_threads=1",
    "data.prefetch=4", "data.text_ratio=-1.0",
]
STEPS = 6


def tiny(stage="pt", extra=()):
    return config.load(f"tiny:{stage}", TINY_DATA + [
        f"train.total_steps={STEPS}", "train.warmup_steps=2", "train.lr=0.003", "log.every=1",
        "log.progress=False", "checkpoint.every=100", *extra])


def losses(summary):
    return [(r["step"], r["loss"]) for r in summary["history"]]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical train steps (the full, first-half and resumed runs) compile once: a persistent cache for
    this module only (executables are the same, so exactness is unaffected)."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    values = (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)
    for k, v in zip(keys, values):
        jax.config.update(k, v)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    summary = train(tiny(), str(workdir))
    return workdir, summary


def test_uninterrupted_run_writes_metrics_and_checkpoint(full_run):
    workdir, summary = full_run
    assert summary["step"] == STEPS and not summary["resumed"]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_frac", "flops_per_s_per_device",
                "data/pack_efficiency", "data/skip_bad_image", "data/records_read"):
        assert key in rows[-1], key
    assert 0 < rows[-1]["data/pack_efficiency"] <= 1
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [STEPS]


def test_resume_is_bit_exact_including_the_data_iterator(full_run, tmp_path):
    _, full = full_run
    first = train(tiny(), str(tmp_path), stop_at=STEPS // 2)
    assert first["step"] == STEPS // 2
    second = train(tiny(), str(tmp_path))  # a new process would do exactly this: restore and continue
    assert second["resumed"] and second["start_step"] == STEPS // 2
    assert losses(first) + losses(second) == losses(full)  # bit for bit
    for a, b in zip(jax.tree.leaves(second["state"].params), jax.tree.leaves(full["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_onto_a_different_mesh_and_next_stage(full_run, tmp_path):
    import shutil

    src, full = full_run
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    # The step-6 checkpoint of a (data=8) run, continued for 2 more steps on (data=2, fsdp=2, tensor=2).
    cfg = tiny(extra=["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.strategy=fsdp_tp",
                      f"train.total_steps={STEPS + 2}"])
    out = train(cfg, str(tmp_path))
    assert out["resumed"] and out["start_step"] == STEPS and out["step"] == STEPS + 2
    w = out["state"].params["llm"]
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(w))
    assert np.isfinite(losses(out)[-1][1])
    # Stage chaining: mt starts from those params with a fresh optimizer at step 0.
    mt = tiny("mt", extra=[f"init_from={tmp_path}", "train.total_steps=1"])
    chained = train(mt, str(tmp_path / "mt"))
    assert not chained["resumed"] and chained["start_step"] == 0 and chained["step"] == 1


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path):
    overrides = [f"--config.{o}" for o in TINY_DATA] + [
        "--config.train.total_steps=100000", "--config.log.every=1", "--config.log.progress=False",
        "--config.checkpoint.every=100000"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "neo_jax.cli", "train", "--config", "tiny:pt",
                             "--workdir", str(tmp_path), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted" in out, out
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True)
    step = ckpt.latest_step()
    logged = len(metrics.read_text().splitlines())
    assert step is not None and step >= 2 and step == logged
    params, saved = ckpt_lib.load_params(tmp_path)
    assert saved["stage"] == "pt" and saved["train"]["total_steps"] == 100000
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_params_checkpoints_and_training_runs_are_interchangeable(full_run, tmp_path):
    """convert's load_params reads a training workdir; init_from reads a params checkpoint."""
    from neo_jax.convert import checkpoint as params_ckpt

    src, full = full_run
    params, model_cfg = params_ckpt.load_params(str(src))
    want = full["state"].params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, want)
    params_ckpt.save_params(str(tmp_path / "p"), params, model_cfg)
    loaded = initial_params(tiny("sft", extra=[f"init_from={tmp_path / 'p'}"]), None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, want)
    with pytest.raises(ValueError, match="hidden_size"):
        initial_params(tiny("sft", extra=[f"init_from={tmp_path / 'p'}", "model.hidden_size=32"]), None)
