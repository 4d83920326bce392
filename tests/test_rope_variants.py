"""RoPE ablation variants (Table 3): positions of the paper's example, channel maps, training, KV-cache decoding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.infer.generate import generate
from neo_jax.model import init as init_lib
from neo_jax.model import rope
from neo_jax.model.config import ModelConfig
from neo_jax.model.neo import NEO, init_cache, loss_fn

CTX, START, END = 9, 7, 8
VARIANTS = ("1d", "il", "mrope", "mmrope", "video")
# <SS> red <img> [2x2] </img> and blue <img> [2x2] </img> pills . <ES>
FIG = [1, 2, START] + [CTX] * 4 + [END, 3, 4, START] + [CTX] * 4 + [END, 5, 6, 0]


def _same(*idx):
    return [[i, i, i] for i in idx]


def _image(s, rows, cols, dh=0, dw=0):
    return [[s, s + r - dh, s + c - dw] for r in range(rows) for c in range(cols)]


QWEN_LAYOUT = _same(0, 1, 2) + _image(3, 2, 2) + _same(5, 6, 7, 8) + _image(9, 2, 2) + _same(11, 12, 13, 14)
EXPECTED = {
    "1d": _same(*range(19)),
    # Qwen2-VL get_rope_index: image t = s, h/w = s + row/col; the next text index is max + 1.
    "mrope": QWEN_LAYOUT, "il": QWEN_LAYOUT, "mmrope": QWEN_LAYOUT,
    # VideoRoPE diagonal layout: h/w = s + row/col - centre (0 for a 2x2 grid); the next text is max T + 1.
    "video": _same(0, 1, 2) + _image(3, 2, 2) + _same(4, 5, 6, 7) + _image(8, 2, 2) + _same(9, 10, 11, 12),
    "native": [[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [3, 0, 1], [3, 1, 0], [3, 1, 1], [4, 0, 0], [5, 0, 0],
               [6, 0, 0], [7, 0, 0], [8, 0, 0], [8, 0, 1], [8, 1, 0], [8, 1, 1], [9, 0, 0], [10, 0, 0],
               [11, 0, 0], [12, 0, 0]],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_figure_example_positions(kind):
    got = rope.rope_positions(kind, np.array(FIG), [[2, 2], [2, 2]], img_start_id=START, img_context_id=CTX)
    np.testing.assert_array_equal(got, EXPECTED[kind])
    got_j = rope.rope_positions(kind, jnp.array(FIG), jnp.array([[2, 2], [2, 2]]), img_start_id=START,
                                img_context_id=CTX, xp=jnp)
    np.testing.assert_array_equal(np.asarray(got_j), EXPECTED[kind])


def test_non_square_grid_offsets_and_centring():
    toks = np.array([1, START] + [CTX] * 6 + [END, 2])  # one image of 2 rows x 3 cols
    kw = dict(img_start_id=START, img_context_id=CTX)
    m = rope.rope_positions("mrope", toks, [[2, 3]], **kw)
    np.testing.assert_array_equal(m, _same(0, 1) + _image(2, 2, 3) + _same(5, 6))  # advances by max(2, 3)
    v = rope.rope_positions("video", toks, [[2, 3]], **kw)
    np.testing.assert_array_equal(v, _same(0, 1) + _image(2, 2, 3, dh=0, dw=1) + _same(3, 4))
    with pytest.raises(ValueError, match="image_grids"):
        rope.rope_positions("mrope", toks, [[2, 2]], **kw)
    with pytest.raises(ValueError, match="rope_kind"):
        rope.rope_positions("2d", toks, [[2, 3]], **kw)


def test_t_block_frequency_maps():
    counts = lambda a: np.bincount(a, minlength=3).tolist()  # noqa: E731
    m = rope.t_block_axes("mrope", 64)
    assert counts(m) == [16, 24, 24] and (np.diff(m) >= 0).all()  # Qwen2-VL mrope_section, contiguous
    v = rope.t_block_axes("video", 64)
    assert (v[48:] == 0).all() and (v[:48:2] == 1).all() and (v[1:48:2] == 2).all()  # t on the lowest freqs
    np.testing.assert_array_equal(rope.t_block_axes("il", 6), [0, 1, 2, 0, 1, 2])
    mm = rope.t_block_axes("mmrope", 64)
    assert all(counts(mm[g:g + 16]) == [4, 6, 6] for g in range(0, 64, 16))  # 2:3:3 in every meta group
    assert counts(rope.t_block_axes("mmrope", 8)) == [2, 3, 3]
    assert not rope.t_block_axes("1d", 64).any()


@pytest.mark.parametrize("kind", VARIANTS)
def test_variant_rotary_is_relative_and_text_is_1d(kind):
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    d = 32
    q, k = jax.random.normal(kq, (1, 1, 2 * d)), jax.random.normal(kk, (1, 1, 2 * d))

    def rot(x, p):
        return rope.apply_variant_rope(kind, x[..., :d], x[..., d:3 * d // 2], x[..., 3 * d // 2:],
                                       jnp.array([p], jnp.int32), theta_t=1e6, theta_hw=1e4)

    s = lambda a, b: float(jnp.sum(rot(q, a) * rot(k, b)))  # noqa: E731
    np.testing.assert_allclose(s([7, 9, 4], [3, 2, 2]), s([107, 59, 34], [103, 52, 32]), rtol=1e-4)
    for axis in range(3):  # each of t, h, w moves the score
        other = [7, 9, 4]
        other[axis] += 3
        assert abs(s(other, [3, 2, 2]) - s([7, 9, 4], [3, 2, 2])) > 1e-4, axis
    # Text (t = h = w = p): the T block is plain 1D RoPE by p.
    r = rot(q, [5, 5, 5])
    np.testing.assert_allclose(r[..., :d], rope.apply_rope(q[..., :d], jnp.array([5]), 1e6), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- the model with each variant


@pytest.fixture(scope="module")
def base_cfg(tiny_config):
    return ModelConfig.from_dict(tiny_config.model)


@pytest.fixture(scope="module")
def params(base_cfg):
    return init_lib.init_params(base_cfg, jax.random.PRNGKey(0))  # parameters do not depend on rope_kind


def _document(cfg, kind, rng, grids):
    toks, ppos = list(rng.integers(1, 400, 2)), []
    for r, c in grids:
        toks += [cfg.img_start_id] + [cfg.img_context_id] * (r * c) + [cfg.img_end_id] + list(rng.integers(1, 400, 2))
        ppos += [[2 * wr + dr, 2 * wc + dc] for wr in range(r) for wc in range(c) for dr, dc in
                 ((0, 0), (0, 1), (1, 0), (1, 1))]
    kw = dict(img_start_id=cfg.img_start_id, img_context_id=cfg.img_context_id)
    toks = np.array(toks, np.int32)
    return (toks, rope.native_positions(toks, grids, **kw), rope.rope_positions(kind, toks, grids, **kw),
            np.array(ppos, np.int32).reshape(-1, 2))


def _packed_batch(cfg, kind, seed, length=48, patch_budget=32):
    """Two rows, each two documents (an image in each) packed and padded; targets shifted inside documents."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(2):
        t, p, rp, s, pp = [], [], [], [], []
        for doc in (1, 2):
            toks, pos, rpos, ppos = _document(cfg, kind, rng, [[int(rng.integers(1, 3)), int(rng.integers(1, 3))]])
            t, p, rp = t + toks.tolist(), p + pos.tolist(), rp + rpos.tolist()
            s, pp = s + [doc] * len(toks), pp + ppos.tolist()
        n, m = length - len(t), patch_budget - len(pp)
        rows.append((t + [0] * n, p + [[0] * 3] * n, rp + [[0] * 3] * n, s + [0] * n, pp + [[0, 0]] * m))
    tokens, pos, rpos, seg, ppos = (np.array(x, np.int32) for x in zip(*rows))
    same = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((2, 1), bool)], 1) & (seg > 0)
    nxt = np.concatenate([tokens[:, 1:], np.zeros((2, 1), np.int32)], 1)
    patches = rng.normal(size=(2, patch_budget, cfg.patch_dim)).astype(np.float32)
    return {"tokens": tokens, "positions": pos, "rope_positions": rpos, "segment_ids": seg, "patches": patches,
            "patch_positions": ppos, "targets": np.where(same, nxt, 0).astype(np.int32),
            "loss_weights": (same & (nxt != cfg.img_context_id)).astype(np.float32)}


