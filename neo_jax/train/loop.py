"""The training loop: mesh, state (fresh, resumed, or from a previous stage), data, steps, checkpoints.

    summary = train(cfg, workdir)        # resumes when workdir/checkpoints holds a complete step

Where the state comes from, first match wins:
  1. `workdir/checkpoints` has a complete step: everything is restored (params, optimizer, step, RNG,
     data position), laid out for the current mesh, so the run continues exactly.
  2. `cfg.init_from` names a previous stage's workdir (or its checkpoints dir) or a params checkpoint
     (`neo-jax convert qwen3 | import-hf --out`): its params only, with a fresh optimizer and step 0 (`mt`
     from `pt`, `sft` from `mt`). `qwen3:<hf_dir>` imports a Hugging Face Qwen3 LLM directly instead
     (post-LLM rule; pre-buffer and patch embedding fresh).
  3. A fresh init from `cfg.seed`.

A checkpoint is written every `checkpoint.every` steps, at the last step, at `stop_at`, and when the
process gets SIGTERM (then the loop stops after the current step).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np
from etils import epath

from neo_jax.data.pipeline import make_pipeline, to_global_arrays
from neo_jax.parallel import rules as R
from neo_jax.parallel.mesh import make_mesh
from neo_jax.train import checkpoint as ckpt_lib
from neo_jax.train.metrics import MetricLogger
from neo_jax.train import flops as flops_lib
from neo_jax.train.step import abstract_train_state, create_train_state, make_train_step

log = logging.getLogger(__name__)
QWEN3_PREFIX = "qwen3:"


def initial_params(cfg, param_shardings):
    """Params named by `cfg.init_from` placed on `param_shardings`, or None for a fresh init."""
    src = cfg.get("init_from", "")
    if not src:
        return None
    if src.startswith(QWEN3_PREFIX):
        from neo_jax.convert.qwen3 import import_qwen3

        return import_qwen3(src[len(QWEN3_PREFIX):], R.model_config(cfg.model), seed=cfg.seed,
                            shardings=param_shardings)
    from neo_jax.convert import checkpoint as params_ckpt

    if params_ckpt.is_params_checkpoint(src):
        _check_same_model(src, dataclasses.asdict(params_ckpt.load_config(src)), cfg.model)
        params, _ = params_ckpt.load_params(src, param_shardings)
        log.info("init_from: params checkpoint %s (fresh optimizer)", src)
        dtype = R.model_config(cfg.model).weight_dtype
        return jax.tree.map(lambda x: x.astype(dtype), params)
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.find_checkpoint_dir(src), read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"init_from={src!r} holds no complete checkpoint; train the previous "
                                    f"stage there first")
        saved = ckpt.restore_config(step).get("model")
        if saved is not None:
            _check_same_model(src, saved, cfg.model)
        log.info("init_from: params of step %d in %s (fresh optimizer)", step, ckpt.directory)
        return ckpt.restore_params(step, param_shardings)
    finally:
        ckpt.close()


SHAPE_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
              "num_prebuffer_layers", "num_llm_layers", "vision_dim", "tie_word_embeddings"}


def _check_same_model(src, saved: dict, model_cfg):
    diff = {k: (saved[k], model_cfg.get(k)) for k in SHAPE_KEYS if k in saved and saved[k] != model_cfg.get(k)}
    if diff:
        raise ValueError(f"init_from={src!r} holds a different model: {diff} (saved, now); set the config's "
                         f"model sizes to match")


def _host_tokens(batch) -> int:
    return int(np.count_nonzero(batch["segment_ids"]))


def train(cfg, workdir, *, stop_at: int | None = None, preemption: ckpt_lib.Preemption | None = None,
          mesh=None, log_prefix: str = "") -> dict:
    """Runs (or resumes) training to `cfg.train.total_steps` (or `stop_at`). Returns a summary:
    {"step", "start_step", "resumed", "preempted", "history" (the logged metric rows), "checkpoint"}."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    total = int(cfg.train.total_steps)
    end = total if stop_at is None else min(int(stop_at), total)
    ckpt = ckpt_lib.Checkpointer(epath.Path(workdir) / "checkpoints", cfg.checkpoint)
    own_preemption = preemption is None
    preemption = preemption or ckpt_lib.Preemption()
    pipeline = make_pipeline(cfg)
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            abstract, shardings = abstract_train_state(cfg, mesh)
            state, data_state, _ = ckpt.restore(abstract, latest)
            if data_state is not None:
                pipeline.set_state(data_state)
            else:
                log.warning("checkpoint %d has no data-iterator state: the data restarts from the beginning",
                            latest)
            log.info("resumed from step %d in %s", latest, ckpt.directory)
        else:
            _, shardings = abstract_train_state(cfg, mesh)
            params = initial_params(cfg, shardings.params)
            state, shardings = create_train_state(cfg, mesh, jax.random.PRNGKey(cfg.seed), params=params)
        start = int(jax.device_get(state.step))
        summary = dict(start_step=start, resumed=latest is not None, preempted=False, history=[],
                       checkpoint=str(ckpt.directory))
        if start >= end:
            log.info("nothing to do: step %d >= end %d", start, end)
            return dict(summary, step=start)

        step_fn = make_train_step(cfg, mesh, shardings)
        batch_sharding = R.batch_sharding(mesh)
        logger = MetricLogger(workdir, total, cfg.log, first_step=start, peak_flops=flops_lib.peak_flops(),
                              prefix=log_prefix)
        model_cfg = R.model_config(cfg.model)
        step = start
        try:
            while step < end:
                t0 = time.perf_counter()
                batch = next(pipeline)
                wait = time.perf_counter() - t0
                tokens = _host_tokens(batch) * jax.process_count()
                flops = flops_lib.batch_flops(model_cfg, batch)["total"] * jax.process_count()
                state, metrics = step_fn(state, to_global_arrays(batch, mesh, batch_sharding))
                step += 1
                stop = preemption.reached(step, ckpt.manager)
                logger.step(step, metrics, tokens=tokens, data_wait=wait, flops=flops, data_stats=pipeline.stats,
                            force=stop or step == end)
                if stop or step == end or ckpt.should_save(step):
                    ckpt.save(step, state, data_state=pipeline.get_state(), config=cfg, force=True)
                if stop:
                    logger.write_text(f"preempted: saved step {step} to {ckpt.directory}; rerun the same "
                                      f"command to resume")
                    summary["preempted"] = True
                    break
        finally:
            logger.close()
        summary.update(step=step, history=logger.history, state=state)
        return summary
    finally:
        ckpt.close()
        pipeline.close()
        if own_preemption:
            preemption.restore_handler()
