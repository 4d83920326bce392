"""The params-only checkpoint the converters read and write (until the training checkpoint lands).

Layout of `path/`: `params/` (an Orbax StandardCheckpointer PyTree of the plain parameter tree) and
`model_config.json` (the `ModelConfig` fields). `param_dtype` in the JSON always matches the stored arrays.

    save_params("/ckpt/neo", params, model_cfg)
    params, model_cfg = load_params("/ckpt/neo")                   # or shardings=<pytree of Shardings>
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from neo_jax.convert.common import atomic_dir
from neo_jax.model.config import DTYPES, ModelConfig

CONFIG_NAME = "model_config.json"
PARAMS_NAME = "params"


def _dtype_name(params) -> str:
    kinds = {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(params)}
    names = [n for n, d in DTYPES.items() if np.dtype(d) in kinds]
    if len(kinds) != 1 or len(names) != 1:
        raise ValueError(f"params mix dtypes {sorted(map(str, kinds))}; cast them to one of {tuple(DTYPES)}")
    return names[0]


def save_params(path: str, params, model_cfg: ModelConfig, *, overwrite: bool = False) -> None:
    """Write `params` + `model_cfg` to `path` atomically (nothing appears at `path` on failure)."""
    import orbax.checkpoint as ocp

    model_cfg = dataclasses.replace(model_cfg, param_dtype=_dtype_name(params))
    with atomic_dir(path, overwrite=overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_NAME), params)
        ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(dataclasses.asdict(model_cfg), f, indent=2)


def load_config(path: str) -> ModelConfig:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a neo-jax params checkpoint (no {CONFIG_NAME}); write one with "
                                f"`neo-jax convert qwen3` or `neo-jax convert import-hf`")
    with open(file) as f:
        return ModelConfig.from_dict(json.load(f))


def load_params(path: str, shardings=None):
    """(params, ModelConfig) from `path`; `shardings` (a pytree of jax Shardings matching the params)
    restores each array directly in its layout, otherwise everything lands on the first device."""
    import orbax.checkpoint as ocp

    from neo_jax.model.init import init_params

    cfg = load_config(path)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, shapes)
    target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    shapes, shardings)
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS_NAME), target)
    return params, cfg
