"""One process of the multi-host test (tests/test_multihost.py), started by subprocess.

    python tests/multihost_worker.py --out r.json --workdir W --devices 4                      # 1 process
    python tests/multihost_worker.py --out r0.json --workdir W --devices 2 \\
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0                          # (and id 1)

Every run uses the same global batch of 4 rows made of two per-host slices of the synthetic data (host h
of 2 reads records h, h+2, h+4, ...). With 2 processes each one builds only its own slice and hands it to
`jax.make_array_from_process_local_data`; the single process builds both and concatenates them, so both
runs train on identical global batches over a (data, fsdp, tensor) = (1, 2, 2) mesh of 4 CPU devices.

`--steps N` trains N steps from a fresh init and saves a checkpoint after `--save-at` steps into
`W/<run name>` (params, optimizer state, step, RNG, and the iterator position of each host slice).
`--restore DIR` then waits (at most `--wait-s`) until step `--save-at` is complete in DIR (written by
the other process layout, which may run at the same time), loads it onto this layout, sets each
slice's iterator to the saved position and trains one more step. Losses and the rows each process fed
go to `--out` as JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HOSTS = 2  # data slices of the global batch, in every layout


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--devices", type=int, required=True, help="fake CPU devices of this process")
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--save-at", type=int, default=2)
    p.add_argument("--restore", default=None)
    p.add_argument("--wait-s", type=float, default=150, help="how long to wait for --restore to appear")
    return p.parse_args(argv)


# configs/tiny.py with small synthetic rows, every parameter trained; also given to `neo-jax train` as
# --config.<override> by the test, so the CLI run and this worker train the same model on the same data.
OVERRIDES = [
    "mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.strategy=fsdp_tp",
    "train.trainable=all", "train.lr=0.003", "train.warmup_steps=1", "train.total_steps=1000",
    "data.sources=[{'kind': 'synthetic', 'split': 'train', 'size': 64, 'seed': 0, 'qtypes': ['caption', 'color']}]",
    "data.text_ratio=-1.0", "data.tokenizer=builtin", "data.loss_weighting=token",
    "data.seq_len=128", "data.patch_budget=128", "data.batch_size=4",
    "data.min_pixels=1024", "data.max_pixels=16384", "data.num_threads=1", "data.prefetch=2",
]


def small_config():
    from neo_jax import config

    return config.load("tiny", OVERRIDES)


def digest(batch) -> str:
    return hashlib.sha1(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()[:16]


class Batches:
    """Global batches of this layout: the host slices this process owns, in slice order."""

    def __init__(self, cfg, mesh):
        import jax
        from neo_jax.data.pipeline import make_pipeline

        self.mesh = mesh
        n = jax.process_count()
        if n not in (1, HOSTS):
            raise ValueError(f"worker runs with 1 or {HOSTS} processes, got {n}")
        self.slices = [jax.process_index()] if n == HOSTS else list(range(HOSTS))
        self.pipes = {h: make_pipeline(cfg, process_index=h, process_count=HOSTS) for h in self.slices}
        self.fed = []  # per step: {slice: digest of the rows this process fed}

    def next(self):
        import numpy as np
        from neo_jax.data.pipeline import to_global_arrays

        parts = {h: next(self.pipes[h]) for h in self.slices}
        self.fed.append({str(h): digest(b) for h, b in parts.items()})
        local = {k: np.concatenate([parts[h][k] for h in self.slices]) for k in parts[self.slices[0]]}
        return to_global_arrays(local, self.mesh)

    def state(self) -> dict:
        return {"slices": {str(h): self.pipes[h].get_state() for h in self.slices}}

    def set_state(self, saved: dict) -> None:
        for h in self.slices:
            self.pipes[h].set_state(saved["slices"][str(h)])


def saved_data_states(step_dir: Path) -> dict:
    """Iterator positions of every slice in a checkpoint written by any process count: read the
    per-process JSON files directly (the Checkpointer itself restores only with the same count)."""
    out = {}
    for f in sorted((step_dir / "data").glob("process_*-of-*.json")):
        out.update(json.loads(f.read_text())["slices"])
    if sorted(out) != [str(h) for h in range(HOSTS)]:
        raise FileNotFoundError(f"{step_dir}/data holds slices {sorted(out)}, expected {HOSTS}")
    return {"slices": out}


def wait_for_step(ckpt_lib, directory, step: int, cfg, wait_s: float):
    """A read-only Checkpointer over `directory` once `step` is complete there (the other layout may
    still be writing it); fails after `wait_s` instead of hanging."""
    deadline = time.monotonic() + wait_s
    source = None
    while source is None or step not in source.all_steps():
        if source is None and (Path(directory) / str(step)).is_dir():
            source = ckpt_lib.Checkpointer(directory, cfg.checkpoint, read_only=True)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} did not appear complete in {directory} within {wait_s}s")
        time.sleep(0.5)
    return source


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from neo_jax.parallel.mesh import initialize_distributed, make_mesh
    from neo_jax.train import checkpoint as ckpt_lib
    from neo_jax.train.step import create_train_state, make_train_step

    t_import = time.perf_counter() - t0
    initialize_distributed(a.coordinator, a.num_processes, a.process_id)
    assert jax.process_count() == a.num_processes and jax.device_count() == a.devices * a.num_processes
    cfg = small_config()
    mesh = make_mesh(cfg.mesh)
    state, shardings = create_train_state(cfg, mesh, cfg.seed)
    step_fn = make_train_step(cfg, mesh, shardings)
    batches = Batches(cfg, mesh)
    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "local_devices": jax.local_device_count(), "losses": [], "restored_losses": [],
              "seconds": {"import": t_import, "setup": time.perf_counter() - t0 - t_import}}

    name = "ckpt_1proc" if a.num_processes == 1 else f"ckpt_{a.num_processes}proc"
    ckpt = ckpt_lib.Checkpointer(Path(a.workdir) / name, cfg.checkpoint)
    for i in range(a.steps):
        state, metrics = step_fn(state, batches.next())
        result["losses"].append(float(metrics["loss"]))
        if i + 1 == a.save_at:
            ckpt.save(i + 1, state, data_state=batches.state(), config=cfg, force=True)
    ckpt.close()
    result["fed"] = batches.fed
    result["seconds"]["train"] = time.perf_counter() - t0

    if a.restore:
        source = wait_for_step(ckpt_lib, a.restore, a.save_at, cfg, a.wait_s)
        target = ckpt_lib.abstract(state, shardings)  # this layout's shardings
        restored, _, saved_cfg = source.restore(target, a.save_at, data=False)
        source.close()
        assert int(restored.step) == a.save_at and saved_cfg["data"]["batch_size"] == cfg.data.batch_size
        batches = Batches(cfg, mesh)
        batches.set_state(saved_data_states(Path(a.restore) / str(a.save_at)))
        restored, metrics = step_fn(restored, batches.next())
        result["restored_losses"].append(float(metrics["loss"]))
        result["restored_fed"] = batches.fed
    result["seconds"]["total"] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
