"""A tiny NEO for tests and smoke runs: every code path of the big ones at toy sizes."""
import common


def get_config(stage="pt"):
    return common.base(
        stage,
        vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
        head_dim=16, num_prebuffer_layers=2, num_llm_layers=2, tie_word_embeddings=False,
        vision_dim=32, img_context_id=448, img_start_id=449, img_end_id=450,  # the built-in tokenizer's ids
    )
