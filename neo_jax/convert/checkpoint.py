"""The params checkpoints the converters write, and every checkpoint they read.

A params checkpoint `path/` holds `params/` (an Orbax StandardCheckpointer PyTree of the plain parameter
tree) and `model_config.json` (the `ModelConfig` fields; `param_dtype` always matches the stored arrays).
`load_params` also reads a training run (a `neo-jax train` workdir or its `checkpoints/`, latest step), so
`neo-jax convert export-hf --ckpt W` exports a run directly. Paths may be local or `gs://` (etils.epath).

    save_params("/ckpt/neo", params, model_cfg)
    params, model_cfg = load_params("/ckpt/neo")                   # or shardings=<pytree of Shardings>
"""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from etils import epath

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
        ckptr.save(epath.Path(tmp) / PARAMS_NAME, params)
        ckptr.wait_until_finished()
        (epath.Path(tmp) / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2))


def load_config(path: str) -> ModelConfig:
    file = epath.Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a neo-jax params checkpoint (no {CONFIG_NAME}); write one with "
                                f"`neo-jax convert qwen3` or `neo-jax convert import-hf`")
    return ModelConfig.from_dict(json.loads(file.read_text()))


def is_params_checkpoint(path: str) -> bool:
    return (epath.Path(path) / CONFIG_NAME).is_file()


def load_params(path: str, shardings=None):
    """(params, ModelConfig) from a params checkpoint or a training run (its latest step).

    `shardings` (a pytree of jax Shardings matching the params) restores each array directly in its
    layout, otherwise everything lands on the first device."""
    import orbax.checkpoint as ocp

    from neo_jax.model.init import init_params

    if not is_params_checkpoint(path):
        from neo_jax.train import checkpoint as train_ckpt

        try:
            params, saved = train_ckpt.load_params(path, shardings=shardings)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path} is neither a params checkpoint (no {CONFIG_NAME}) nor a training "
                                    f"run with a complete checkpoint ({e})") from None
        return params, ModelConfig.from_dict(saved["model"])
    cfg = load_config(path)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, shapes)
    target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    shapes, shardings)
    from neo_jax.train.checkpoint import absolute

    params = ocp.StandardCheckpointer().restore(absolute(path) / PARAMS_NAME, target)
    return params, cfg
