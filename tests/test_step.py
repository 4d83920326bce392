"""The sharded train step: mesh invariance, shardings, exact gradient accumulation, pt freezing.

Five step compilations of the tiny model (the expensive part); states after the first share one init.
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from neo_jax import config
from neo_jax.parallel import mesh as mesh_lib
from neo_jax.parallel.rules import model_config
from neo_jax.train import optim, step as step_lib
from tests.batches import make_batch

ROWS, SEQ, PATCHES = 8, 64, 32


def _cfg(stage="sft", strategy="fsdp", grad_accum=1):
    cfg = config.load(f"tiny:{stage}")
    cfg.train.warmup_steps, cfg.train.total_steps, cfg.train.lr = 0, 10, 1e-3
    # Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 a ~1e-9 gradient entry turns into an
    # O(lr) step whose size depends on its last bits (summation order), so params would only match to
    # ~lr. A larger eps keeps the update a smooth function of the gradient; it still moves params ~lr.
    cfg.train.eps = 1e-3
    cfg.train.grad_accum = grad_accum
    cfg.mesh.strategy = strategy
    return cfg


def _mesh(data, fsdp, tensor):
    n = data * fsdp * tensor
    return mesh_lib.make_mesh(mesh_lib.mesh_config(data=data, fsdp=fsdp, tensor=tensor), devices=jax.devices()[:n])


def _run(cfg, mesh, params, batches):
    state, shardings = step_lib.create_train_state(cfg, mesh, 0, params=params)
    step = step_lib.make_train_step(cfg, mesh, shardings)
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append(jax.device_get(m))
    return state, shardings, metrics


@pytest.fixture(scope="module")
def batch(tiny_config):
    return make_batch(model_config(tiny_config.model), seed=3, batch_size=ROWS, seq_len=SEQ, patch_budget=PATCHES)


@pytest.fixture(scope="module")
def reference(batch):
    """One sft step on a single device from a fresh init: (initial params on host, state, metrics)."""
    cfg = _cfg()
    mesh = _mesh(1, 1, 1)
    state, _ = step_lib.create_train_state(cfg, mesh, 0)
    params0 = jax.device_get(state.params)
    state, _, metrics = _run(cfg, mesh, params0, [batch])
    return params0, jax.device_get(state.params), metrics[0]


@pytest.fixture(scope="module")
def sharded(reference, batch):
    params0 = reference[0]
    return _run(_cfg(strategy="fsdp_tp"), _mesh(2, 2, 2), params0, [batch])


def _assert_tree_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_mesh_222_matches_single_device(reference, sharded):
    params0, params1, m1 = reference
    state, _, (m,) = sharded
    assert m1["weight_sum"] > 0 and m1["lr"] == pytest.approx(1e-3)
    np.testing.assert_allclose(m["loss"], m1["loss"], atol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m["tokens"] == m1["tokens"] and m["weight_sum"] == m1["weight_sum"]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params0)))
    assert moved > 1e-4  # the step did update the parameters
    _assert_tree_close(jax.device_get(state.params), params1, atol=1e-5)


def test_blockwise_attention_on_a_mesh_matches_single_device(reference, batch):
    """attention_impl=blockwise runs per device under shard_map (neo_jax/kernels/sharding.py: rows over
    data x fsdp, kv heads over tensor) and gives the single-device xla step."""
    params0, params1, m1 = reference
    cfg = _cfg(strategy="fsdp_tp")
    cfg.model.attention_impl = "blockwise"
    state, _, (m,) = _run(cfg, _mesh(2, 2, 2), params0, [batch])
    np.testing.assert_allclose(m["loss"], m1["loss"], atol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
    _assert_tree_close(jax.device_get(state.params), params1, atol=1e-5)


def test_state_carries_the_rule_shardings(sharded):
    state, shardings, _ = sharded
    expect = {("llm", "layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),
              ("llm", "layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
              ("embed_tokens", "embedding"): P("tensor", "fsdp"),
              ("lm_head", "kernel"): P("fsdp", "tensor"),
              ("prebuffer", "layers", "post_attention_layernorm", "scale"): P(None, None)}

    def get(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    adam = state.opt_state.inner_states["train"].inner_state[1][0]
    for path, spec in expect.items():
        for x in (get(state.params, path), get(adam.mu, path), get(adam.nu, path)):
            assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(x.sharding.mesh, spec), x.ndim), (path, x.sharding)
    # a sharded leaf really is split: each device holds 1/(fsdp*tensor) of q_proj
    q = get(state.params, ("llm", "layers", "self_attn", "q_proj", "kernel"))
    assert q.addressable_shards[0].data.size * 4 == q.size
    assert state.step.sharding.is_fully_replicated


def test_gradient_accumulation_equals_one_big_batch(reference, batch):
    params0, params1, m1 = reference
    state, _, (m,) = _run(_cfg(grad_accum=2), _mesh(1, 1, 1), params0, [batch])
    np.testing.assert_allclose(m["loss"], m1["loss"], atol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m["weight_sum"] == m1["weight_sum"]
    _assert_tree_close(jax.device_get(state.params), params1, atol=1e-5)
    with pytest.raises(ValueError, match="grad_accum=3 each micro-batch"):
        _run(_cfg(grad_accum=3), _mesh(1, 1, 1), params0, [batch])


def test_pt_freezes_the_llm_bit_for_bit(reference, batch):
    params0 = reference[0]
    cfg = _cfg(stage="pt")
    second = make_batch(model_config(cfg.model), seed=4, batch_size=ROWS, seq_len=SEQ, patch_budget=PATCHES)
    state, _, metrics = _run(cfg, _mesh(1, 4, 2), params0, [batch, second])
    assert all(np.isfinite(m["loss"]) for m in metrics)
    mask = optim.trainable_mask(params0, "pt")
    after = jax.device_get(state.params)
    n_frozen = n_trained = 0
    for (path, a), b, t in zip(jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(params0), jax.tree.leaves(mask)):
        if t:
            n_trained += not np.array_equal(a, b)
        else:
            n_frozen += 1
            assert np.array_equal(a, b), f"frozen {jax.tree_util.keystr(path)} changed"
    assert n_frozen >= 10 and n_trained >= 10
    # Adam moments only for the trainable leaves
    trainable_bytes = sum(x.nbytes for x, t in zip(jax.tree.leaves(params0), jax.tree.leaves(mask)) if t)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_bytes == 2 * trainable_bytes
