import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax import config
from neo_jax.infer.generate import generate
from neo_jax.model import init as init_lib
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import Block
from neo_jax.model.mask import make_mask_info
from neo_jax.model.neo import NEO, init_cache, loss_fn
from neo_jax.model.rope import native_positions
from tests.batches import make_batch


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return ModelConfig.from_dict(tiny_config.model)


@pytest.fixture(scope="module")
def params(cfg):
    return init_lib.init_params(cfg, jax.random.PRNGKey(0))


def forward(cfg, params, batch):
    return NEO(cfg).apply({"params": params}, batch)


def test_scan_equals_unrolled_layer_loop(cfg, params):
    batch = make_batch(cfg, seed=1)
    model = NEO(cfg)
    ref = forward(cfg, params, batch)
    x = model.apply({"params": params}, batch["tokens"], batch["patches"], batch["patch_positions"],
                    method=NEO.embed)
    info = make_mask_info(batch["segment_ids"], batch["positions"], cfg.mask_kind)
    for stack, n in (("prebuffer", cfg.num_prebuffer_layers), ("llm", cfg.num_llm_layers)):
        for i in range(n):
            p = jax.tree_util.tree_map(lambda a: a[i], params[stack]["layers"])
            x, _ = Block(cfg).apply({"params": p}, x, None, batch["positions"], info, None)
    out = model.apply({"params": params}, x, method=NEO.logits)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_remat_gives_same_gradients(cfg, params):
    batch = make_batch(cfg, seed=2)

    def grads(c):
        def f(p):
            return loss_fn(forward(c, p, batch), batch["targets"], batch["loss_weights"])[0]
        return jax.jit(jax.grad(f))(params)

    g0 = grads(cfg)
    g1 = grads(dataclasses.replace(cfg, remat_policy="full"))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g0, g1)
    assert float(jnp.abs(g0["prebuffer"]["layers"]["self_attn"]["q_proj_hw"]["kernel"]).max()) > 0