@pytest.mark.parametrize("kind", VARIANTS)
def test_variant_trains_a_step_and_decodes_like_its_forward(base_cfg, params, kind):
    c = dataclasses.replace(base_cfg, rope_kind=kind)
    # One document: a prompt with two images, then m text tokens continuing the variant's text index.
    rng = np.random.default_rng(2)
    toks, pos, rpos, ppos = _document(c, kind, rng, [[2, 2], [1, 2]])
    patches = rng.normal(size=(len(ppos), c.patch_dim)).astype(np.float32)
    m, lp = 3, len(toks)
    extra = rng.integers(1, 400, m).astype(np.int32)
    n0 = int(rope.next_rope_index(kind, rpos[None], np.ones((1, lp), bool))[0])
    t0 = pos[:, 0].max() + 1
    text_rpos = np.asarray(rope.text_rope_position(kind, n0 + np.arange(m)))
    seq = np.concatenate([toks, extra])
    full = {"tokens": seq[None],
            "positions": np.concatenate([pos, np.stack([t0 + np.arange(m), 0 * extra, 0 * extra], -1)])[None],
            "rope_positions": np.concatenate([rpos, text_rpos])[None],
            "segment_ids": np.ones((1, lp + m), np.int32), "patches": patches[None], "patch_positions": ppos[None],
            "targets": np.concatenate([seq[1:], [0]])[None],
            "loss_weights": (np.arange(lp + m) >= lp - 1).astype(np.float32)[None]}
    full = {k: v.astype(np.float32 if k in ("patches", "loss_weights") else np.int32) for k, v in full.items()}

    def loss(p, b):
        logits = NEO(c).apply({"params": p}, b)
        s, w = loss_fn(logits, b["targets"], b["loss_weights"])
        return s / w, logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, ref), g = step(params, full)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(g)]
    assert np.isfinite(float(value)) and all(np.isfinite(x).all() for x in leaves)
    assert np.abs(np.asarray(g["prebuffer"]["layers"]["self_attn"]["k_proj_hw"]["kernel"])).max() > 0
    # The variant's positions are what the rotary uses: the Native indexes give another loss.
    assert abs(float(step(params, dict(full, rope_positions=full["positions"]))[0][0]) - float(value)) > 1e-6

    # Prefill the prompt, then decode the m tokens one at a time: the same logits as the full forward.
    decode = jax.jit(lambda *a: NEO(c).apply({"params": params}, *a, method=NEO.decode))
    cache = init_cache(c, 1, lp + m)
    logits, cache = decode(toks[None], pos[None], np.ones((1, lp), np.int32), cache, patches[None], ppos[None],
                           rpos[None])
    got = [logits]
    for i in range(m):
        sl = slice(lp + i, lp + i + 1)
        lg, cache = decode(full["tokens"][:, sl], full["positions"][:, sl], np.ones((1, 1), np.int32), cache,
                           None, None, full["rope_positions"][:, sl])
        got.append(lg)
    np.testing.assert_allclose(np.concatenate(got, 1), ref, atol=1e-5, rtol=1e-5)
    if kind != "mrope":  # generate() is one more compile; one variant whose text index departs from T suffices
        return
    assert n0 != t0  # M-RoPE's next index (max over t, h, w + 1) is not Native's T
    prompt = {k: full[k][:, :lp] for k in ("tokens", "positions", "rope_positions", "segment_ids")}
    prompt.update(patches=full["patches"], patch_positions=full["patch_positions"])
    out, _ = generate(c, params, prompt, max_new_tokens=2, eos_id=-1)
    # Greedy token 1 is the argmax after the prompt; token 2 the argmax after prompt + token 1.
    assert int(out[0, 0]) == int(np.asarray(ref)[0, lp - 1].argmax())
    with_first = dict(full, tokens=np.concatenate([toks, np.asarray(out[0, :1]), extra[1:]])[None])
    (_, ref2), _ = step(params, with_first)
    assert int(out[0, 1]) == int(np.asarray(ref2)[0, lp].argmax())


