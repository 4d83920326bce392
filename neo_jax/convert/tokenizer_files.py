"""Tokenizer files of an exported checkpoint: the LLM's tokenizer with NEO's added special tokens.

Uses `neo_jax.data.tokenizer.load_tokenizer` (which adds NEO's 15 tokens in the official order). Writes
`tokenizer.json` (fast tokenizer, added tokens included) for a Hugging Face tokenizer, or copies the
sentencepiece `.model`; `added_tokens.json` lists NEO's tokens; `tokenizer_config.json` (copied from the
source directory when present, so `vocab.json`/`merges.txt` users such as the official slow-tokenizer loader
keep working) gets an `added_tokens_decoder` entry for each of them.
"""
from __future__ import annotations

import json
import os
import shutil

from neo_jax.data.tokenizer import NEO_SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer, load_tokenizer

COPY = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def write_tokenizer_files(spec: str, out: str) -> dict:
    """Write the tokenizer named by `spec` (a load_tokenizer spec) into `out`; returns the NEO token ids
    and the eos id (`<|im_end|>`)."""
    tok = load_tokenizer(spec)
    src_dir = spec if os.path.isdir(spec) else os.path.dirname(spec) if os.path.isfile(spec) else None
    if src_dir:
        for name in COPY:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy(os.path.join(src_dir, name), os.path.join(out, name))
    if isinstance(tok, HFTokenizer):
        tok.hf.save(os.path.join(out, "tokenizer.json"))
    elif isinstance(tok, SentencePieceTokenizer):
        shutil.copy(spec, os.path.join(out, "tokenizer.model"))
    else:
        raise TypeError(f"tokenizer {spec!r}: cannot write files for {type(tok).__name__}")
    ids = {t: tok.token_to_id(t) for t in NEO_SPECIAL_TOKENS}
    with open(os.path.join(out, "added_tokens.json"), "w") as f:
        json.dump(ids, f, indent=2)
    cfg_path = os.path.join(out, "tokenizer_config.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    decoder = config.setdefault("added_tokens_decoder", {})
    for t, i in ids.items():
        decoder.setdefault(str(i), {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True})
    config.setdefault("eos_token", "<|im_end|>")
    with open(cfg_path, "w") as f:
        json.dump(config, f, indent=2)
    return {"ids": ids, "eos_token_id": tok.im_end_id}
