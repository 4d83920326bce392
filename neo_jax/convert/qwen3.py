"""Start a NEO from a Hugging Face Qwen3 LLM directory (NEO_PAPER.md §1.7, the post-LLM rule).

    params = import_qwen3("/models/Qwen3-1.7B-Base", cfg, seed=0)

The NEO config's LLM shapes are checked against `config.json` (a mismatch names the field). The patch
embedding and the pre-buffer are freshly initialised by `init_params`' rule;
the post-LLM stack, embeddings, final norm and lm_head are streamed from the safetensors one tensor at a
time into the tree (each random leaf is dropped before its replacement is read), so the host holds the
converted model plus one stacked tensor. The result equals
`init.post_llm_init(init_params(cfg, rng), llm, cfg)` (q_proj_hw from `q_hw_from_q`, k_proj_hw = 0, H/W
norms = 1), which the tests check.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from neo_jax.convert import safetensors_io as st
from neo_jax.convert.common import leaf_paths, place, tree_get, tree_set
from neo_jax.convert.neo_hf import param_shapes
from neo_jax.model.config import ModelConfig
from neo_jax.model.init import LLM_LAYER_KEYS, init_params, q_hw_from_q

# NEO ModelConfig field -> (Qwen3 config.json key, default when absent).
CONFIG_FIELDS = {
    "hidden_size": ("hidden_size", None), "intermediate_size": ("intermediate_size", None),
    "num_heads": ("num_attention_heads", None), "num_kv_heads": ("num_key_value_heads", None),
    "head_dim": ("head_dim", 128), "rms_norm_eps": ("rms_norm_eps", None), "rope_theta": ("rope_theta", None),
    "vocab_size": ("vocab_size", None), "tie_word_embeddings": ("tie_word_embeddings", False),
    "num_llm_layers": ("num_hidden_layers", None),
}
LOADED = {name for names in LLM_LAYER_KEYS.values() for name in names}


def check_config(hf_dir: str, cfg: ModelConfig) -> dict:
    """Read `config.json` and compare it with the NEO config; raises ValueError naming the first field
    that differs. Returns the parsed config."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json; expected a Hugging Face Qwen3 directory")
    with open(path) as f:
        hf = json.load(f)
    if hf.get("model_type") != "qwen3":
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, expected 'qwen3'"
                         + ("; for an official NEO checkpoint use `neo-jax convert import-hf`"
                            if hf.get("model_type") == "neo_chat" else ""))
    for ours, (theirs, default) in CONFIG_FIELDS.items():
        value = hf.get(theirs, default)
        if value is None:
            raise ValueError(f"{path}: missing field {theirs!r}")
        mine = getattr(cfg, ours)
        if (type(mine)(value) != mine) if not isinstance(mine, float) else not np.isclose(float(value), mine):
            raise ValueError(f"{path}: {theirs}={value!r} but the NEO config has model.{ours}={mine!r}; "
                             f"set --config.model.{ours}={value} or pick the matching Qwen3")
    if hf.get("rope_scaling"):
        raise ValueError(f"{path}: rope_scaling={hf['rope_scaling']!r}; NEO's Native-RoPE uses plain rotary "
                         f"(rope_scaling null), as in the Qwen3 base models")
    if hf.get("attention_bias"):
        raise ValueError(f"{path}: attention_bias=true; NEO's attention has no biases")
    return hf


@functools.lru_cache(maxsize=16)
def _init_cached(cfg: ModelConfig, treedef, leaves):
    shardings = None if treedef is None else jax.tree_util.tree_unflatten(treedef, leaves)
    return jax.jit(lambda rng: init_params(cfg, rng), out_shardings=shardings)


def _init(cfg: ModelConfig, shardings):
    if shardings is None:
        return lambda rng: init_params(cfg, rng)
    leaves, treedef = jax.tree_util.tree_flatten(shardings)
    return _init_cached(cfg, treedef, tuple(leaves))


def _hf_key(group: str, name: str, i: int) -> str:
    return f"model.layers.{i}.{group + '.' if group else ''}{name}.weight"


def import_qwen3(hf_dir: str, cfg: ModelConfig, *, seed: int = 0, shardings=None, progress=None):
    """NEO parameters (dtype cfg.param_dtype) from a Qwen3 directory; see the module docstring.
    shardings: optional pytree of jax Shardings matching the params (each tensor is placed directly)."""
    check_config(hf_dir, cfg)
    source = st.TensorSource(hf_dir)
    n, dtype = cfg.num_llm_layers, np.dtype(cfg.weight_dtype)
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {_hf_key(g, k, i) for g, names in LLM_LAYER_KEYS.items() for k in names for i in range(n)}
    if not cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    missing = sorted(expected - set(source.keys()))
    if missing:
        raise ValueError(f"{hf_dir}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(source.keys()) - expected - {"lm_head.weight"})
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected tensor {unexpected[0]!r} in {source.entries[unexpected[0]][0]}; "
                         f"not a Qwen3ForCausalLM checkpoint of this config")
    shapes = param_shapes(cfg)
    sharding = (lambda path: None) if shardings is None else (lambda path: tree_get(shardings, path))

    def read(key, want):  # one tensor in NEO layout ([in, out] for Linear weights)
        x = source.get(key)
        x = x.T if key.endswith("proj.weight") or key == "lm_head.weight" else x
        if x.shape != tuple(want):
            raise ValueError(f"{hf_dir}: tensor {key!r} in {source.entries[key][0]} has shape "
                             f"{source.shape(key)}, the NEO config implies {tuple(reversed(want)) if x.ndim == 2 else want}")
        if progress is not None:
            progress(key)
        return x.astype(dtype)

    # The whole tree from init_params' rule (one compile, shared with init_params(cfg, rng)); every leaf the
    # LLM provides is dropped before its replacement is read, so host memory peaks at model + one stack.
    params = _init(cfg, shardings)(jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map(lambda x: x, params)  # a private copy of the dict structure

    q_host = None
    llm_leaves = leaf_paths(shapes["llm"]["layers"], ("llm", "layers"))
    llm_leaves.sort(key=lambda pl: pl[0][3] != "q_proj")  # q_proj first: q_proj_hw derives from it
    for path, shape in llm_leaves:
        group, name = (path[2], path[3]) if len(path) == 5 else ("", path[2])
        tree_set(params, path, None)
        if name in LOADED:
            host = np.empty(shape.shape, dtype)
            for i in range(n):
                host[i] = read(_hf_key(group, name, i), shape.shape[1:])
            if name == "q_proj":
                q_host = host
        elif name == "q_proj_hw":
            host = q_hw_from_q(q_host, cfg.num_heads, cfg.head_dim)
        elif name == "k_proj_hw":
            host = np.zeros(shape.shape, dtype)
        elif name in ("q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w"):
            host = np.ones(shape.shape, dtype)
        else:
            raise KeyError(f"no Qwen3 source or post-LLM rule for parameter {'/'.join(path)}")
        tree_set(params, path, place(host, sharding(path)))
        del host
    q_host = None
    top = [(("embed_tokens", "embedding"), "model.embed_tokens.weight"), (("norm", "scale"), "model.norm.weight")]
    if not cfg.tie_word_embeddings:
        top.append((("lm_head", "kernel"), "lm_head.weight"))
    for path, key in top:
        tree_set(params, path, None)
        tree_set(params, path, place(read(key, tree_get(shapes, path).shape), sharding(path)))
    source.close()
    return params