def test_variant_needs_rope_positions_and_a_known_kind(base_cfg, params):
    c = dataclasses.replace(base_cfg, rope_kind="mrope")
    batch = _packed_batch(c, "mrope", seed=3)
    with pytest.raises(ValueError, match="rope_positions"):
        NEO(c).apply({"params": params}, {k: v for k, v in batch.items() if k != "rope_positions"})
    with pytest.raises(ValueError, match="rope_kind"):
        dataclasses.replace(base_cfg, rope_kind="3d")
    # init's dummy batch carries rope_positions for a variant, and the parameters are the same for every kind.
    shapes = jax.eval_shape(lambda: init_lib.init_params(c, jax.random.PRNGKey(0)))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(base_cfg, rope_kind="video", head_dim=8)


def _grids_from_native(tokens, native, ctx):
    """Each image's merged grid (rows, cols), read back from the Native H/W of its context tokens."""
    t = native[tokens == ctx]
    return [[int(t[t[:, 0] == v][:, 1].max()) + 1, int(t[t[:, 0] == v][:, 2].max()) + 1]
            for v in np.unique(t[:, 0])]


def test_data_pipeline_adds_the_variants_rope_positions():
    import ml_collections

    from neo_jax.data import pipeline

    d = pipeline.data_config("pt")
    d.sources = [{"kind": "synthetic", "size": 16}]
    d.seq_len, d.patch_budget, d.batch_size = 128, 96, 2
    d.min_pixels, d.max_pixels = 32 * 32, 128 * 96
    d.num_threads, d.prefetch, d.pack_bins = 1, 4, 2
    tok = None
    for kind in ("native", "video"):
        cfg = ml_collections.ConfigDict({"data": d, "model": {"rope_kind": kind}})
        batch = next(pipeline.make_pipeline(cfg, process_index=0, process_count=1))
        if kind == "native":
            assert "rope_positions" not in batch
            continue
        from neo_jax.data.tokenizer import load_tokenizer

        tok = load_tokenizer(d.tokenizer)
        assert batch["rope_positions"].shape == batch["positions"].shape
        n_images = 0
        for row in range(2):
            seg = batch["segment_ids"][row]
            for s in range(1, int(seg.max()) + 1):
                idx = np.flatnonzero(seg == s)
                toks = batch["tokens"][row, idx]
                grids = _grids_from_native(toks, batch["positions"][row, idx], tok.img_context_id)
                n_images += len(grids)
                want = rope.rope_positions(kind, toks, np.array(grids).reshape(-1, 2), img_start_id=tok.img_start_id,
                                           img_context_id=tok.img_context_id)
                np.testing.assert_array_equal(batch["rope_positions"][row, idx], want)
            assert not batch["rope_positions"][row, seg == 0].any()
        assert n_images > 0