@pytest.mark.parametrize("name,no_embed,total", [("neo_2b", 2.27e9, 2.59e9), ("neo_9b", 9.00e9, 10.25e9)])
def test_parameter_counts(name, no_embed, total):
    c = ModelConfig.from_dict(config.load(name).model)
    shapes = jax.eval_shape(lambda: init_lib.init_params(c, jax.random.PRNGKey(0)))
    sizes = {"/".join(str(k.key) for k in path): int(np.prod(x.shape))
             for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    n_total = sum(sizes.values())
    n_embed = sum(v for k, v in sizes.items() if k.startswith(("embed_tokens", "lm_head")))
    n_vision = sum(v for k, v in sizes.items() if k.startswith("vision"))
    assert abs(n_total - total) / total < 0.01, n_total
    assert abs(n_total - n_embed - no_embed) / no_embed < 0.01, n_total - n_embed
    assert c.num_layers == {"neo_2b": 40, "neo_9b": 42}[name]
    assert abs(n_vision - {"neo_2b": 9.18e6, "neo_9b": 17.6e6}[name]) / n_vision < 0.01


def _prompt(cfg, rng, n_text=5, grid=(2, 3)):
    r, c = grid
    toks = list(rng.integers(1, 400, 3)) + [cfg.img_start_id] + [cfg.img_context_id] * (r * c) + \
        [cfg.img_end_id] + list(rng.integers(1, 400, n_text))
    pos = native_positions(np.array(toks), [[r, c]], img_start_id=cfg.img_start_id,
                           img_context_id=cfg.img_context_id)
    ppos = [[2 * wr + dr, 2 * wc + dc] for wr in range(r) for wc in range(c) for dr, dc in
            ((0, 0), (0, 1), (1, 0), (1, 1))]
    patches = rng.normal(size=(len(ppos), cfg.patch_dim)).astype(np.float32)
    return np.array(toks, np.int32), pos, patches, np.array(ppos, np.int32)


@pytest.mark.parametrize("mask_kind", ["mixed", "causal"])
def test_prefill_then_decode_matches_full_forward(cfg, params, mask_kind):
    c = dataclasses.replace(cfg, mask_kind=mask_kind)
    rng = np.random.default_rng(0)
    toks, pos, patches, ppos = _prompt(c, rng)
    m = 4
    extra = rng.integers(1, 400, m).astype(np.int32)
    full_toks = np.concatenate([toks, extra])
    t0 = pos[:, 0].max()
    full_pos = np.concatenate([pos, np.stack([t0 + 1 + np.arange(m), np.zeros(m), np.zeros(m)], -1)]).astype(np.int32)
    n = len(full_toks)
    batch = {"tokens": full_toks[None], "positions": full_pos[None], "segment_ids": np.ones((1, n), np.int32),
             "patches": patches[None], "patch_positions": ppos[None]}
    ref = forward(c, params, batch)
    decode = jax.jit(lambda *a: NEO(c).apply({"params": params}, *a, method=NEO.decode))
    cache = init_cache(c, 1, n + 3)
    lp = len(toks)
    logits, cache = decode(toks[None], pos[None], np.ones((1, lp), np.int32), cache, patches[None], ppos[None])
    got = [logits]
    for i in range(m):
        lg, cache = decode(extra[None, i:i + 1], full_pos[None, lp + i:lp + i + 1], np.ones((1, 1), np.int32),
                           cache, None, None)
        got.append(lg)
    np.testing.assert_allclose(np.concatenate(got, 1), ref, atol=1e-5, rtol=1e-5)
    assert cache["prebuffer"][0].shape[-1] == 2 * c.head_dim and cache["llm"][1].shape[-1] == c.head_dim


def test_generate_greedy_matches_argmax_of_forward(cfg, params):
    rng = np.random.default_rng(3)
    toks, pos, patches, ppos = _prompt(cfg, rng)
    # Left-pad the prompt by two slots to exercise padding in the cache.
    pad = 2
    prompt = {"tokens": np.pad(toks, (pad, 0))[None], "positions": np.pad(pos, ((pad, 0), (0, 0)))[None],
              "segment_ids": np.pad(np.ones(len(toks), np.int32), (pad, 0))[None],
              "patches": patches[None], "patch_positions": ppos[None]}
    out, lengths = generate(cfg, params, prompt, max_new_tokens=3, eos_id=-1)
    # Re-run the full forward on prompt + generated tokens: greedy choices must be the forward's argmax.
    seq = np.concatenate([toks, np.asarray(out[0, :2])])
    t0 = pos[:, 0].max()
    full_pos = np.concatenate([pos, [[t0 + 1, 0, 0], [t0 + 2, 0, 0]]]).astype(np.int32)
    batch = {"tokens": seq[None], "positions": full_pos[None], "segment_ids": np.ones((1, len(seq)), np.int32),
             "patches": patches[None], "patch_positions": ppos[None]}
    ref = np.asarray(forward(cfg, params, batch))
    np.testing.assert_array_equal(np.asarray(out[0]), ref[0, len(toks) - 1:].argmax(-1))
    assert int(lengths[0]) == 3


def _random_llm(cfg, seed):
    rng = np.random.default_rng(seed)
    n, e, d, f = cfg.num_llm_layers, cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    hq, hk = cfg.num_heads * d, cfg.num_kv_heads * d
    r = lambda *s: (0.05 * rng.normal(size=s)).astype(np.float32)  # noqa: E731
    return {"embed_tokens": r(cfg.vocab_size, e), "norm": 1 + r(e), "lm_head": r(e, cfg.vocab_size),
            "layers": {"self_attn": {"q_proj": r(n, e, hq), "k_proj": r(n, e, hk), "v_proj": r(n, e, hk),
                                     "o_proj": r(n, hq, e), "q_norm": 1 + r(n, d), "k_norm": 1 + r(n, d)},
                       "mlp": {"gate_proj": r(n, e, f), "up_proj": r(n, e, f), "down_proj": r(n, f, e)},
                       "input_layernorm": 1 + r(n, e), "post_attention_layernorm": 1 + r(n, e)}}


def test_post_llm_init_rule_and_hw_branch_adds_zero(cfg):
    c = dataclasses.replace(cfg, num_prebuffer_layers=0)
    llm = _random_llm(c, 0)
    p = init_lib.post_llm_init(init_lib.init_params(c, jax.random.PRNGKey(1)), llm, c)
    attn = p["llm"]["layers"]["self_attn"]
    d, q = c.head_dim, llm["layers"]["self_attn"]["q_proj"].reshape(c.num_llm_layers, c.hidden_size,
                                                                     c.num_heads, c.head_dim)
    hw = np.asarray(attn["q_proj_hw"]["kernel"]).reshape(q.shape)
    quarters = np.concatenate([q[..., : d // 4], q[..., d // 2: 3 * d // 4]], -1)
    np.testing.assert_array_equal(hw[..., : d // 2], quarters)
    np.testing.assert_array_equal(hw[..., d // 2:], quarters)
    assert not np.asarray(attn["k_proj_hw"]["kernel"]).any()
    np.testing.assert_array_equal(attn["q_proj"]["kernel"], llm["layers"]["self_attn"]["q_proj"])
    # Text-only input: the model equals the same model without the H/W branch.
    plain = dataclasses.replace(c, hw_branch=False)
    p_plain = init_lib.post_llm_init(init_lib.init_params(plain, jax.random.PRNGKey(2)), llm, plain)
    batch = make_batch(c, seed=4, patch_budget=0)
    a, b = forward(c, p, batch), forward(plain, p_plain, batch)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # With pre-buffer layers the LLM weights sit unchanged in the post-LLM stack.
    c4 = dataclasses.replace(cfg, num_prebuffer_layers=3)
    p4 = init_lib.post_llm_init(init_lib.init_params(c4, jax.random.PRNGKey(3)), llm, c4)
    np.testing.assert_array_equal(p4["llm"]["layers"]["mlp"]["down_proj"]["kernel"], llm["layers"]["mlp"]["down_proj"])
    pre = np.asarray(p4["prebuffer"]["layers"]["self_attn"]["k_proj_hw"]["kernel"])
    assert abs(pre.std() - 0.02) < 0.005  # pre-buffer keeps N(0, 0.02)
    np.testing.assert_array_equal(p4["prebuffer"]["layers"]["self_attn"]["q_norm_h"]["scale"], 1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_and_grad_compile_finite(cfg, dtype):
    c = dataclasses.replace(cfg, dtype=dtype)
    params = init_lib.init_params(c, jax.random.PRNGKey(0))
    batch = make_batch(c, seed=5)

    @jax.jit
    def step(p, b):
        def f(p):
            s, w = loss_fn(NEO(c).apply({"params": p}, b), b["targets"], b["loss_weights"])
            return s / w
        return jax.value_and_grad(f)(p)

    loss, g = step(params, batch)
    assert np.isfinite(float(loss)) and 4 < float(loss) < 8  # ~log(vocab=512)=6.2 at init
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree_util.tree_leaves(g))


def test_bad_batches_are_refused_with_the_field_name(cfg, params):
    good = make_batch(cfg, seed=6)
    bad = dict(good, positions=good["positions"][..., :2])
    with pytest.raises(ValueError, match="positions"):
        forward(cfg, params, bad)
    bad = dict(good, segment_ids=good["segment_ids"].astype(np.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        forward(cfg, params, bad)
    bad = dict(good, patches=good["patches"][:, :4], patch_positions=good["patch_positions"][:, :4])
    bad["tokens"] = bad["tokens"].copy()
    bad["tokens"][0, :3] = cfg.img_context_id
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        forward(cfg, params, bad)
    with pytest.raises(ValueError, match="tokens"):
        forward(cfg, params, {k: v for k, v in good.items() if k != "tokens"})


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_logits_loss(cfg, tied):
    c = dataclasses.replace(cfg, tie_word_embeddings=tied, num_prebuffer_layers=1, num_llm_layers=1)
    params = init_lib.init_params(c, jax.random.PRNGKey(7))
    batch = make_batch(c, seed=8)

    def full(p):
        s, w = loss_fn(forward(c, p, batch), batch["targets"], batch["loss_weights"])
        return s / w

    def chunked(p):
        s, w = NEO(c).apply({"params": p}, batch, 16, method=NEO.loss)
        return s / w

    (l0, g0), (l1, g1) = jax.jit(jax.value_and_grad(full))(params), jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)
