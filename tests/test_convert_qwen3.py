"""Qwen3 import: a random tiny transformers Qwen3ForCausalLM -> NEO parameters (post-LLM rule)."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from neo_jax.convert.qwen3 import import_qwen3  # noqa: E402
from neo_jax.model import init as init_lib  # noqa: E402
from neo_jax.model.config import ModelConfig  # noqa: E402
from neo_jax.model.neo import NEO  # noqa: E402

QWEN = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
            max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tiny_config):
    """The tiny NEO (2 pre-buffer + 2 post-LLM layers), whose LLM shapes equal QWEN's; shared compiles."""
    return ModelConfig.from_dict(tiny_config.model)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN)).eval()
    with torch.no_grad():  # non-trivial norms, so a dropped or swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    single = tmp_path_factory.mktemp("qwen_single")
    model.save_pretrained(single, safe_serialization=True)
    sharded = tmp_path_factory.mktemp("qwen_sharded")
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    assert os.path.isfile(sharded / "model.safetensors.index.json")
    return model, single, sharded


def test_text_logits_match_transformers(qwen, tiny):
    model, single, sharded = qwen
    cfg = dataclasses.replace(tiny, num_prebuffer_layers=0)
    tokens = np.random.default_rng(0).integers(0, 500, (2, 12)).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens).long()).logits.numpy()
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.stack([np.broadcast_to(np.arange(12), (2, 12))] + [np.zeros((2, 12), int)] * 2,
                                   -1).astype(np.int32)}
    for d in (single, sharded):
        params = import_qwen3(str(d), cfg)
        logits = np.asarray(NEO(cfg).apply({"params": params}, batch))
        assert np.abs(logits - ref).max() <= 1e-4, (d, np.abs(logits - ref).max())


@pytest.fixture(scope="module")
def imported(qwen, tiny):
    return import_qwen3(str(qwen[1]), tiny, seed=3)


def test_prebuffer_keeps_qwen3_weights_and_matches_post_llm_init(qwen, tiny, imported):
    model, single, _ = qwen
    cfg, params = tiny, imported
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    attn = params["llm"]["layers"]["self_attn"]
    for j in range(2):  # post-LLM layer j == Qwen3 layer j, bit for bit
        np.testing.assert_array_equal(attn["q_proj"]["kernel"][j], sd[f"model.layers.{j}.self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(params["llm"]["layers"]["mlp"]["down_proj"]["kernel"][j],
                                      sd[f"model.layers.{j}.mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(attn["k_norm"]["scale"][j], sd[f"model.layers.{j}.self_attn.k_norm.weight"])
    # The streamed import equals the in-memory rule (init.post_llm_init) on the same random init.
    stack = lambda fmt, t=True: np.stack([sd[fmt.format(j)].T if t else sd[fmt.format(j)] for j in range(2)])  # noqa
    llm = {"embed_tokens": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"],
           "lm_head": sd["lm_head.weight"].T, "layers": {
               "self_attn": {k: stack(f"model.layers.{{}}.self_attn.{k}.weight", "proj" in k)
                             for k in init_lib.LLM_LAYER_KEYS["self_attn"]},
               "mlp": {k: stack(f"model.layers.{{}}.mlp.{k}.weight") for k in init_lib.LLM_LAYER_KEYS["mlp"]},
               **{k: stack(f"model.layers.{{}}.{k}.weight", False) for k in init_lib.LLM_LAYER_KEYS[""]}}}
    want = init_lib.post_llm_init(init_lib.init_params(cfg, jax.random.PRNGKey(3)), llm, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)
    assert float(np.abs(np.asarray(params["prebuffer"]["layers"]["self_attn"]["q_proj"]["kernel"])).max()) > 0


def test_sharded_placement(qwen, tiny, imported):
    _, _, sharded = qwen
    cfg = tiny
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    spec = jax.sharding.PartitionSpec
    axes = init_lib.param_logical_axes(cfg)
    rules = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
    shardings = jax.tree_util.tree_map(
        lambda s: jax.sharding.NamedSharding(mesh, spec(*(rules.get(a) for a in s))), axes,
        is_leaf=lambda x: isinstance(x, spec))
    params = import_qwen3(str(sharded), cfg, seed=3, shardings=shardings)
    q = params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == shardings["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (2, 64, 16)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, imported)


def test_config_mismatch_names_the_field(qwen, tiny, tmp_path):
    _, single, _ = qwen
    with pytest.raises(ValueError, match="intermediate_size=128 .* model.intermediate_size=256"):
        import_qwen3(str(single), dataclasses.replace(tiny, intermediate_size=256))
    with pytest.raises(ValueError, match="num_hidden_layers=2 .* model.num_llm_layers=3"):
        import_qwen3(str(single), dataclasses.replace(tiny, num_llm_layers=3))
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((single / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        import_qwen3(str(bad), tiny)
