"""A built-in, seeded dataset of drawn scenes with captions and spatial questions (demo and tests).

Each scene is a small image (96 x 96 px: one image token per grid cell) with 1-5 objects (circle / square /
triangle, six colours) in the cells of a 3 x 3 grid, and sometimes a capital letter. Questions need the
layout:

    color      "What color is the square?"                         red | green | blue | ...
    shape      "What shape is the blue object?"                    circle | square | triangle
    count      "How many circles are there?"                       one | two | three | four
    left_right "Is the red circle left or right of the center?"   left | right   (outer columns only)
    above_below"Is the red circle above or below the middle?"     above | below  (outer rows only)
    read       "What letter is written in the image?"             A ... H
    caption    "Describe the image." -> a sentence listing the objects and where they are

Answers are single words from ANSWERS[qtype]; `chance(qtype)` is the accuracy of guessing uniformly.
Records follow the annotation format (`id`, `images` = [PNG bytes], `conversations`) plus `meta` =
{qtype, answer}. Splits "train" and "test" draw from different seed streams.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
          "yellow": (235, 200, 30), "purple": (140, 60, 170), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
LETTERS = tuple("ABCDEFGH")
NUMBERS = ("one", "two", "three", "four")
QTYPES = ("color", "shape", "count", "left_right", "above_below", "read", "caption")
ANSWERS = {
    "color": tuple(COLORS), "shape": SHAPES, "count": NUMBERS, "left_right": ("left", "right"),
    "above_below": ("above", "below"), "read": LETTERS,
}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SPLITS = {"train": 0, "test": 1}
# 96 x 96 px = 3 x 3 image tokens (16 px patches, 2 x 2 merge): one token per grid cell, so every object
# lies in exactly one image token.
SIZE = (96, 96)


def chance(qtype: str) -> float:
    """Accuracy of a uniform guess over the answer set of a question type."""
    return 1.0 / len(ANSWERS[qtype])


def _place(rng, n):
    cells = rng.permutation(9)[:n]
    return [(int(c) // 3, int(c) % 3) for c in cells]


def make_scene(rng, qtype):
    """Objects [(shape, color, row, col)], letter or None, question, answer."""
    def objs(n, shapes=None):
        cells = _place(rng, n)
        shapes = shapes if shapes is not None else [SHAPES[i] for i in rng.integers(0, 3, n)]
        colors = [list(COLORS)[i] for i in rng.integers(0, len(COLORS), n)]
        return [(s, c, r, k) for s, c, (r, k) in zip(shapes, colors, cells)]

    letter = None
    if qtype == "count":
        shape = SHAPES[rng.integers(3)]
        k = int(rng.integers(1, 5))
        others = [s for s in SHAPES if s != shape]
        extra = [others[i] for i in rng.integers(0, 2, int(rng.integers(0, 3)))]
        o = objs(k + len(extra), [shape] * k + extra)
        return o, None, f"How many {shape}s are there?", NUMBERS[k - 1]
    if qtype in ("color", "shape"):
        o = objs(int(rng.integers(1, 4)), [str(s) for s in rng.permutation(SHAPES)][:3])
        o = [(s, list(COLORS)[i], r, c) for (s, _, r, c), i in zip(o, rng.permutation(len(COLORS)))]
        s, c, _, _ = o[0]
        if qtype == "color":
            return o, None, f"What color is the {s}?", c
        return o, None, f"What shape is the {c} object?", s
    if qtype in ("left_right", "above_below"):
        # One lookup: the named object sits in an outer column (row); 1-2 others anywhere.
        axis = 3 if qtype == "left_right" else 2
        while True:
            o = objs(int(rng.integers(2, 4)))
            if o[0][axis] != 1 and all(x[:2] != o[0][:2] for x in o[1:]):
                break
        s1, c1, r1, k1 = o[0]
        if qtype == "left_right":
            return o, None, f"Is the {c1} {s1} left or right of the center?", "left" if k1 == 0 else "right"
        return o, None, f"Is the {c1} {s1} above or below the middle?", "above" if r1 == 0 else "below"
    if qtype == "read":
        letter = LETTERS[rng.integers(len(LETTERS))]
        return objs(int(rng.integers(0, 2))), letter, "What letter is written in the image?", letter
    o = objs(int(rng.integers(1, 4)))
    parts = [f"a {c} {s} at the {ROWS[r]} {COLS[k]}" for s, c, r, k in o]
    return o, None, "Describe the image.", ("There is " + ", ".join(parts) + ".").replace("  ", " ")


def letter_cell(objects, rng):
    """The free grid cell (row, col) the letter is written in."""
    free = [(r, c) for r in range(3) for c in range(3) if all((o[2], o[3]) != (r, c) for o in objects)]
    return free[int(rng.integers(len(free)))]


def draw(objects, letter, size, cell=None):
    """Renders the scene on a light background; objects fill ~80% of their grid cell, the letter (if any)
    is written in `cell`."""
    w, h = size
    img = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(img)
    cw, ch = w / 3, h / 3
    for shape, color, r, c in objects:
        x0, y0 = c * cw + 0.1 * cw, r * ch + 0.1 * ch
        x1, y1 = (c + 1) * cw - 0.1 * cw, (r + 1) * ch - 0.1 * ch
        fill = COLORS[color]
        if shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    if letter is not None:
        r, c = cell
        font = ImageFont.load_default(size=int(ch * 0.8))
        d.text(((c + 0.5) * cw, (r + 0.5) * ch), letter, fill=(0, 0, 0), font=font, anchor="mm")
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SyntheticSource:
    """Random-access source (a grain data source): record i of a split is a pure function of (seed, i).

    qtypes: the question types to draw from (uniformly, by index); captions included by default."""

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0, qtypes=QTYPES):
        if split not in SPLITS:
            raise ValueError(f"synthetic split {split!r} is not one of {list(SPLITS)}")
        unknown = set(qtypes) - set(QTYPES)
        if unknown:
            raise ValueError(f"unknown synthetic question types {sorted(unknown)}; known: {QTYPES}")
        self.split, self.size, self.seed, self.qtypes = split, int(size), int(seed), tuple(qtypes)

    def __len__(self):
        return self.size

    def scene(self, i) -> dict:
        """What record i shows and asks, without drawing it: {qtype, objects, letter, cell, question,
        answer}; two records with equal scenes have identical images and questions."""
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"synthetic index {i} out of range [0, {self.size})")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        qtype = self.qtypes[int(rng.integers(len(self.qtypes)))]
        objects, letter, question, answer = make_scene(rng, qtype)
        cell = letter_cell(objects, rng) if letter is not None else None
        return dict(qtype=qtype, objects=tuple(objects), letter=letter, cell=cell, question=question,
                    answer=answer)

    def scene_key(self, i) -> tuple:
        """A hashable key of record i's image and question (to find the same scene in another split)."""
        sc = self.scene(i)
        return tuple(sorted(sc["objects"])), sc["letter"], sc["cell"], sc["question"]

    def __getitem__(self, i):
        sc = self.scene(i)
        img = draw(sc["objects"], sc["letter"], SIZE, sc["cell"])
        return {
            "id": f"synthetic/{self.split}/{int(i)}",
            "images": [png_bytes(img)],
            "conversations": [{"from": "human", "value": f"<image>\n{sc['question']}"},
                              {"from": "gpt", "value": sc["answer"]}],
            "meta": {"qtype": sc["qtype"], "answer": sc["answer"]},
        }

    def __repr__(self):
        return f"SyntheticSource(split={self.split!r}, size={self.size}, seed={self.seed})"


def corpus() -> list[str]:
    """Every word and phrase the dataset can produce, as sentences (trains the built-in tokenizer)."""
    lines = []
    for c in COLORS:
        for s in SHAPES:
            lines.append(f"Is the {c} {s} left or right of the {c} {s}? left right")
            lines.append(f"Is the {c} {s} above or below the {c} {s}? above below")
            lines.append(f"What color is the {s}? {c}. What shape is the {c} object? {s}")
            for r in ROWS:
                for k in COLS:
                    lines.append(f"Describe the image. There is a {c} {s} at the {r} {k}, and more.")
    for s in SHAPES:
        lines.append(f"How many {s}s are there? " + " ".join(NUMBERS))
    lines.append("What letter is written in the image? " + " ".join(LETTERS))
    lines.append("The quick brown fox jumps over the lazy dog. 0123456789 \n\n user assistant system")
    return lines * 4
