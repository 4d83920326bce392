"""Images (resize, conversions, patch order) and record encoding, checked against hand-built expectations."""
import io

import numpy as np
import pytest
from PIL import Image

from neo_jax.data import encode, image
from neo_jax.data.skips import Skip
from neo_jax.data.tokenizer import load_tokenizer


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def reference_patches(x):
    """Independent statement of the grouped order: for each 2x2 window (row-major), its 16-px patches
    (0,0), (0,1), (1,0), (1,1), each flattened channel-first."""
    rows, cols = x.shape[0] // 32, x.shape[1] // 32
    patches, pos = [], []
    for wr in range(rows):
        for wc in range(cols):
            for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                r, c = 2 * wr + dr, 2 * wc + dc
                patches.append(x[16 * r:16 * r + 16, 16 * c:16 * c + 16].transpose(2, 0, 1).reshape(-1))
                pos.append((r, c))
    return np.stack(patches), np.array(pos)


@pytest.mark.parametrize("hw,limits,expected", [
    ((480, 640), (256 * 256, 1024 * 1024), (480, 640)),
    ((470, 650), (256 * 256, 1024 * 1024), (480, 640)),        # nearest multiples of 32
    ((1536, 2048), (256 * 256, 1024 * 1024), (864, 1152)),    # floor after scaling down
    ((100, 120), (256 * 256, 1024 * 1024), (256, 288)),        # ceil after scaling up
    ((10, 1000), (32 * 32, 2048 * 2048), (32, 992)),
])
def test_smart_resize(hw, limits, expected):
    h, w = image.smart_resize(*hw, min_pixels=limits[0], max_pixels=limits[1])
    assert (h, w) == expected and h % 32 == 0 and w % 32 == 0
    assert limits[0] <= h * w <= limits[1]


def test_aspect_ratio_and_multi_image_budget():
    with pytest.raises(Skip, match="aspect_ratio"):
        image.smart_resize(2, 500, min_pixels=1, max_pixels=10**6)
    assert image.per_image_max_pixels(4096 * 4096, 256 * 256, 1) == 4096 * 4096
    assert image.per_image_max_pixels(1000_000, 65536, 4) == 500_000
    assert image.per_image_max_pixels(100_000, 65536, 8) == 65536


def test_image_modes_and_exif():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:16, :, 3] = 255  # top opaque red, bottom transparent
    out = np.asarray(image.load_image(png(rgba)))
    assert (out[0, 0] == (255, 0, 0)).all() and (out[-1, 0] == (255, 255, 255)).all()
    gray = Image.fromarray(np.full((8, 8), 77, np.uint8))
    assert np.asarray(image.load_image(gray))[0, 0].tolist() == [77, 77, 77]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert image.load_image(cmyk).mode == "RGB"
    assert image.load_image(Image.new("P", (8, 8))).mode == "RGB"
    # EXIF orientation 6 (rotate 90 CW to display): a 40x20 stored image displays as 20x40.
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert image.load_image(buf.getvalue()).size == (20, 40)


def test_patch_order_matches_merge_windows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 96, 3)).astype(np.float32)
    patches, pos = image.patchify(x)
    want, want_pos = reference_patches(x)
    np.testing.assert_array_equal(patches, want)
    np.testing.assert_array_equal(pos, want_pos)
    arr = rng.integers(0, 256, (64, 96, 3), np.uint8)
    p, q, grid = image.process_image(png(arr), min_pixels=32 * 32, max_pixels=128 * 128)
    assert grid == (2, 3) and len(p) == 4 * grid[0] * grid[1] == len(q)


