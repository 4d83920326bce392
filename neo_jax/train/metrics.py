"""What a run shows: a progress bar, TensorBoard event files and a JSONL log in the workdir.

    logger = MetricLogger(workdir, total_steps, cfg.log, first_step=start)
    logger.step(step, {"loss": ..., "lr": ..., "grad_norm": ...}, tokens=n, data_wait=t, data_stats=s)
    logger.close()

Per-step metrics are device scalars; they are fetched (one host sync) only every `log.every` steps, so
the host keeps dispatching ahead of the device. Derived rates (tokens/s, MFU, share of time waiting for
data) are computed over the window since the last write. Only process 0 writes files or draws the bar.
With a remote workdir (gs://...), whose objects cannot be appended to, the JSONL and TensorBoard files go
to a local directory (`log_dir`, logged at start) while checkpoints stay in the workdir.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

import jax
import ml_collections
import numpy as np


def log_config() -> ml_collections.ConfigDict:
    """`config.log`: how often and where metrics go."""
    c = ml_collections.ConfigDict()
    c.every = 10  # write metrics every this many steps (each write waits for the device)
    c.tensorboard = True  # event files in <workdir>/tensorboard
    c.progress = True  # tqdm bar on stderr
    return c


def log_dir(workdir) -> str:
    """Where the JSONL / TensorBoard files go: the workdir itself, or for a remote (URL) workdir a local
    directory named after it under ~/neo-jax-logs."""
    workdir = str(workdir)
    if "://" not in workdir:
        return workdir
    local = os.path.join(os.path.expanduser("~/neo-jax-logs"), re.sub(r"[^A-Za-z0-9._-]+", "_", workdir))
    logging.getLogger(__name__).warning("workdir %s is remote: metrics.jsonl and TensorBoard files go to %s",
                                        workdir, local)
    return local


class MetricLogger:
    """tqdm bar + tensorboardX + `metrics.jsonl`, written by process 0 only.

    Steps given `flops` (model FLOPs of that step, neo_jax.train.flops) add `flops_per_s_per_device`, and
    with `peak_flops` (per device) `mfu` = achieved FLOP/s over the peak of all devices."""

    def __init__(self, workdir, total_steps: int, cfg: ml_collections.ConfigDict | None = None, *,
                 first_step: int = 0, peak_flops: float | None = None, prefix: str = ""):
        cfg = cfg or log_config()
        self.every = max(int(cfg.every), 1)
        self.total = int(total_steps)
        self.devices = jax.device_count()
        self.peak = peak_flops * self.devices if peak_flops else None
        self.prefix = prefix
        self.writer = self.bar = self.jsonl = None
        self.history: list[dict] = []  # the rows written, for callers that want them (demo, tests)
        self._pending: list[tuple[int, dict]] = []
        self._window = dict(t0=time.perf_counter(), steps=0, tokens=0, wait=0.0, flops=0.0)
        if jax.process_index() != 0:
            return
        self.log_dir = log_dir(workdir)
        os.makedirs(self.log_dir, exist_ok=True)
        self.jsonl = open(os.path.join(self.log_dir, "metrics.jsonl"), "a")
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.log_dir, "tensorboard"))
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=first_step, desc=prefix or "train", unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def step(self, step: int, metrics: dict, *, tokens: int = 0, data_wait: float = 0.0, flops: float = 0.0,
             data_stats=None, force: bool = False) -> dict | None:
        """Records step `step` (1-based count of finished steps). Writes every `every` steps or with force;
        returns the written row then, else None. data_stats: a dict, or a callable giving one (called only
        when writing)."""
        self._pending.append((step, metrics))
        w = self._window
        w["steps"] += 1
        w["tokens"] += tokens
        w["wait"] += data_wait
        w["flops"] += flops
        if self.bar is not None:
            self.bar.update(1)
        if not force and step % self.every and step != self.total:
            return None
        return self.flush(data_stats)

    def flush(self, data_stats: dict | None = None) -> dict | None:
        if not self._pending:
            return None
        step, last = self._pending[-1]
        fetched = jax.device_get([m for _, m in self._pending])  # one sync for the whole window
        w = self._window
        dt = max(time.perf_counter() - w["t0"], 1e-9)
        row = {"step": int(step)}
        for k in last:  # the window's mean (the learning rate: its last value)
            vals = [np.asarray(m[k], np.float64) for m in fetched]
            row[k] = float(vals[-1] if k == "lr" else np.mean(vals))
        row["steps_per_s"] = w["steps"] / dt
        row["tokens_per_s"] = w["tokens"] / dt
        row["data_wait_frac"] = w["wait"] / dt
        if w["flops"]:
            row["flops_per_s_per_device"] = w["flops"] / dt / self.devices
            if self.peak:
                row["mfu"] = w["flops"] / dt / self.peak
        if callable(data_stats):
            data_stats = data_stats()
        for k, v in (data_stats or {}).items():
            row[f"data/{k}"] = float(v)
        self._pending.clear()
        self._window = dict(t0=time.perf_counter(), steps=0, tokens=0, wait=0.0, flops=0.0)
        self._write(row)
        return row

    def _write(self, row: dict):
        self.history.append(row)
        if jax.process_index() != 0:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"stage": self.prefix, **row} if self.prefix else row) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            tag = f"{self.prefix}/" if self.prefix else ""
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(tag + k, v, row["step"])
            self.writer.flush()
        if self.bar is not None:
            shown = {k: row[k] for k in ("loss", "lr", "grad_norm") if k in row}
            post = {k: f"{v:.3g}" for k, v in shown.items()}
            post["tok/s"] = f"{row['tokens_per_s']:.3g}"
            if "mfu" in row:
                post["mfu"] = f"{row['mfu']:.2%}"
            self.bar.set_postfix(post, refresh=False)

    def write_text(self, message: str):
        """A line that does not break the progress bar."""
        if jax.process_index() != 0:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self):
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.bar = self.writer = self.jsonl = None
