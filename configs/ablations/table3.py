"""The paper's Table 3 grid (attention mode x RoPE variant) and Figure 5 depths, at the paper's scale.

    neo-jax sweep --grid configs/ablations/table3.py --workdir gs://bucket/table3 --emit --prefix "..."

Setting (NEO_PAPER.md §4): Qwen3-1.7B post-LLM (neo_2b), pre-buffer depth 4, PT then SFT. The paper's
budgets (20M PT + 2M SFT samples) are far beyond one machine: emit the commands, one TPU slice per run,
then `neo-jax sweep --collect` gathers the table. Evaluation here is the synthetic held-out split; point
`eval` at VLMEvalKit TSVs for the paper's benchmarks.
"""

ROWS = [  # id, attention, RoPE label, model overrides
    ("A", "Causal", "1D-RoPE", {"model.mask_kind": "causal", "model.rope_kind": "1d"}),
    ("B", "Mixed", "1D-RoPE", {"model.rope_kind": "1d"}),
    ("C", "Mixed", "IL-RoPE", {"model.rope_kind": "il"}),
    ("D", "Mixed", "M-RoPE", {"model.rope_kind": "mrope"}),
    ("E", "Mixed", "MM-RoPE", {"model.rope_kind": "mmrope"}),
    ("F", "Mixed", "Video-RoPE", {"model.rope_kind": "video"}),
    ("G", "Causal", "Native-RoPE", {"model.mask_kind": "causal"}),
    ("H", "Mixed", "Native-RoPE", {}),
    ("I", "Mixed", "Native-RoPE*", {"model.rope_theta_hw": 1e6}),
]


def get_grid():
    runs = [dict(id=i, attention=a, rope=r, overrides={"model.num_prebuffer_layers": 4, **o}) for i, a, r, o in ROWS]
    runs += [dict(id=f"PB{d}", attention="Mixed", rope="Native-RoPE", overrides={"model.num_prebuffer_layers": d})
             for d in (0, 2, 6, 8, 10, 12)]  # Figure 5 (depth 4 is row H)
    return dict(base="neo_2b", stages=["pt", "sft"], steps={"pt": 20_000, "sft": 4_000}, seeds=[0],
                eval="synthetic:1000", runs=runs)
