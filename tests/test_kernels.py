"""Memory-efficient attention backends equal the dense reference (forward and backward) on packed rows.

Pallas kernels (splash, gpu) run in interpret mode on CPU. References are computed once per case
(module fixtures). Under a mesh every backend runs per device in `shard_map` (kernels/sharding.py); the
tiny model's train step with blockwise on a (2,2,2) mesh is checked in tests/test_step.py.
"""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from neo_jax import kernels
from neo_jax.kernels import blockwise, gpu, sharding, splash, xla
from neo_jax.model import mask as mask_lib
from neo_jax.parallel import mesh as mesh_lib
from tests.test_rope_mask import random_packed_row

SCALE = 0.25
BACKENDS = {
    "blockwise": functools.partial(blockwise.attention, tile_q=64, tile_k=32),
    "splash": functools.partial(splash.attention, block=128),
    "gpu": functools.partial(gpu.attention, block=32),
}


def packed_info(seed, length, batch, max_docs=6):
    rng = np.random.default_rng(seed)
    rows = [random_packed_row(rng, length, max_docs=max_docs) for _ in range(batch)]
    seg = np.stack([r[1] for r in rows])
    pos = np.stack([r[2] for r in rows])
    return mask_lib.make_mask_info(seg, pos), seg


def qkv(seed, b, lq, lk, h, kvh, d, dv, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(ks[0], (b, lq, h, d), dtype), jax.random.normal(ks[1], (b, lk, kvh, d), dtype),
            jax.random.normal(ks[2], (b, lk, kvh, dv), dtype), jax.random.normal(ks[3], (b, lq, h, dv)))


def value_and_grads(fn, q, k, v, info, ct):
    def loss(q, k, v):
        out = fn(q, k, v, info, scale=SCALE)
        return jnp.sum(out.astype(jnp.float32) * ct), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, g


@pytest.fixture(scope="module")
def case256():
    info, seg = packed_info(0, 256, 2)
    q, k, v, ct = qkv(1, 2, 256, 256, 4, 2, 16, 8)
    return info, seg, (q, k, v, ct), value_and_grads(xla.attention, q, k, v, info, ct)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_equals_reference_f32(name, case256):
    info, seg, (q, k, v, ct), (ref, ref_g) = case256
    out, g = value_and_grads(BACKENDS[name], q, k, v, info, ct)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    pad = seg == 0
    assert pad.any() and not np.isnan(np.asarray(out)).any()
    assert (np.asarray(out)[pad] == 0).all() and (np.asarray(g[0])[pad] == 0).all()


@pytest.fixture(scope="module")
def case_bf16():
    """NEO head sizes: Dqk 256 (T128|H64|W64), Dv 128, one kv head per two q heads, bf16."""
    info, _ = packed_info(2, 128, 1)
    q, k, v, ct = qkv(3, 1, 128, 128, 2, 1, 256, 128, jnp.bfloat16)
    return info, (q, k, v, ct), value_and_grads(xla.attention, q, k, v, info, ct)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_equals_reference_bf16_wide_heads(name, case_bf16):
    info, (q, k, v, ct), (ref, ref_g) = case_bf16
    out, g = value_and_grads(BACKENDS[name], q, k, v, info, ct)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    for a, b in zip(g, ref_g):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2e-2 * max(1.0, np.abs(b).max())


@pytest.fixture(scope="module")
def case2048():
    info, _ = packed_info(4, 2048, 1, max_docs=40)
    q, k, v, ct = qkv(5, 1, 2048, 2048, 2, 1, 16, 8)
    return info, (q, k, v, ct), value_and_grads(xla.attention, q, k, v, info, ct)


@pytest.mark.parametrize("name", ["blockwise", "gpu"])
def test_long_row_2048(name, case2048):
    info, (q, k, v, ct), (ref, ref_g) = case2048
    fn = functools.partial(blockwise.attention, tile_q=256, tile_k=256) if name == "blockwise" else \
        functools.partial(gpu.attention, block=128)
    out, g = value_and_grads(fn, q, k, v, info, ct)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["blockwise", "gpu"])
def test_decode_shapes_lq_differs_from_lk(name, case256):
    """Chunked prefill / decode: the last 19 queries (and the very last one) against the full cache."""
    info, _, (q, k, v, ct), (ref, _) = case256
    for start in (256 - 19, 255):
        sub = mask_lib.MaskInfo(info.q_segment_ids[:, start:], info.kv_segment_ids, info.q_key[:, start:],
                                info.kv_key)
        out = BACKENDS[name](q[:, start:], k, v, sub, scale=SCALE)
        np.testing.assert_allclose(out, ref[:, start:], atol=1e-5, rtol=1e-5)


