"""Official NEO checkpoints (the PyTorch/HF layout of `Paranioar/NEO1_0-*`): import and export.

The mapping is a rename-and-transpose table (NEO_PAPER.md §1.9-1.10), built from the parameter tree:
  vision/patch_embedding/kernel [768, Dv]     <-> vision_model.embeddings.patch_embedding.weight [Dv, 3, 16, 16]
  vision/dense_embedding/kernel [4 Dv, E]     <-> vision_model.embeddings.dense_embedding.weight [E, Dv, 2, 2]
  {prebuffer,llm}/layers/<sub>/kernel [n,i,o] <-> language_model.model.layers.{k}.<sub>.weight [o, i]
  .../scale, embed_tokens, norm, lm_head      <-> ...weight (lm_head transposed, only when untied)
with NEO layer k = i for pre-buffer layer i and L1 + j for post-LLM layer j.

    export_hf(params, cfg, "/out/neo-hf", tokenizer="/qwen3-tok")   # config.json, shards, index, tokenizer
    params, cfg = import_hf("/models/NEO1_0-2B-SFT", dtype="bfloat16")

Both stream one tensor at a time; import refuses missing, unexpected or mis-shaped tensors and a wrong
`model_type`; outputs are written to a temporary directory and renamed only when complete.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import NamedTuple

import jax
import numpy as np

from neo_jax.convert import safetensors_io as st
from neo_jax.convert.common import atomic_dir, leaf_paths, place, tree_get, tree_set
from neo_jax.model.config import DTYPES, ModelConfig

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
QWEN3_EOS, QWEN3_BOS = 151645, 151643


class Spec(NamedTuple):
    key: str  # official tensor name
    path: tuple  # path into the neo-jax parameter tree
    layer: int | None  # index on the leading (scanned) axis, or None
    kind: str  # "linear" (transpose), "patch", "merge" (conv layouts) or "copy"


@functools.lru_cache(maxsize=16)
def param_shapes(cfg: ModelConfig):
    from neo_jax.model.init import init_params

    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def specs(cfg: ModelConfig) -> list[Spec]:
    """Every official tensor of a NEO with config `cfg`, in the order they are written."""
    out = []
    for path, _ in leaf_paths(param_shapes(cfg)):
        last = path[-1]
        kind = "linear" if last == "kernel" else "copy"
        if path[0] == "vision":
            if last == "kernel":
                kind = "patch" if path[1] == "patch_embedding" else "merge"
            out.append(Spec(f"vision_model.embeddings.{path[1]}.{'weight' if last == 'kernel' else last}",
                            path, None, kind))
        elif path[0] in ("prebuffer", "llm"):
            n, off = ((cfg.num_prebuffer_layers, 0) if path[0] == "prebuffer"
                      else (cfg.num_llm_layers, cfg.num_prebuffer_layers))
            sub = ".".join(path[2:-1])
            out += [Spec(f"language_model.model.layers.{off + i}.{sub}.weight", path, i, kind) for i in range(n)]
        elif path[0] == "lm_head":
            out.append(Spec("language_model.lm_head.weight", path, None, kind))
        else:  # embed_tokens/embedding, norm/scale
            out.append(Spec(f"language_model.model.{path[0]}.weight", path, None, kind))
    order = {"vision": 0, "embed_tokens": 1, "prebuffer": 2, "llm": 2, "norm": 3, "lm_head": 4}
    return sorted(out, key=lambda s: (order[s.path[0]], s.layer if s.layer is not None else -1,
                                      s.path[0] == "llm", s.key))


def to_official(kind: str, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """One neo-jax array (already sliced to one layer) in the official layout."""
    if kind == "linear":
        return x.T
    if kind == "patch":  # kernel row (c*p + i)*p + j -> Conv2d weight [o, c, i, j]
        return x.T.reshape(x.shape[1], 3, cfg.patch_size, cfg.patch_size)
    if kind == "merge":  # kernel row (m*di + dj)*Dv + c -> Conv2d weight [o, c, di, dj]
        m = cfg.merge_size
        return x.reshape(m, m, cfg.vision_dim, x.shape[-1]).transpose(3, 2, 0, 1)
    return x


def from_official(kind: str, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "patch":
        return x.reshape(x.shape[0], -1).T
    if kind == "merge":
        return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    return x


def official_shape(spec: Spec, shapes, cfg: ModelConfig) -> tuple:
    shape = tree_get(shapes, spec.path).shape
    shape = shape[1:] if spec.layer is not None else shape
    return to_official(spec.kind, np.empty(shape, np.int8), cfg).shape


# --- config.json ------------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of the official release (NEO_PAPER.md §1.10), loadable by its NEOChatModel."""
    n = cfg.num_layers
    llm = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": QWEN3_BOS, "eos_token_id": QWEN3_EOS, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": 40960, "max_window_layers": n,
        "num_attention_heads": cfg.num_heads, "num_hidden_layers": n, "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_scaling": None, "rope_theta": cfg.rope_theta,
        "rope_theta_hw": cfg.rope_theta_hw, "max_position_embeddings_hw": 10000, "sliding_window": None,
        "use_sliding_window": False, "use_cache": True, "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": dtype, "vocab_size": cfg.vocab_size, "layer_types": ["full_attention"] * n,
        "extra_num_layers": cfg.num_prebuffer_layers,
    }
    vision = {
        "architectures": ["NEOVisionModel"], "model_type": "neo_vision", "hidden_size": cfg.vision_dim,
        "llm_hidden_size": cfg.hidden_size, "downsample_ratio": 1.0 / cfg.merge_size, "num_channels": 3,
        "patch_size": cfg.patch_size, "rope_theta_vision": cfg.rope_theta_vision,
        "max_position_embeddings_vision": 10000, "min_pixels": 65536, "max_pixels": 4194304, "torch_dtype": dtype,
    }
    return {
        "architectures": ["NEOChatModel"], "model_type": "neo_chat", "template": "neo1_0",
        "downsample_ratio": 1.0 / cfg.merge_size, "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": dtype, "use_backbone_lora": 0, "use_llm_lora": 0,
        # neo-jax extras (ignored by the PyTorch loader): the image token ids the weights were trained with.
        "img_context_token_id": cfg.img_context_id, "img_start_token_id": cfg.img_start_id,
        "img_end_token_id": cfg.img_end_id,
        "llm_config": llm, "vision_config": vision,
    }


