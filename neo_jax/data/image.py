"""Images: decode, smart_resize (factor 32), ImageNet normalisation, patchify (NEO_PAPER.md §1.8).

Patches come out in the grouped 2x2 order of the batch contract (DESIGN.md): each 16x16 patch is
flattened in (C, row, col) order to 768 values; consecutive groups of 4 patches form one 2x2 merge window
in the order (0,0), (0,1), (1,0), (1,1); windows are row-major over the image. Window k becomes the
image's k-th `<IMG_CONTEXT>` token.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageOps

from neo_jax.data.skips import ASPECT_RATIO, BAD_IMAGE, MISSING_FILE, Skip

PATCH = 16
FACTOR = 32  # patch 16 x merge 2
MAX_ASPECT_RATIO = 200
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = FACTOR):
    """(h, w) multiples of `factor`, area in [min_pixels, max_pixels], aspect ratio kept (Qwen2.5-VL rule).

    Round each side to the nearest multiple (at least one factor); if the area is too large scale by
    sqrt(area / max) and floor; if too small scale by sqrt(min / area) and ceil.
    """
    if min(height, width) <= 0:
        raise Skip(BAD_IMAGE, f"image has size {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise Skip(ASPECT_RATIO, f"aspect ratio {ratio:.1f} of a {width}x{height} image exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def per_image_max_pixels(max_pixels: int, min_pixels: int, num_images: int) -> int:
    """Multi-image budget (official trainer): max(2 * max_pixels // n, min_pixels) for n > 1 images."""
    return max_pixels if num_images <= 1 else max(max_pixels * 2 // num_images, min_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; RGBA/LA/transparent palette composited onto white; L/CMYK/P/I -> RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    if img.mode == "I;16" or img.mode == "I":
        arr = np.asarray(img, np.float64)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1) * 255, 0, 255).astype(np.uint8))
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(src, name: str = "") -> Image.Image:
    """Decodes a path, raw bytes, a PIL image or a uint8 HxWx3 array into a fully loaded RGB PIL image.

    A missing path raises Skip(missing_file); unreadable or truncated bytes raise Skip(bad_image)."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = Image.fromarray(src)
    else:
        if isinstance(src, (str, os.PathLike)):
            if not os.path.isfile(src):
                raise Skip(MISSING_FILE, f"image file {os.fspath(src)!r} does not exist")
            name = name or os.fspath(src)
        try:
            img = Image.open(src if not isinstance(src, (bytes, bytearray)) else io.BytesIO(src))
            img.load()  # decodes now, so truncated data fails here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise Skip(BAD_IMAGE, f"cannot decode image {name or '<bytes>'}: {e}") from None
    try:
        return to_rgb(img)
    except (OSError, ValueError) as e:
        raise Skip(BAD_IMAGE, f"cannot convert image {name or '<bytes>'} to RGB: {e}") from None


def normalize(img: Image.Image) -> np.ndarray:
    """RGB uint8 image -> float32 [H, W, 3], ImageNet mean/std."""
    x = np.asarray(img, np.float32) * (1.0 / 255.0)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def normalize_patches(patches: np.ndarray) -> np.ndarray:
    """uint8 patches [N, 768] ((C, row, col) order) -> float32, ImageNet mean/std; the same values as
    patchify(normalize(img)) up to float rounding, in two in-place passes over the smaller uint8 copy."""
    scale = np.repeat(1.0 / (255.0 * IMAGENET_STD), PATCH * PATCH).astype(np.float32)
    offset = np.repeat(-IMAGENET_MEAN / IMAGENET_STD, PATCH * PATCH).astype(np.float32)
    x = patches.astype(np.float32)
    x *= scale
    x += offset
    return x


def patchify(pixels: np.ndarray):
    """[H, W, 3] (H, W multiples of 32; any dtype) -> patches [N, 768], patch_positions int32 [N, 2] = (row, col) of
    each 16-px patch, in grouped 2x2 merge-window order; N = (H/16)(W/16)."""
    h, w, c = pixels.shape
    if h % FACTOR or w % FACTOR:
        raise ValueError(f"patchify needs sides that are multiples of {FACTOR}, got {h}x{w}")
    mh, mw = h // FACTOR, w // FACTOR
    x = pixels.reshape(mh, 2, PATCH, mw, 2, PATCH, c)
    # (mh, dr, pr, mw, dc, pc, c) -> (mh, mw, dr, dc, c, pr, pc)
    patches = x.transpose(0, 3, 1, 4, 6, 2, 5).reshape(mh * mw * 4, c * PATCH * PATCH)
    mr, mc, dr, dc = np.meshgrid(np.arange(mh), np.arange(mw), np.arange(2), np.arange(2), indexing="ij")
    pos = np.stack([2 * mr + dr, 2 * mc + dc], axis=-1).reshape(-1, 2).astype(np.int32)
    return np.ascontiguousarray(patches), pos


def process_image(src, *, min_pixels: int, max_pixels: int, name: str = ""):
    """Decode -> smart_resize (bicubic) -> normalise -> patchify.

    Returns (patches float32 [N, 768], patch_positions int32 [N, 2], grid (rows, cols) of merged 32-px
    tokens); the image takes rows*cols = N/4 `<IMG_CONTEXT>` tokens."""
    img = load_image(src, name)
    w, h = img.size
    rh, rw = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    if (rh, rw) != (h, w):
        img = img.resize((rw, rh), Image.BICUBIC)
    patches, pos = patchify(np.asarray(img))  # transpose the uint8 pixels, then normalise
    return normalize_patches(patches), pos, (rh // FACTOR, rw // FACTOR)