def test_blockwise_visits_exactly_the_non_empty_tiles(case256):
    info, _, (q, k, v, _), (ref, _) = case256
    out, stats = blockwise.attention_with_stats(q, k, v, info, scale=SCALE, tile_q=8, tile_k=16)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    pattern = np.asarray(stats["pattern"])
    # visited == 2 where computed without a mask, 1 with it, 0 never: equal to EMPTY/PARTIAL/FULL.
    np.testing.assert_array_equal(np.asarray(stats["visited"]), pattern)
    assert (pattern == mask_lib.EMPTY).any() and (pattern == mask_lib.FULL).any()
    # The pattern it follows is the exact non-empty set of the dense mask.
    dense = np.asarray(mask_lib.mask_from_info(info))
    blocks = dense.reshape(2, 32, 8, 16, 16).any((2, 4))
    np.testing.assert_array_equal(pattern != mask_lib.EMPTY, blocks)


def test_splash_block_mask_is_the_tile_pattern_and_horizon_is_exact(case256):
    info, _, _, _ = case256
    fwd, dkv = splash.mask_infos(info, 128, 128)
    np.testing.assert_array_equal(np.asarray(fwd.block_mask)[:, 0],
                                  np.asarray(mask_lib.tile_pattern_from_info(info, 128, 128)))
    # Inside a segment, k <= horizon(q) is exactly the mixed mask.
    h = np.asarray(splash.horizon(info))
    seg = np.asarray(info.q_segment_ids)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    via_horizon = same & (np.arange(256)[None, None, :] <= h[:, :, None])
    np.testing.assert_array_equal(via_horizon, np.asarray(mask_lib.mask_from_info(info)))


def _mesh(data, fsdp, tensor):
    cfg = mesh_lib.mesh_config(data=data, fsdp=fsdp, tensor=tensor)
    return mesh_lib.make_mesh(cfg, devices=jax.devices()[:data * fsdp * tensor])


def _shard_map_specs(fn, *args):
    eqns = [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "shard_map"]
    return [e.params["in_specs"][0] for e in eqns]


def _assert_close_on_mesh(fn, mesh, info, q, k, v, ct, ref, ref_g, spec):
    """Under `jax.set_mesh` (as the train step runs), fn runs in one shard_map with q's spec `spec`,
    and its output and gradients equal the single-device reference."""
    with jax.set_mesh(mesh):
        specs = _shard_map_specs(lambda q, k, v: fn(q, k, v, info, scale=SCALE), q, k, v)
        out, g = value_and_grads(fn, q, k, v, info, ct)
    assert specs == [spec], specs
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_under_shard_map_on_a_mesh(name, case256):
    """Batch 4 over data x fsdp = 2 x 2, the 2 kv heads over tensor = 2."""
    info, _, (q, k, v, ct), (ref, ref_g) = case256
    twice = lambda t: jax.tree.map(lambda x: jnp.concatenate([x, x], 0), t)  # noqa: E731
    _assert_close_on_mesh(BACKENDS[name], _mesh(2, 2, 2), twice(info), *twice((q, k, v, ct)), twice(ref),
                          twice(ref_g), P(("data", "fsdp"), None, "tensor", None))


def test_kernel_called_directly_without_a_mesh_or_on_one_device(case256):
    """Single-device programs (CPU training, benchmarks) keep exactly the unwrapped kernel."""
    info, _, (q, k, v, _), _ = case256
    fn = lambda q, k, v: blockwise.attention(q, k, v, info, scale=SCALE)  # noqa: E731
    assert _shard_map_specs(fn, q, k, v) == []
    with jax.set_mesh(_mesh(1, 1, 1)):
        assert _shard_map_specs(fn, q, k, v) == []


def test_heads_replicated_when_kv_heads_do_not_divide_over_tensor(case256, caplog):
    """2 kv heads on tensor = 4: rows split over data only, heads whole on every device, logged once;
    the gradients of the inputs replicated over tensor are still exact (not summed over it)."""
    info, _, (q, k, v, ct), (ref, ref_g) = case256
    sharding._logged.clear()
    with caplog.at_level(logging.INFO, logger="neo_jax.kernels"):
        _assert_close_on_mesh(BACKENDS["blockwise"], _mesh(2, 1, 4), info, q, k, v, ct, ref, ref_g,
                              P(("data",), None, None, None))
    assert sum("kv heads 2 do not divide over tensor=4" in r.getMessage() for r in caplog.records) == 1


