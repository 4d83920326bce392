"""A laptop-CPU reproduction of Table 3 rows A, B, D, G, H, I and pre-buffer depths 0 / 2 / 4 (issue 8).

    neo-jax sweep --grid configs/ablations/cpu_repro.py --workdir /tmp/neo_ablations

The demo model (configs/demo.py: ~1.5M parameters, built-in tokenizer) trained from scratch on the synthetic
spatial questions (its `sft` stage: colour, shape, count, left/right, above/below, letter reading), the same
budget for every run (400 steps of 8 x 256 tokens at learning rate 2e-3, the demo's mid-training rate, since
nothing here is pretrained), 3 seeds each, scored on 600 held-out questions. Rows keep the demo's layers
(pre-buffer 2 + post-LLM 4). As in the paper's Figure 5, the depth runs put 0 / 2 (row H) / 4 pre-buffer
layers in front of the same 4-layer post-LLM. (Keeping the total fixed instead would compare identical
networks: from scratch, with every layer trained, pre-buffer and post-LLM blocks differ only in name.)
Results: docs/ablations.md.
"""

from table3 import ROWS as TABLE3_ROWS

ROWS = [row for row in TABLE3_ROWS if row[0] in ("A", "B", "D", "G", "H", "I")]


def get_grid():
    runs = [dict(id=i, attention=a, rope=r, overrides=o) for i, a, r, o in ROWS]
    runs += [dict(id=f"PB{d}", attention="Mixed", rope=f"Native-RoPE, pre-buffer {d} + 4",
                  overrides={"model.num_prebuffer_layers": d}) for d in (0, 4)]
    return dict(base="demo", stages=["sft"], steps={"sft": 400}, seeds=[0, 1, 2], eval="synthetic:600",
                overrides={"train.lr": 2e-3}, runs=runs)
