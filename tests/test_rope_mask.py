import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.model import mask as mask_lib
from neo_jax.model import rope

CTX, START, END = 9, 7, 8


def test_figure3a_positions():
    # <SS> red <img> [2x2] </img> and blue <img> [2x2] </img> pills . <ES>
    toks = [1, 2, START] + [CTX] * 4 + [END, 3, 4, START] + [CTX] * 4 + [END, 5, 6, 0]
    expected = [[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [3, 0, 1], [3, 1, 0], [3, 1, 1], [4, 0, 0],
                [5, 0, 0], [6, 0, 0], [7, 0, 0], [8, 0, 0], [8, 0, 1], [8, 1, 0], [8, 1, 1], [9, 0, 0],
                [10, 0, 0], [11, 0, 0], [12, 0, 0]]
    got = rope.native_positions(np.array(toks), [[2, 2], [2, 2]], img_start_id=START, img_context_id=CTX)
    np.testing.assert_array_equal(got, expected)
    got_j = rope.native_positions(jnp.array(toks), jnp.array([[2, 2], [2, 2]]), img_start_id=START,
                                  img_context_id=CTX, xp=jnp)
    np.testing.assert_array_equal(np.asarray(got_j), expected)


def test_positions_non_square_grid_and_count_check():
    toks = np.array([1, START] + [CTX] * 6 + [END, 2])
    got = rope.native_positions(toks, [[2, 3]], img_start_id=START, img_context_id=CTX)
    np.testing.assert_array_equal(got[2:8, 1], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(got[2:8, 2], [0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="image_grids"):
        rope.native_positions(toks, [[2, 2]], img_start_id=START, img_context_id=CTX)


def random_packed_row(rng, length, max_docs=4):
    """A packed row of documents with text and images of random sizes, then padding."""
    toks, segs, pos = [], [], []
    for doc in range(1, rng.integers(1, max_docs + 1) + 1):
        t, grids = [], []
        for _ in range(rng.integers(1, 4)):
            t += list(rng.integers(10, 20, rng.integers(0, 5)))
            if rng.random() < 0.6:
                r, c = rng.integers(1, 4, 2)
                grids.append([r, c])
                t += [START] + [CTX] * (r * c) + [END]
        t += list(rng.integers(10, 20, rng.integers(1, 4)))
        if len(toks) + len(t) > length:
            break
        p = rope.native_positions(np.array(t), np.array(grids).reshape(-1, 2), img_start_id=START,
                                  img_context_id=CTX)
        toks += t
        segs += [doc] * len(t)
        pos += p.tolist()
    pad = length - len(toks)
    return (np.array(toks + [0] * pad), np.array(segs + [0] * pad), np.array(pos + [[0, 0, 0]] * pad))


def official_mask(toks, segs):
    """(k <= q AND same doc) OR (q image token AND k in the same image AND same doc); padding nowhere."""
    n = len(toks)
    is_ctx = toks == CTX
    after_start = np.concatenate([[False], toks[:-1] == START])
    image_id = np.where(is_ctx, np.cumsum(after_start) - 1, -1)
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    same_doc = (segs[:, None] == segs[None, :]) & (segs[:, None] != 0)
    same_img = is_ctx[:, None] & (image_id[:, None] == image_id[None, :]) & (image_id[None, :] >= 0)
    return ((k <= q) & same_doc) | (same_img & same_doc)


@pytest.mark.parametrize("seed", range(20))
def test_dense_mask_equals_official_and_tiles_are_sound(seed):
    rng = np.random.default_rng(seed)
    toks, segs, pos = random_packed_row(rng, 96)
    m = np.asarray(mask_lib.dense_mask(segs[None], pos[None], "mixed"))[0]
    np.testing.assert_array_equal(m, official_mask(toks, segs))
    assert not m[segs == 0].any() and not m[:, segs == 0].any()
    # numpy path agrees with jnp path.
    np.testing.assert_array_equal(mask_lib.dense_mask(segs[None], pos[None], "mixed", xp=np)[0], m)
    causal = np.asarray(mask_lib.dense_mask(segs[None], pos[None], "causal"))[0]
    idx = np.arange(len(toks))
    np.testing.assert_array_equal(
        causal, (segs[:, None] == segs[None, :]) & (segs[:, None] != 0) & (idx[None] <= idx[:, None]))
    for kind, dense in (("mixed", m), ("causal", causal)):
        for tile in (8, 16, 32):
            pat = np.asarray(mask_lib.tile_pattern(segs[None], pos[None], tile, kind))[0]
            n = len(toks) // tile
            blocks = dense.reshape(n, tile, n, tile).transpose(0, 2, 1, 3)
            assert not blocks[pat == mask_lib.EMPTY].any(), (kind, tile)
            assert blocks[pat == mask_lib.FULL].all(), (kind, tile)
            # Soundness is not enough: the pattern must also skip real work.
            assert (pat == mask_lib.EMPTY).sum() >= (~blocks.any((-1, -2))).sum() * 0.5


def _scores(q, k):
    return jnp.einsum("lhd,mhd->lmh", q, k)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_native_rope_scores_depend_only_on_offsets(axis):
    key = jax.random.PRNGKey(axis)
    kq, kk = jax.random.split(key)
    d = 32
    q = jax.random.normal(kq, (1, 1, 2 * d))
    k = jax.random.normal(kk, (1, 1, 2 * d))

    def rotated(x, p):
        pos = jnp.zeros((1, 3), jnp.int32).at[0, axis].set(p)
        return rope.apply_native_rope(x[..., :d], x[..., d:3 * d // 2], x[..., 3 * d // 2:], pos,
                                      theta_t=1e6, theta_hw=1e4)

    s1 = _scores(rotated(q, 17), rotated(k, 5))
    s2 = _scores(rotated(q, 112), rotated(k, 100))
    s3 = _scores(rotated(q, 13), rotated(k, 5))
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)
    assert abs(float(s1[0, 0, 0] - s3[0, 0, 0])) > 1e-4  # the offset does matter
    # Only the rotated axis' channels move.
    moved = rotated(q, 7) != q
    chans = {0: slice(0, d), 1: slice(d, 3 * d // 2), 2: slice(3 * d // 2, 2 * d)}[axis]
    assert bool(moved[..., chans].any())
    others = np.ones(2 * d, bool)
    others[chans] = False
    assert not bool(moved[..., others].any())


def test_vision_rope_relative_in_both_axes():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16))
    def s(a, b):
        p = jnp.array([a, b], jnp.int32)
        r = rope.apply_vision_rope_2d(x, p, 1e4)
        return float(r[0] @ r[1])
    base = s([0, 0], [2, 3])
    np.testing.assert_allclose(s([5, 7], [7, 10]), base, rtol=1e-5)
    assert abs(s([0, 0], [3, 2]) - base) > 1e-4
    # Interleaved pairs: channel pair (0, 1) rotated by the column by angle col * 1.
    p = jnp.array([[0, 1], [0, 1]], jnp.int32)
    r = rope.apply_vision_rope_2d(x, p, 1e4)
    c, sn = np.cos(1.0), np.sin(1.0)
    np.testing.assert_allclose(r[0, 0], x[0, 0] * c - x[0, 1] * sn, rtol=1e-5)
    np.testing.assert_allclose(r[0, 8:], x[0, 8:], rtol=1e-6)  # row 0: second half untouched
