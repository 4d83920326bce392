"""The "neo1_0" chat template (NEO_PAPER.md §1.3): MPT-style turns with `<|im_end|>\\n` separators.

    <|im_start|>system\\n{system}<|im_end|>\\n          (only when a system message is set)
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Conversations use the official annotation roles: `human`, `gpt`, `system` (also accepted: `user`,
`assistant`). `<image>` marks where an image goes; `tokenize` (encode.py) expands it.
"""
from __future__ import annotations

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>\n"


def role_of(turn: dict) -> str:
    """'user' | 'assistant' | 'system' for an annotation turn; a clear error for anything else."""
    who = turn.get("from", turn.get("role"))
    if who not in ROLES:
        raise ValueError(f"conversation turn has role {who!r}; expected one of {sorted(ROLES)}")
    return ROLES[who]


def ensure_image_tag(conversations: list[dict], num_images: int) -> list[dict]:
    """Official rule: with exactly one image, prepend `<image>\\n` to the first human turn if missing.

    Returns a new list (the input is not modified)."""
    out = [dict(t) for t in conversations]
    if num_images == 1 and not any(IMAGE_TAG in t.get("value", "") for t in out):
        for t in out:
            if role_of(t) == "user":
                t["value"] = IMAGE_TAG + "\n" + t["value"]
                break
    return out


def segments(conversations: list[dict], system: str | None = None):
    """Yields (text, supervised) pieces in order; concatenated they are the rendered conversation.

    Supervised pieces are exactly the assistant contents followed by `<|im_end|>\\n`. Each piece is
    tokenised on its own, as the official trainer does."""
    if system:
        yield f"{TURN_START}system\n{system}{TURN_END}", False
    for turn in conversations:
        role, text = role_of(turn), turn.get("value", "")
        if role == "assistant":
            yield f"{TURN_START}assistant\n", False
            yield f"{text}{TURN_END}", True
        else:
            yield f"{TURN_START}{role}\n{text}{TURN_END}", False


def render(conversations: list[dict], system: str | None = None, add_generation_prompt: bool = False) -> str:
    """The conversation as one string; with `add_generation_prompt`, ends with `<|im_start|>assistant\\n`."""
    text = "".join(piece for piece, _ in segments(conversations, system))
    if add_generation_prompt:
        text += f"{TURN_START}assistant\n"
    return text


def image_prompt(question: str, num_images: int) -> str:
    """Inference prompt: `<image>\\n{q}` for one image, `Image-1: <image>\\nImage-2: <image>\\n...{q}` for
    several (VLMEvalKit reorganize_prompt)."""
    if num_images == 0:
        return question
    if num_images == 1:
        return f"{IMAGE_TAG}\n{question}"
    return "".join(f"Image-{i + 1}: {IMAGE_TAG}\n" for i in range(num_images)) + question


def generation_prompt(question: str, num_images: int = 0, history=(), system: str | None = None) -> str:
    """The full prompt for generation: history turns, then the question with its image tags, then the
    assistant header."""
    turns = list(history) + [{"from": "human", "value": image_prompt(question, num_images)}]
    return render(turns, system=system, add_generation_prompt=True)
