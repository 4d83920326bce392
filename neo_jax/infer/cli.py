"""`neo-jax generate`: answer a question about an image with a trained checkpoint.

    neo-jax generate --ckpt /tmp/neo_demo/sft --image cat.png --prompt "What is this?"
    neo-jax generate --ckpt W --image a.png --prompt "Describe it." --temperature 0.7 --top-k 20

The prompt is built exactly as training data is (neo_jax/data): the image is smart-resized, normalised and
patchified, the `neo1_0` chat template wraps the question, `<image>` expands to `<img>` + one
`<IMG_CONTEXT>` per 2x2 patch window + `</img>`, and positions are the Native-RoPE (T, H, W) indexes.
Decoding is greedy (temperature 0) or sampled, and stops at `<|im_end|>`.
"""
from __future__ import annotations

import sys

import numpy as np


def encode_prompt(tok, question: str, images=(), *, min_pixels: int, max_pixels: int, model_cfg=None) -> dict:
    """One prompt -> arrays of one document: tokens, positions [n, 3], patches [p, 768], patch_positions."""
    from neo_jax.data import image as image_lib
    from neo_jax.data import template
    from neo_jax.data.encode import image_token_ids
    from neo_jax.model import rope

    images = list(images)
    per_image = image_lib.per_image_max_pixels(max_pixels, min_pixels, len(images))
    processed = [image_lib.process_image(src, min_pixels=min_pixels, max_pixels=per_image, name=f"image {i}")
                 for i, src in enumerate(images)]
    text = template.generation_prompt(question, num_images=len(images))
    ids = []
    for j, part in enumerate(text.split(template.IMAGE_TAG)):
        if j:
            ids += image_token_ids(tok, processed[j - 1][2])
        if part:
            ids += tok.encode(part)
    tokens = np.asarray(ids, np.int32)
    grids = np.asarray([g for _, _, g in processed], np.int32).reshape(-1, 2)
    kind = getattr(model_cfg, "rope_kind", "native")
    out = {"tokens": tokens,
           "positions": rope.native_positions(tokens, grids, img_start_id=tok.img_start_id,
                                              img_context_id=tok.img_context_id),
           "patches": (np.concatenate([p for p, _, _ in processed]) if processed
                       else np.zeros((0, image_lib.PATCH ** 2 * 3), np.float32)),
           "patch_positions": (np.concatenate([q for _, q, _ in processed]) if processed
                               else np.zeros((0, 2), np.int32))}
    if kind != "native":
        out["rope_positions"] = rope.rope_positions(kind, tokens, grids, img_start_id=tok.img_start_id,
                                                    img_context_id=tok.img_context_id)
    return out


def batch_prompts(docs: list[dict], pad_id: int) -> dict:
    """Left-pads prompts to one length (segment 0 = padding) and zero-pads patches to one count."""
    n = max(len(d["tokens"]) for d in docs)
    p = max(max(len(d["patches"]) for d in docs), 4)
    b = len(docs)
    out = {"tokens": np.full((b, n), pad_id, np.int32), "segment_ids": np.zeros((b, n), np.int32),
           "positions": np.zeros((b, n, 3), np.int32), "patches": np.zeros((b, p, docs[0]["patches"].shape[1]),
                                                                           np.float32),
           "patch_positions": np.zeros((b, p, 2), np.int32)}
    if "rope_positions" in docs[0]:
        out["rope_positions"] = np.zeros((b, n, 3), np.int32)
    for i, d in enumerate(docs):
        k = len(d["tokens"])
        out["tokens"][i, n - k:] = d["tokens"]
        out["segment_ids"][i, n - k:] = 1
        out["positions"][i, n - k:] = d["positions"]
        if "rope_positions" in out:
            out["rope_positions"][i, n - k:] = d["rope_positions"]
        out["patches"][i, :len(d["patches"])] = d["patches"]
        out["patch_positions"][i, :len(d["patch_positions"])] = d["patch_positions"]
    return out


def answer(model_cfg, params, tok, questions, images, *, min_pixels: int, max_pixels: int,
           max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> list[str]:
    """Answers a batch of (question, images) pairs; each answer is decoded up to `<|im_end|>`."""
    import jax

    from neo_jax.infer.generate import generate

    docs = [encode_prompt(tok, q, imgs, min_pixels=min_pixels, max_pixels=max_pixels, model_cfg=model_cfg)
            for q, imgs in zip(questions, images)]
    prompt = batch_prompts(docs, tok.pad_id)
    out, lengths = generate(model_cfg, params, prompt, max_new_tokens=max_new_tokens, eos_id=tok.im_end_id,
                            temperature=float(temperature), top_k=int(top_k), rng=jax.random.PRNGKey(seed))
    out, lengths = np.asarray(out), np.asarray(lengths)
    texts = []
    for row, n in zip(out, lengths):
        ids = [int(t) for t in row[:n] if t != tok.im_end_id]
        texts.append(tok.decode(ids).strip())
    return texts


def load_model(ckpt: str, step: int | None = None):
    """(ModelConfig, params, saved config dict) of a training workdir / checkpoints dir."""
    from neo_jax.model.config import ModelConfig
    from neo_jax.train.checkpoint import load_params

    params, saved = load_params(ckpt, step)
    if "model" not in saved:
        raise ValueError(f"checkpoint {ckpt} carries no model config (saved config keys: {sorted(saved)})")
    return ModelConfig.from_dict(saved["model"]), params, saved


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer a prompt about image(s) with a trained checkpoint")
    p.add_argument("--ckpt", required=True, help="training workdir (or its checkpoints/ directory)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="the question / instruction")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the run")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from neo_jax.data.pipeline import check_token_ids
    from neo_jax.data.tokenizer import load_tokenizer

    if args.temperature < 0 or args.top_k < 0 or args.max_new_tokens <= 0:
        print(f"neo-jax generate: need --temperature >= 0 (got {args.temperature}), --top-k >= 0 (got "
              f"{args.top_k}), --max-new-tokens > 0 (got {args.max_new_tokens})", file=sys.stderr)
        return 2
    model_cfg, params, saved = load_model(args.ckpt, args.step)
    data = saved.get("data", {})
    tok = load_tokenizer(args.tokenizer or data.get("tokenizer", "builtin"))
    check_token_ids(tok, saved["model"])
    text = answer(model_cfg, params, tok, [args.prompt], [args.image],
                  min_pixels=int(data.get("min_pixels", 256 * 256)), max_pixels=int(data.get("max_pixels", 1024 ** 2)),
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  seed=args.seed)[0]
    print(text)
    return 0
