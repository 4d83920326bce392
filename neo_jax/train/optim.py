"""Optimisation: AdamW, warm-up + cosine to a minimum ratio, clipping, weight decay, stage freezing.

    cfg.train = train_config("pt", preset="paper")       # or preset="official" (NEO_PAPER.md §2.3)
    tx = make_optimizer(cfg.train, params, "pt")         # frozen leaves get no optimizer state at all

Stage `pt` trains the patch embedding (`vision/*`), the pre-buffer (`prebuffer/*`) and, in the post-LLM
(`llm/*`), every `*_proj_hw` and `*_norm_h` / `*_norm_w`; everything else (word embeddings, the Qwen3
layers, final norm, lm_head) stays frozen. `mt` and `sft` train everything (DESIGN.md "Stages").
Freezing is an `optax.multi_transform`: trainable leaves go through clip -> AdamW, frozen ones through
`set_to_zero`, whose state is empty, so no Adam moments are allocated for them. Clipping sees only the
trainable gradients. Weight decay skips norm scales and biases (by leaf name: `scale`, `bias`).
"""
from __future__ import annotations

import jax
import ml_collections
import optax
from jax.tree_util import DictKey, GetAttrKey, tree_map_with_path

PRESETS = ("paper", "official")
# stage -> (lr, warmup_steps, total_steps, min_lr_ratio, b2). Paper: Table 5 (§2.1); official: the 2B
# VLMTrainKit scripts (§2.3), whose MT/SFT warm-up is a 3% ratio (1500 / 135 steps here) and whose Adam
# beta2 is the code default 0.95. neo_9b.py overrides the 8B scripts' differences (warm-up 200, SFT cosine).
_VALUES = {
    "paper": {"pt": (8e-4, 2000, 190_000, 0.05, 0.999), "mt": (4e-5, 200, 50_000, 0.1, 0.999),
              "sft": (5e-5, 200, 6_000, 0.0, 0.999)},
    "official": {"pt": (8e-4, 1000, 200_000, 0.1, 0.95), "mt": (5e-5, 1500, 50_000, 0.2, 0.95),
                 "sft": (6e-5, 135, 4_500, 0.1, 0.95)},
}
PT_TRAINABLE_TOPS = ("vision", "prebuffer")
PT_TRAINABLE_SUFFIXES = ("_proj_hw", "_norm_h", "_norm_w")
NO_DECAY_LEAVES = ("scale", "bias")


def train_config(stage: str = "pt", preset: str = "paper") -> ml_collections.ConfigDict:
    """Optimiser / schedule section of a config (`c.train`). The global batch lives in `c.data.batch_size`
    (rows); `grad_accum` splits it into that many sequential micro-batches (same update, less memory)."""
    if preset not in PRESETS:
        raise ValueError(f"train preset {preset!r} is not one of {PRESETS}")
    if stage not in _VALUES[preset]:
        raise ValueError(f"stage {stage!r} is not one of {tuple(_VALUES[preset])}")
    lr, warmup, total, min_ratio, b2 = _VALUES[preset][stage]
    c = ml_collections.ConfigDict()  # values only: pick the preset here, not by a config override
    c.lr = lr
    c.warmup_steps = warmup
    c.total_steps = total
    c.min_lr_ratio = min_ratio  # final lr = lr * min_lr_ratio (0 = plain cosine decay to zero)
    c.b1, c.b2, c.eps = 0.9, b2, 1e-8
    c.weight_decay = 0.01
    c.clip_norm = 1.0  # global-norm clipping of the trainable gradients; <= 0 disables
    c.grad_accum = 1
    c.loss_chunk = 1024  # tokens per cross-entropy slice (never the full [B, L, vocab] logits); 0 = unchunked
    c.trainable = "stage"  # "stage" (pt: PEL + pre-buffer + H/W heads) or "all"
    return c


def lr_schedule(train_cfg):
    """Linear warm-up from 0 to `lr`, then cosine to `lr * min_lr_ratio` at `total_steps`."""
    total = int(train_cfg.total_steps)
    warmup = min(int(train_cfg.warmup_steps), total)
    if total <= 0:
        raise ValueError(f"train.total_steps={total} must be positive")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(train_cfg.lr), warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=float(train_cfg.lr) * float(train_cfg.min_lr_ratio))


def _names(path):
    return [k.key if isinstance(k, DictKey) else getattr(k, "name", str(k)) for k in path
            if isinstance(k, (DictKey, GetAttrKey))]


def is_trainable(path_names, stage: str) -> bool:
    """Whether the parameter at `path_names` (e.g. ["llm", "layers", "self_attn", "q_proj_hw", "kernel"])
    trains in `stage`."""
    if stage != "pt":
        return True
    if path_names and path_names[0] in PT_TRAINABLE_TOPS:
        return True
    return any(n.endswith(PT_TRAINABLE_SUFFIXES) for n in path_names)


def trainable_mask(params, stage: str, trainable: str = "stage"):
    """Bool tree (same structure as `params`): True where the parameter trains."""
    if trainable not in ("stage", "all"):
        raise ValueError(f"train.trainable={trainable!r}; choose 'stage' or 'all'")
    return tree_map_with_path(lambda p, _: trainable == "all" or is_trainable(_names(p), stage), params)


def decay_mask(params):
    """True where weight decay applies: every leaf except norm scales and biases."""
    return tree_map_with_path(lambda p, _: _names(p)[-1] not in NO_DECAY_LEAVES, params)


def make_optimizer(train_cfg, params, stage: str) -> optax.GradientTransformation:
    """AdamW + clipping for trainable leaves, `set_to_zero` (no state) for frozen ones.

    `params` only supplies the tree structure and names (arrays, ShapeDtypeStructs or shardings all do).
    """
    mask = trainable_mask(params, stage, train_cfg.get("trainable", "stage"))
    labels = _labels(mask)
    chain = []
    if float(train_cfg.clip_norm) > 0:
        chain.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    chain.append(optax.adamw(lr_schedule(train_cfg), b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                             eps=float(train_cfg.eps), weight_decay=float(train_cfg.weight_decay),
                             mask=decay_mask))
    return optax.multi_transform({"train": optax.chain(*chain), "frozen": optax.set_to_zero()}, labels)


def _labels(mask):
    return jax.tree_util.tree_map(lambda t: "train" if t else "frozen", mask)
