"""Optimiser: presets, schedule, stage freezing masks, and that frozen params get no optimizer state."""
import jax
import numpy as np
import pytest

from neo_jax.model.init import init_params
from neo_jax.parallel.rules import model_config
from neo_jax.train import optim


@pytest.fixture(scope="module")
def abstract_params(tiny_config):
    mcfg = model_config(tiny_config.model)
    return jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0)))


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_presets_follow_the_paper_and_the_scripts():
    paper, official = optim.train_config("pt", "paper"), optim.train_config("pt", "official")
    assert (paper.lr, paper.warmup_steps, paper.total_steps, paper.min_lr_ratio, paper.b2) == (8e-4, 2000, 190_000, 0.05, 0.999)
    assert (official.warmup_steps, official.total_steps, official.min_lr_ratio, official.b2) == (1000, 200_000, 0.1, 0.95)
    assert optim.train_config("mt", "paper").lr == 4e-5 and optim.train_config("mt", "official").lr == 5e-5
    assert optim.train_config("sft", "paper").lr == 5e-5 and optim.train_config("sft", "official").lr == 6e-5
    with pytest.raises(ValueError, match="preset"):
        optim.train_config("pt", "nope")


def test_schedule_warmup_peak_and_floor():
    c = optim.train_config("pt")
    c.warmup_steps, c.total_steps = 10, 110
    lr = optim.lr_schedule(c)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), c.lr, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), c.lr * (1 + c.min_lr_ratio) / 2, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(float(lr(110)), c.lr * c.min_lr_ratio, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10_000)), c.lr * c.min_lr_ratio, rtol=1e-6)


def test_pt_trainable_mask(abstract_params):
    m = _flat(optim.trainable_mask(abstract_params, "pt"))
    trainable = {k for k, v in m.items() if v}
    for name in ("vision/patch_embedding/kernel", "vision/dense_embedding/bias",
                 "prebuffer/layers/self_attn/q_proj/kernel", "prebuffer/layers/mlp/down_proj/kernel",
                 "prebuffer/layers/input_layernorm/scale", "llm/layers/self_attn/q_proj_hw/kernel",
                 "llm/layers/self_attn/k_proj_hw/kernel", "llm/layers/self_attn/q_norm_h/scale",
                 "llm/layers/self_attn/k_norm_w/scale"):
        assert name in trainable, name
    for name in ("embed_tokens/embedding", "lm_head/kernel", "norm/scale", "llm/layers/self_attn/q_proj/kernel",
                 "llm/layers/self_attn/k_norm/scale", "llm/layers/mlp/gate_proj/kernel",
                 "llm/layers/input_layernorm/scale"):
        assert name in m and name not in trainable, name
    assert all(jax.tree.leaves(optim.trainable_mask(abstract_params, "sft")))
    assert all(jax.tree.leaves(optim.trainable_mask(abstract_params, "mt")))
    assert all(jax.tree.leaves(optim.trainable_mask(abstract_params, "pt", "all")))


def test_weight_decay_skips_norms_and_biases(abstract_params):
    d = _flat(optim.decay_mask(abstract_params))
    assert d["llm/layers/self_attn/q_proj/kernel"] and d["embed_tokens/embedding"]
    assert not d["llm/layers/input_layernorm/scale"] and not d["vision/patch_embedding/bias"]
    assert not d["prebuffer/layers/self_attn/q_norm_h/scale"]


def _bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_no_optimizer_state_for_frozen_params(tiny_config, abstract_params, stage):
    tx = optim.make_optimizer(optim.train_config(stage), abstract_params, stage)
    state = jax.eval_shape(tx.init, abstract_params)
    mask = optim.trainable_mask(abstract_params, stage)
    trainable = sum(x.size * x.dtype.itemsize for x, t in zip(jax.tree.leaves(abstract_params),
                                                               jax.tree.leaves(mask)) if t)
    scalars = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim == 0)
    assert _bytes(state) - scalars == 2 * trainable  # Adam mu + nu, nothing for frozen leaves
    if stage == "pt":
        assert trainable < _bytes(abstract_params)
        frozen_shape = abstract_params["embed_tokens"]["embedding"].shape
        assert all(x.shape != frozen_shape for x in jax.tree.leaves(state))