def test_two_image_conversation_exact_arrays():
    tok = load_tokenizer("builtin")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (32, 64, 3), np.uint8)  # grid (1, 2): 2 tokens, 8 patches
    b = rng.integers(0, 256, (32, 32, 3), np.uint8)  # grid (1, 1): 1 token, 4 patches
    record = {"id": "two", "images": [png(a), png(b)], "conversations": [
        {"from": "human", "value": "<image> and <image>\nWhich?"}, {"from": "gpt", "value": "left"},
        {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "red"}]}
    doc = encode.encode_record(record, tok, min_pixels=32 * 32, max_pixels=64 * 64, loss_weighting="square")

    S, E, ctx = tok.im_start_id, tok.im_end_id, tok.img_context_id
    I0, I1, enc = tok.img_start_id, tok.img_end_id, tok.encode
    user1 = [S] + enc("user\n") + [I0, ctx, ctx, I1] + enc(" and ") + [I0, ctx, I1] + enc("\nWhich?") + [E] + enc("\n")
    ans1 = enc("left") + [E] + enc("\n")
    user2 = [S] + enc("user\nWhy?") + [E] + enc("\n")
    ans2 = enc("red") + [E] + enc("\n")
    head = [S] + enc("assistant\n")
    tokens = user1 + head + ans1 + user2 + head + ans2
    supervised = [0] * len(user1 + head) + [1] * len(ans1) + [0] * len(user2 + head) + [1] * len(ans2)
    np.testing.assert_array_equal(doc["tokens"], tokens)
    np.testing.assert_array_equal(doc["targets"][:-1], tokens[1:])  # shifted exactly once
    w = 1 / np.sqrt(sum(supervised))
    np.testing.assert_allclose(doc["loss_weights"], np.array(supervised[1:] + [0]) * w, rtol=1e-6)

    # Positions: a plain walk over the tokens (text +1; an image's tokens share T(<img>)+1).
    t, want, k = -1, [], 0
    grids = [(1, 2), (1, 1)]
    for i, tid in enumerate(tokens):
        if tid == ctx:
            g = grids[k]
            j = sum(1 for x in tokens[:i] if x == ctx) - sum(r * c for r, c in grids[:k])
            want.append((t + 1, j // g[1], j % g[1]))
            if j == g[0] * g[1] - 1:
                t, k = t + 1, k + 1
        else:
            t += 1
            want.append((t, 0, 0))
    np.testing.assert_array_equal(doc["positions"], want)
    assert doc["positions"][tokens.index(I0) + 1].tolist() == [doc["positions"][tokens.index(I0)][0] + 1, 0, 0]

    norm = lambda u: (u / np.float32(255) - image.IMAGENET_MEAN) / image.IMAGENET_STD  # noqa: E731
    pa, qa = reference_patches(norm(a.astype(np.float32)))
    pb, qb = reference_patches(norm(b.astype(np.float32)))
    np.testing.assert_allclose(doc["patches"], np.concatenate([pa, pb]), atol=1e-6)
    assert doc["patch_positions"].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3],
                                               [0, 0], [0, 1], [1, 0], [1, 1]]
    assert len(doc["patches"]) == 4 * int((doc["tokens"] == ctx).sum())


@pytest.mark.parametrize("weighting,value", [("token", 1.0), ("sample", 1 / 4), ("square", 1 / 2)])
def test_loss_weightings(weighting, value):
    assert encode.sample_weight(4, weighting) == value
    with pytest.raises(ValueError, match="loss_weighting"):
        encode.sample_weight(4, "mean")


def test_truncation_never_cuts_an_image():
    tok = load_tokenizer("builtin")
    arr = np.zeros((64, 64, 3), np.uint8)
    record = {"id": "t", "images": [png(arr)], "conversations": [
        {"from": "human", "value": "<image>\nLook."}, {"from": "gpt", "value": "ok " * 30}]}
    full = encode.encode_record(record, tok, min_pixels=1024, max_pixels=64 * 64)
    n_img_end = list(full["tokens"]).index(tok.img_end_id)
    with pytest.raises(Skip, match="oversize"):
        encode.encode_record(record, tok, min_pixels=1024, max_pixels=64 * 64, seq_len=n_img_end + 5)
    cut = encode.encode_record(record, tok, min_pixels=1024, max_pixels=64 * 64, seq_len=len(full["tokens"]) - 3,
                               truncate=True)
    assert len(cut["tokens"]) == len(full["tokens"]) - 3 and len(cut["patches"]) == 16
    assert cut["loss_weights"][-1] == 0
    with pytest.raises(Skip, match="oversize"):  # cut before the image: nothing supervised is left
        encode.encode_record(record, tok, min_pixels=1024, max_pixels=64 * 64, seq_len=n_img_end - 1, truncate=True)
    later = dict(record, conversations=[{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "yes"},
                                        *record["conversations"]])
    full = encode.encode_record(later, tok, min_pixels=1024, max_pixels=64 * 64)
    n_img_end = list(full["tokens"]).index(tok.img_end_id)
    inside = encode.encode_record(later, tok, min_pixels=1024, max_pixels=64 * 64, seq_len=n_img_end - 1,
                                  truncate=True)  # the cut would split the image: it goes before <img>
    assert tok.img_start_id not in inside["tokens"] and len(inside["patches"]) == 0
    assert list(inside["tokens"]) == list(full["tokens"][:len(inside["tokens"])])
    assert inside["loss_weights"].sum() > 0
