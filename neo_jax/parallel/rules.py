"""Logical axis names -> mesh axes, one table per strategy (DESIGN.md "Sharding").

Parameter names (neo_jax/model): layers, embed, heads, kv_heads, head_dim, mlp, vocab, vision, vision_merge,
patch, norm. Activation names: batch, length, act_embed, act_heads, act_kv_heads (plus head_dim and mlp,
shared with the parameters). Flax resolves a spec by taking, for each dimension, the first rule whose mesh
axis is still free in that array, so one mesh axis never shards two dimensions of the same array.

    dp       parameters replicated; batch over (data, fsdp)
    fsdp     parameters sharded on `embed` (every matrix but the patch projection has it; that one
             shards `vision`) over fsdp, gathered per layer by XLA (ZeRO-3); batch over (data, fsdp)
    fsdp_tp  fsdp + Megatron-style tensor parallelism: heads, kv_heads, mlp and vocab over `tensor`
"""
from __future__ import annotations

import logging
import math

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from neo_jax.model.config import ModelConfig
from neo_jax.parallel.mesh import STRATEGIES

BATCH_AXES = ("data", "fsdp")
log = logging.getLogger(__name__)

_COMMON = (("batch", BATCH_AXES), ("length", None), ("act_embed", None), ("layers", None),
           ("head_dim", None), ("norm", None), ("patch", None), ("vision_merge", None))
_FSDP = (("embed", "fsdp"), ("vision", "fsdp"))
_TENSOR = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
           ("act_heads", "tensor"), ("act_kv_heads", "tensor"))
_REPLICATED = (("embed", None), ("vision", None), ("heads", None), ("kv_heads", None), ("mlp", None),
               ("vocab", None), ("act_heads", None), ("act_kv_heads", None))


def rules(strategy: str = "fsdp") -> tuple[tuple[str, object], ...]:
    """The (logical name, mesh axes) table of a strategy, for `nn.logical_axis_rules`."""
    if strategy == "dp":
        return _COMMON + _REPLICATED
    if strategy == "fsdp":
        return _COMMON + _FSDP + _REPLICATED
    if strategy == "fsdp_tp":
        return _COMMON + _TENSOR + _FSDP + _REPLICATED
    raise ValueError(f"sharding strategy {strategy!r} is not one of {STRATEGIES}")


def model_config(cfg_model) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a ConfigDict or a dict."""
    if isinstance(cfg_model, ModelConfig):
        return cfg_model
    return ModelConfig.from_dict(cfg_model.to_dict() if hasattr(cfg_model, "to_dict") else cfg_model)


def check_model(cfg_model, mesh, strategy: str) -> None:
    """Activation constraints must divide evenly: say which head count breaks tensor parallelism."""
    c = model_config(cfg_model)
    t = mesh.shape["tensor"]
    if strategy == "fsdp_tp" and t > 1:
        for name, n in (("num_heads", c.num_heads), ("num_kv_heads", c.num_kv_heads),
                        ("intermediate_size", c.intermediate_size)):
            if n % t:
                raise ValueError(f"model.{name}={n} does not divide over tensor={t}; pick a tensor size "
                                 f"that divides it or use mesh.strategy=fsdp")


def _divisible(spec: P, shape, mesh, where: str) -> P:
    """Drop mesh axes that do not divide their dimension (that dimension is then replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if names and dim % size:
            log.info("sharding: %s dim %d (size %d) does not divide over %s=%d; replicated", where,
                     len(out), dim, names, size)
            axes = None
        out.append(axes)
    return P(*out)


def param_specs(cfg_model, mesh, strategy: str = "fsdp"):
    """Tree of mesh PartitionSpecs of the parameters (same structure as `init_params`)."""
    from neo_jax.model.init import init_params, param_logical_axes

    c = model_config(cfg_model)
    logical = param_logical_axes(c)
    specs = nn.logical_to_mesh(logical, rules(strategy))
    shapes = jax.eval_shape(lambda: init_params(c, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, s: _divisible(spec, s.shape, mesh, jax.tree_util.keystr(path)),
        specs, shapes, is_leaf=lambda x: isinstance(x, P))


def param_shardings(cfg_model, mesh, strategy: str = "fsdp"):
    """Tree of NamedShardings of the parameters: the rules applied to `param_logical_axes`."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(cfg_model, mesh, strategy),
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension over ("data", "fsdp"), the rest replicated; a prefix for the batch dict."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