def _scalar(v, name):
    if isinstance(v, (list, tuple)):  # the official config class stores some fields as 1-tuples
        if len(v) != 1:
            raise ValueError(f"config.json: {name}={v!r} should be a number")
        v = v[0]
    return v


def config_from_hf(d: dict, path: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from an official config.json dict; `overrides` set runtime fields (dtype, impl, ...)."""
    if d.get("model_type") != "neo_chat":
        raise ValueError(f"{path}: model_type is {d.get('model_type')!r}, expected 'neo_chat' (an official NEO "
                         f"checkpoint); for a Qwen3 LLM use `neo-jax convert qwen3`")
    for section in ("llm_config", "vision_config"):
        if not isinstance(d.get(section), dict):
            raise ValueError(f"{path}: missing the {section!r} section")
    llm, vis = d["llm_config"], d["vision_config"]
    try:
        total = int(llm["num_hidden_layers"])
        ratio = float(_scalar(d.get("downsample_ratio", vis.get("downsample_ratio", 0.5)), "downsample_ratio"))
        fields = dict(
            vocab_size=int(llm["vocab_size"]), hidden_size=int(llm["hidden_size"]),
            intermediate_size=int(llm["intermediate_size"]), num_heads=int(llm["num_attention_heads"]),
            num_kv_heads=int(llm["num_key_value_heads"]), head_dim=int(llm.get("head_dim", 128)),
            rms_norm_eps=float(llm["rms_norm_eps"]), rope_theta=float(llm["rope_theta"]),
            rope_theta_hw=float(llm.get("rope_theta_hw", 10000.0)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", llm.get("tie_word_embeddings", False))),
            vision_dim=int(vis["hidden_size"]), patch_size=int(vis.get("patch_size", 16)),
            merge_size=int(round(1.0 / ratio)),
            rope_theta_vision=float(vis.get("rope_theta_vision", 10000.0)),
        )
    except KeyError as e:
        raise ValueError(f"{path}: missing config field {e.args[0]!r}") from None
    l1 = int(overrides.pop("num_prebuffer_layers", llm.get("extra_num_layers", 0)))
    if not 0 <= l1 <= total:
        raise ValueError(f"{path}: extra_num_layers={l1} outside [0, num_hidden_layers={total}]")
    fields.update(num_prebuffer_layers=l1, num_llm_layers=total - l1)
    for ours, theirs in (("img_context_id", "img_context_token_id"), ("img_start_id", "img_start_token_id"),
                         ("img_end_id", "img_end_token_id")):
        if theirs in d:
            fields[ours] = int(d[theirs])
    fields.update(overrides)
    return ModelConfig(**fields)


def _np(x):
    return np.asarray(jax.device_get(x))


# --- export -----------------------------------------------------------------------------------------------

def check_tokenizer(spec: str, cfg: ModelConfig) -> None:
    """The weights' image token ids must be the tokenizer's (the PyTorch loader takes them from it)."""
    from neo_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    for key, have in (("img_context_id", tok.img_context_id), ("img_start_id", tok.img_start_id),
                      ("img_end_id", tok.img_end_id)):
        if getattr(cfg, key) != have:
            raise ValueError(f"tokenizer {spec!r} gives {key}={have} but the checkpoint's model config has "
                             f"{getattr(cfg, key)}; export with the tokenizer the model was trained with")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size={cfg.vocab_size}")


def export_hf(params, cfg: ModelConfig, out: str, *, dtype: str | None = None, tokenizer: str | None = None,
              max_shard_bytes: int = 5 * 10 ** 9, overwrite: bool = False, progress=None) -> dict:
    """Write `params` in the official layout to `out`. dtype: None keeps the parameters' dtype.
    tokenizer: a `load_tokenizer` spec whose files (with NEO's added tokens) are written beside the weights.
    Returns a summary dict (tensors, bytes, files)."""
    official = {"hw_branch": True, "mask_kind": "mixed", "rope_kind": "native"}
    for field, want in official.items():
        if getattr(cfg, field, want) != want:
            raise ValueError(f"model.{field}={getattr(cfg, field)!r}: the official NEO layout (and its PyTorch "
                             f"code) only represents {field}={want!r}; this ablation cannot be exported")
    shapes = param_shapes(cfg)
    table = specs(cfg)
    have = {p for p, _ in leaf_paths(params)}
    want = {p for p, _ in leaf_paths(shapes)}
    if have != want:
        raise ValueError(f"params do not match the config: missing {sorted(want - have)[:5]}, "
                         f"unexpected {sorted(have - want)[:5]}")
    src_dtype = np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)
    dtype = dtype or next(n for n, d in DTYPES.items() if np.dtype(d) == src_dtype)
    np_dtype = np.dtype(DTYPES[dtype])
    by_key = {s.key: s for s in table}
    plan = []
    for s in table:
        shape = official_shape(s, shapes, cfg)
        got = tree_get(params, s.path).shape
        if got != tree_get(shapes, s.path).shape:
            raise ValueError(f"param {'/'.join(s.path)} has shape {got}, config expects "
                             f"{tree_get(shapes, s.path).shape}")
        plan.append((s.key, shape, np_dtype))

    def produce(key):
        s = by_key[key]
        x = tree_get(params, s.path)
        x = _np(x[s.layer] if s.layer is not None else x)
        return to_official(s.kind, x, cfg).astype(np_dtype, copy=False)

    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        files = st.write_shards(tmp, plan, produce, max_shard_bytes=max_shard_bytes, progress=progress)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, TORCH_DTYPES[dtype]), f, indent=2)
        eos = QWEN3_EOS
        if tokenizer is not None:
            from neo_jax.convert.tokenizer_files import write_tokenizer_files

            eos = write_tokenizer_files(tokenizer, tmp)["eos_token_id"]
        gen = {"do_sample": False, "max_new_tokens": 4096}
        if eos < cfg.vocab_size:
            gen["eos_token_id"] = eos
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
    total = sum(int(np.prod(s)) * np_dtype.itemsize for _, s, _ in plan)
    return {"tensors": len(plan), "bytes": total, "files": files, "dtype": dtype}


# --- import -----------------------------------------------------------------------------------------------

def read_config(hf_dir: str, **overrides) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json; expected an official NEO checkpoint directory")
    with open(path) as f:
        return config_from_hf(json.load(f), path, **overrides)


def import_hf(hf_dir: str, *, dtype: str | None = None, shardings=None, progress=None, **overrides):
    """(params, ModelConfig) from an official NEO directory. dtype: None keeps the stored dtype (float32 or
    bfloat16); shardings: optional pytree of jax Shardings (e.g. NamedShardings from `param_logical_axes`
    and the rules table) matching the params, so each tensor lands directly in its layout."""
    source = st.TensorSource(hf_dir)
    stored = {np.dtype(source.dtype(k)) for k in source.keys()}
    if dtype is None:
        names = [n for n, d in DTYPES.items() if np.dtype(d) in stored]
        if len(stored) != 1 or not names:
            raise ValueError(f"{hf_dir}: tensors are stored as {sorted(map(str, stored))}; pass dtype= "
                             f"(float32 or bfloat16) to choose the parameter dtype")
        dtype = names[0]
    cfg = read_config(hf_dir, **overrides)
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    np_dtype = np.dtype(DTYPES[dtype])
    shapes = param_shapes(cfg)
    table = specs(cfg)
    missing = [s.key for s in table if s.key not in source]
    if missing:
        raise ValueError(f"{hf_dir}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    expected = {s.key for s in table}
    if cfg.tie_word_embeddings:
        expected.add("language_model.lm_head.weight")  # a tied model ignores a stray lm_head (as PyTorch does)
    unexpected = sorted(set(source.keys()) - expected)
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected tensor {unexpected[0]!r} in {source.entries[unexpected[0]][0]} "
                         f"({len(unexpected)} unexpected in all); the config does not have it")
    for s in table:
        want = official_shape(s, shapes, cfg)
        if source.shape(s.key) != want:
            raise ValueError(f"{hf_dir}: tensor {s.key!r} in {source.entries[s.key][0]} has shape "
                             f"{source.shape(s.key)}, config.json implies {want}")
    groups: dict[tuple, list[Spec]] = {}
    for s in table:
        groups.setdefault(s.path, []).append(s)
    params = {}
    for path, group in groups.items():
        shape = tree_get(shapes, path).shape
        if group[0].layer is None:  # one tensor: no staging buffer
            host = from_official(group[0].kind, source.get(group[0].key), cfg).astype(np_dtype, copy=False)
        else:  # a scanned stack: fill [n, ...] layer by layer
            host = np.empty(shape, np_dtype)
            for s in group:
                host[s.layer] = from_official(s.kind, source.get(s.key), cfg)
        if progress is not None:
            for s in group:
                progress(s.key)
        tree_set(params, path, place(host, None if shardings is None else tree_get(shardings, path)))
        del host
    source.close()
    return params, cfg
