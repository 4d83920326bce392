"""The built-in demo: a small NEO (~1.5M parameters) trained from scratch on the CPU through pt -> mt -> sft
on the built-in synthetic scenes with the built-in tokenizer (no network, no files).

    neo-jax demo --workdir /tmp/neo_demo                 # all three stages, then held-out accuracy
    neo-jax train --config configs/demo.py:pt --workdir /tmp/neo_demo/pt

Stage data: `pt` captions (image-text pairs), `mt` captions mixed with every question type, `sft` the
questions only. There is no pretrained LLM to protect here, so every stage trains all parameters
(`train.trainable = "all"`); the paper's `pt` freezing is the default of the other configs. Images keep
their size (96 x 96 px -> 3 x 3 image tokens, one per grid cell of the scene); a 256-token row holds ~7
question documents (36 patches each), so the patch budget is 320.
"""
import common

# Question types answered at the end (held-out test split); captions are trained but not scored.
EVAL_QTYPES = ("color", "shape", "count", "left_right", "above_below", "read")
STAGE_QTYPES = {"pt": ("caption",), "mt": ("caption",) + EVAL_QTYPES, "sft": EVAL_QTYPES}
STAGE_STEPS = {"pt": 250, "mt": 350, "sft": 300}  # ~0.45 s a step at load ~2.5: ~8 min in all
STAGE_LR = {"pt": 3e-3, "mt": 2e-3, "sft": 1e-3}


def get_config(stage="pt"):
    c = common.base(
        stage,
        # Built-in tokenizer: 448 BPE tokens + NEO's special tokens at 448.. (vocab padded to 464).
        vocab_size=464, hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=2, head_dim=32,
        num_prebuffer_layers=2, num_llm_layers=4, tie_word_embeddings=True, vision_dim=64,
        img_context_id=448, img_start_id=449, img_end_id=450,
    )
    d = c.data
    d.sources = [{"kind": "synthetic", "split": "train", "size": 20_000, "seed": 0,
                  "qtypes": list(STAGE_QTYPES[c.stage])}]
    d.text_ratio = -1.0
    d.tokenizer = "builtin"
    d.seq_len = 256
    d.patch_budget = 320
    d.batch_size = 8
    d.min_pixels, d.max_pixels = 32 * 32, 128 * 128  # keep the drawn size
    d.loss_weighting = "token"
    d.num_threads = 2
    d.prefetch = 8

    t = c.train
    t.lr = STAGE_LR[c.stage]
    t.total_steps = STAGE_STEPS[c.stage]
    t.warmup_steps = 20
    t.min_lr_ratio = 0.1
    t.b2 = 0.99
    t.weight_decay = 0.01
    t.trainable = "all"

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.strategy = -1, 1, 1, "dp"
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.log.every = 10
    c.eval_qtypes = EVAL_QTYPES  # what `neo-jax demo` scores at the end
    c.init_from = ""  # `neo-jax demo` chains the stages: mt from pt's workdir, sft from mt's
    return c
