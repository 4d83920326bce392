"""NEO-9B: Qwen3-8B(-Base) post-LLM (36 layers) + 6 pre-buffer layers = 42 (NEO_PAPER.md §1.1)."""
import common


def get_config(stage="pt"):
    return common.base(
        stage,
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_heads=32, num_kv_heads=8,
        head_dim=128, num_prebuffer_layers=6, num_llm_layers=36, tie_word_embeddings=False,
        dtype="bfloat16", remat_policy="full",
    )
