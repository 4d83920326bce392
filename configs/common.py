"""Pieces shared by the built-in configs (plain Python, big_vision style)."""
import dataclasses

import ml_collections

from neo_jax.model.config import ModelConfig

STAGES = ("pt", "mt", "sft")


def check_stage(stage):
    stage = stage or "pt"
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}; use e.g. configs/neo_2b.py:pt")
    return stage


def model_config(**overrides) -> ml_collections.ConfigDict:
    """ModelConfig defaults (NEO-2.2B) as a ConfigDict, with overrides."""
    d = dataclasses.asdict(ModelConfig())
    unknown = set(overrides) - set(d)
    if unknown:
        raise ValueError(f"unknown model keys {sorted(unknown)}")
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def base(stage, **model) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = check_stage(stage)
    c.seed = 0
    c.model = model_config(**model)
    from neo_jax.data.pipeline import data_config

    c.data = data_config(c.stage)
    from neo_jax.parallel.mesh import mesh_config
    from neo_jax.train.optim import train_config

    c.train = train_config(c.stage, "paper")
    c.mesh = mesh_config()
    from neo_jax.train.checkpoint import checkpoint_config
    from neo_jax.train.metrics import log_config

    c.checkpoint = checkpoint_config()
    c.log = log_config()
    c.init_from = ""  # a previous stage's workdir / checkpoints dir: start from its params (fresh optimizer)
    return c
