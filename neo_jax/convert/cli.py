"""`neo-jax convert ...`: weights in and out.

    neo-jax convert qwen3 --hf-dir /models/Qwen3-1.7B-Base --config neo_2b:pt --out /ckpt/neo2b-init
    neo-jax convert export-hf --ckpt /ckpt/neo2b-init --out /export/neo2b [--tokenizer /models/Qwen3-1.7B-Base]
    neo-jax convert import-hf --hf-dir /models/NEO1_0-2B-SFT --out /ckpt/neo2b-sft [--dtype bfloat16]

CKPT is a params checkpoint (`neo_jax.convert.checkpoint.save_params`); export-hf also takes a `neo-jax train`
workdir (its latest checkpoint). Each command shows a
progress bar over tensors and prints a summary; outputs appear only when complete.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _size(text: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def _bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="tensor", leave=False)
    return bar, (lambda key: bar.update(1))


def _summary(title: str, rows: dict) -> None:
    print(title)
    for k, v in rows.items():
        print(f"  {k:<12} {v}")


def run_qwen3(args) -> int:
    import dataclasses

    from neo_jax import config as config_lib
    from neo_jax.convert import checkpoint, qwen3
    from neo_jax.convert.common import nbytes
    from neo_jax.model.config import ModelConfig
    from neo_jax.model.init import LLM_LAYER_KEYS

    t0 = time.time()
    cfg = config_lib.load(args.config, args.overrides)
    model_cfg = ModelConfig.from_dict(cfg.model)
    if args.dtype:
        model_cfg = dataclasses.replace(model_cfg, param_dtype=args.dtype)
    per_layer = sum(len(names) for names in LLM_LAYER_KEYS.values())  # Qwen3 tensors per decoder layer
    n = 2 + model_cfg.num_llm_layers * per_layer + (not model_cfg.tie_word_embeddings)
    bar, progress = _bar(n, "qwen3 -> neo")
    params = qwen3.import_qwen3(args.hf_dir, model_cfg, seed=cfg.get("seed", 0), progress=progress)
    bar.close()
    checkpoint.save_params(args.out, params, model_cfg, overwrite=args.overwrite)
    _summary(f"converted Qwen3 {args.hf_dir} -> {args.out}", {
        "layers": f"{model_cfg.num_prebuffer_layers} pre-buffer (new) + {model_cfg.num_llm_layers} post-LLM (Qwen3)",
        "tensors": f"{n} read", "size": f"{nbytes(params) / 1e9:.3f} GB ({model_cfg.param_dtype})",
        "seconds": f"{time.time() - t0:.1f}"})
    return 0


def run_export(args) -> int:
    from neo_jax.convert import checkpoint, neo_hf

    t0 = time.time()
    params, model_cfg = checkpoint.load_params(args.ckpt)
    bar, progress = _bar(len(neo_hf.specs(model_cfg)), "export")
    info = neo_hf.export_hf(params, model_cfg, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                            max_shard_bytes=_size(args.max_shard_size), overwrite=args.overwrite,
                            progress=progress)
    bar.close()
    _summary(f"exported {args.ckpt} -> {args.out} (official NEO layout)", {
        "tensors": info["tensors"], "size": f"{info['bytes'] / 1e9:.3f} GB ({info['dtype']})",
        "files": ", ".join(info["files"]), "tokenizer": args.tokenizer or "not written (pass --tokenizer)",
        "seconds": f"{time.time() - t0:.1f}"})
    return 0


def run_import(args) -> int:
    from neo_jax.convert import checkpoint, neo_hf
    from neo_jax.convert.common import nbytes

    t0 = time.time()
    overrides = {} if args.prebuffer_layers is None else {"num_prebuffer_layers": args.prebuffer_layers}
    n = len(neo_hf.specs(neo_hf.read_config(args.hf_dir, **dict(overrides))))
    bar, progress = _bar(n, "import")
    params, model_cfg = neo_hf.import_hf(args.hf_dir, dtype=args.dtype, progress=progress, **overrides)
    bar.close()
    checkpoint.save_params(args.out, params, model_cfg, overwrite=args.overwrite)
    _summary(f"imported {args.hf_dir} -> {args.out}", {
        "layers": f"{model_cfg.num_layers} ({model_cfg.num_prebuffer_layers} pre-buffer)", "tensors": n,
        "size": f"{nbytes(params) / 1e9:.3f} GB ({model_cfg.param_dtype})", "seconds": f"{time.time() - t0:.1f}"})
    return 0


def _friendly(fn):
    """Bad input (missing files, mismatched tensors or configs) ends with one clear line and exit code 1."""
    def run(args):
        try:
            return fn(args)
        except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
            print(f"neo-jax convert {args.convert_command}: error: {e}", file=sys.stderr)
            return 1
    return run


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="import Qwen3 / official NEO weights, export to PyTorch")
    sub = p.add_subparsers(dest="convert_command", required=True)
    dtypes = ("float32", "bfloat16")

    q = sub.add_parser("qwen3", help="start a NEO from a Hugging Face Qwen3 directory (post-LLM init rule)")
    q.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    q.add_argument("--config", required=True, help="NEO config, e.g. neo_2b:pt (overrides: --config.model.x=y)")
    q.add_argument("--out", required=True, help="params checkpoint directory to write")
    q.add_argument("--dtype", choices=dtypes, help="parameter dtype (default: the config's param_dtype)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=_friendly(run_qwen3), accepts_overrides=True)

    e = sub.add_parser("export-hf", help="write a checkpoint in the official NEO (PyTorch) layout")
    e.add_argument("--ckpt", required=True, help="params checkpoint directory or a neo-jax train workdir")
    e.add_argument("--out", required=True, help="directory to write (config.json, safetensors, tokenizer)")
    e.add_argument("--tokenizer", help="tokenizer spec (tokenizer.json, its directory, a .model, or 'builtin')")
    e.add_argument("--dtype", choices=dtypes, help="tensor dtype (default: the checkpoint's)")
    e.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_friendly(run_export))

    i = sub.add_parser("import-hf", help="read an official NEO checkpoint (e.g. Paranioar/NEO1_0-2B-SFT)")
    i.add_argument("--hf-dir", required=True, help="official checkpoint directory")
    i.add_argument("--out", required=True, help="params checkpoint directory to write")
    i.add_argument("--dtype", choices=dtypes, help="parameter dtype (default: as stored)")
    i.add_argument("--prebuffer-layers", type=int, help="pre-buffer depth when config.json lacks extra_num_layers")
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(func=_friendly(run_import))