def test_blockwise_memory_per_device_shrinks_with_the_batch_mesh():
    """AOT-compiled forward + backward, 8 rows: under shard_map each of 8 devices needs ~1/8 of the
    one-device temp memory. Left to the SPMD partitioner (no shard_map) the tile loops keep every row
    on every device: that was the per-device growth `neo-jax plan` showed (launch/README.md)."""
    b, length, h, kvh, d = 8, 1024, 4, 2, 64
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    args = (f32(b, length, h, d), f32(b, length, kvh, d), f32(b, length, kvh, d),
            mask_lib.MaskInfo(*[jax.ShapeDtypeStruct((b, length), jnp.int32)] * 4), f32(b, length, h, d))

    def grads(kernel):
        return jax.jit(jax.grad(lambda q, k, v, info, ct: jnp.sum(kernel(q, k, v, info) * ct), (0, 1, 2)))

    wrapped = lambda q, k, v, info: blockwise.attention(q, k, v, info, scale=SCALE, tile_q=64, tile_k=64)  # noqa
    direct = lambda q, k, v, info: blockwise._attention(q, k, v, info, SCALE, 64, 64)  # noqa: E731
    temp = lambda fn: fn.lower(*args).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    one_device = temp(grads(wrapped))
    mesh = _mesh(8, 1, 1)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P(("data", "fsdp")))
        sharded = temp(jax.jit(grads(wrapped), in_shardings=rows))
        partitioner = temp(jax.jit(grads(direct), in_shardings=rows))
    assert sharded < 1.25 * one_device / 8, (sharded, one_device)
    assert partitioner > one_device / 2, (partitioner, one_device)


def test_dispatch_orders_and_falls_back_with_a_logged_reason(caplog):
    q256, q1, k256 = (jnp.zeros((1, n, 2, 8)) for n in (256, 1, 256))
    q4k = jnp.zeros((1, 4096, 2, 8))
    assert kernels.choose(q4k, q4k, "auto", platform="tpu") == "splash"
    assert kernels.choose(q4k, q4k, "auto", platform="gpu") == "gpu"
    assert kernels.choose(q4k, q4k, "auto", platform="cpu") == "blockwise"
    assert kernels.choose(q256, k256, "auto", platform="cpu") == "xla"
    with caplog.at_level(logging.INFO, logger="neo_jax.kernels"):
        assert kernels.choose(q1, k256, "splash", platform="tpu") == "blockwise"
        assert kernels.choose(q1, k256, "splash", platform="tpu") == "blockwise"
    assert sum("Lq=1 != Lk=256" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="flash"):
        kernels.choose(q256, k256, "flash")


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    from neo_jax.model import init as init_lib
    from neo_jax.model.config import ModelConfig
    from tests.batches import make_batch

    cfg = ModelConfig.from_dict(tiny_config.model)
    return cfg, init_lib.init_params(cfg, jax.random.PRNGKey(0)), make_batch(cfg, seed=3, seq_len=128)


def _loss_and_grads(cfg, impl, params, batch):
    import dataclasses

    from neo_jax.model.neo import NEO, loss_fn

    c = dataclasses.replace(cfg, attention_impl=impl)

    def f(p):
        s, w = loss_fn(NEO(c).apply({"params": p}, batch), batch["targets"], batch["loss_weights"])
        return s / w

    loss, g = jax.jit(jax.value_and_grad(f))(params)
    return float(loss), g


@pytest.fixture(scope="module")
def model_reference(tiny_model):
    cfg, params, batch = tiny_model
    return _loss_and_grads(cfg, "xla", params, batch)


@pytest.mark.parametrize("impl", ["splash", "gpu"])  # blockwise: tests/test_step.py, on a mesh
def test_model_loss_and_grads_with_each_backend(impl, tiny_model, model_reference):
    cfg, params, batch = tiny_model
    ref_loss, ref_g = model_reference
    loss, g = _loss_and_grads(cfg, impl, params, batch)
    assert abs(loss - ref_loss) < 1e-5
    flat, flat_ref = jax.tree.leaves(g), jax.tree.leaves(ref_g)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(flat, flat_ref)) < 1e-4
    assert max(float(jnp.abs(a).max()) for a in flat_ref) > 1e-3  # the gradients are not all ~0
