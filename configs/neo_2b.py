"""NEO-2.2B: Qwen3-1.7B(-Base) post-LLM (28 layers) + 12 pre-buffer layers = 40 (NEO_PAPER.md §1.1)."""
import common


def get_config(stage="pt"):
    return common.base(
        stage,
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_heads=16, num_kv_heads=8,
        head_dim=128, num_prebuffer_layers=12, num_llm_layers=28, tie_word_embeddings=True,
        dtype="bfloat16", remat_policy="full",
    )
