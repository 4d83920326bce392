"""Tokenizers: one interface, two backends (HF `tokenizer.json`, sentencepiece `.model`), plus a built-in.

NEO keeps the LLM's tokenizer and adds 15 special tokens in a fixed order, skipping those that already
exist (NEO_PAPER.md §1.3). With the Qwen3 tokenizer this gives `<IMG_CONTEXT>`=151669, `<img>`=151670,
`</img>`=151671, and `<|im_start|>`/`<|im_end|>` keep their Qwen3 ids 151644/151645.

    tok = load_tokenizer("builtin")              # no files: byte-level BPE trained on the synthetic words
    tok = load_tokenizer("/path/tokenizer.json") # or a directory holding one, or a sentencepiece .model
"""
from __future__ import annotations

import functools
import os
import re

IMG_CONTEXT, IMG_START, IMG_END = "<IMG_CONTEXT>", "<img>", "</img>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Official order of addition (VLMTrainKit/neo/data/constants.py); existing tokens are skipped.
NEO_SPECIAL_TOKENS = (
    IMG_CONTEXT, IMG_START, IMG_END, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
    IM_START, IM_END, "<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>",
)
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>")
BUILTIN_VOCAB_SIZE = 448  # BPE size of the built-in tokenizer before NEO's special tokens


class Tokenizer:
    """Common interface; backends implement encode, decode, token_to_id, vocab_size, add_special_tokens."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their single ids."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def add_special_tokens(self, tokens) -> None:
        raise NotImplementedError

    def _required(self, token: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise KeyError(f"tokenizer has no {token!r}; call add_neo_special_tokens(tokenizer) first")
        return i

    @property
    def img_context_id(self) -> int:
        return self._required(IMG_CONTEXT)

    @property
    def img_start_id(self) -> int:
        return self._required(IMG_START)

    @property
    def img_end_id(self) -> int:
        return self._required(IMG_END)

    @property
    def im_start_id(self) -> int:
        return self._required(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._required(IM_END)

    @property
    def pad_id(self) -> int:
        for t in PAD_CANDIDATES:
            i = self.token_to_id(t)
            if i is not None:
                return i
        return 0


def add_neo_special_tokens(tok: Tokenizer) -> Tokenizer:
    """Adds NEO's 15 special tokens in the official order, skipping existing ones; returns `tok`."""
    for t in NEO_SPECIAL_TOKENS:  # one at a time: ids follow the official order exactly
        if tok.token_to_id(t) is None:
            tok.add_special_tokens([t])
    return tok


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (e.g. Qwen3's tokenizer.json); no BOS/EOS are added."""

    def __init__(self, hf):
        self.hf = hf

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        import tokenizers

        return cls(tokenizers.Tokenizer.from_file(path))

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token):
        return self.hf.token_to_id(token)

    @property
    def vocab_size(self):
        return self.hf.get_vocab_size(with_added_tokens=True)

    def add_special_tokens(self, tokens):
        import tokenizers

        self.hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens])


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`; tokens it lacks are added after its vocabulary and split out of the text
    before sentencepiece sees it (so each special string is exactly one id)."""

    def __init__(self, sp):
        self.sp = sp
        self.added: dict[str, int] = {}
        self._pattern = None

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        import sentencepiece

        return cls(sentencepiece.SentencePieceProcessor(model_file=path))

    def encode(self, text):
        if not self.added:
            return list(self.sp.encode(text))
        ids = []
        for part in self._pattern.split(text):
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids):
        inverse = {v: k for k, v in self.added.items()}
        out, run = [], []
        for i in map(int, ids):
            if i in inverse:
                out.append(self.sp.decode(run)), run.clear()
                out.append(inverse[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token):
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        # piece_to_id returns unk for unknown pieces; only a real match counts.
        return i if self.sp.id_to_piece(i) == token and not self.sp.is_unknown(i) else None

    @property
    def vocab_size(self):
        return self.sp.get_piece_size() + len(self.added)

    def add_special_tokens(self, tokens):
        for t in tokens:
            if self.token_to_id(t) is None:
                self.added[t] = self.vocab_size
        alternatives = sorted(self.added, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")


def builtin_corpus() -> list[str]:
    """Text the built-in BPE is trained on: every word of the synthetic dataset, in sentences."""
    from neo_jax.data import synthetic

    return synthetic.corpus()


def build_builtin() -> HFTokenizer:
    """A small byte-level BPE (any text encodes; synthetic words are 1-2 tokens), trained
    deterministically at call time, with Qwen-style `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` first
    and NEO's special tokens after the BPE vocabulary."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUILTIN_VOCAB_SIZE,
        special_tokens=["<|endoftext|>", IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(builtin_corpus(), trainer=trainer)
    return HFTokenizer(hf)


@functools.lru_cache(maxsize=8)
def _load(spec: str) -> Tokenizer:
    if spec == "builtin":
        tok = build_builtin()
    else:
        path = spec
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer {spec!r} not found: give 'builtin', a tokenizer.json, a "
                                    f"directory holding one, or a sentencepiece .model")
        if path.endswith(".json"):
            tok = HFTokenizer.from_file(path)
        elif path.endswith(".model"):
            tok = SentencePieceTokenizer.from_file(path)
        else:
            raise ValueError(f"tokenizer {spec!r}: unknown file type (expected .json or .model)")
    return add_neo_special_tokens(tok)


def load_tokenizer(spec: str) -> Tokenizer:
    """'builtin' | path to tokenizer.json | directory with tokenizer.json | sentencepiece .model.

    NEO's special tokens are always added (idempotent). Loaded tokenizers are cached per spec; treat them
    as read-only."""
    return _load(str(spec))
