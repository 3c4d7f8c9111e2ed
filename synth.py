"""The synthetic intention-driven VQA set: the built-in data every command can run on offline.

A digit in a coloured frame, too small to read in the downscaled full image (~224 px a side) but
legible in the 224 px crop at native resolution. Written in Visual-CoT's metadata format with PNG
images, so `data.read_records` reads it like any other data set.
"""

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# synthetic intention-driven VQA: a digit in a coloured frame, too small to read in the
# downscaled full image (~224 px a side) but legible in the 224 px crop at native resolution

SYNTH_VERSION = 1  # bump when the generator changes: cached copies are keyed by it
SYNTH_COLORS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 60, 220),
                "yellow": (225, 185, 0), "magenta": (200, 40, 200), "cyan": (0, 175, 195)}
_QUESTIONS = ("What digit is inside the {} frame?", "Which number is written in the {} square?",
              "Read the digit in the {} box.", "What number does the {} frame contain?")
_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")

# Sizes, chosen by looking at renders. The full image reaches the model at about 224x224 (a scale
# of 0.33-0.5): with the 24 px / 3 px-stroke digits first planned the small digit stayed readable, at
# 14 px / 2 px it shrinks to 5-7 px with sub-pixel strokes blurred together with the thin grey lines
# drawn inside its frame. The 224 px crop reaches the model at native resolution, where 2 px black
# strokes stand out clearly from 1 px grey lines.
_GLYPH_H, _STROKE, _FRAME_SIDES, _BORDER = 14, 2, (36, 48), 3

def _draw_digit(draw, digit, x, y):
    """A 7-segment digit with its top-left at (x, y); drawn, not a font, so identical on every machine."""
    h, s = _GLYPH_H, _STROKE - 1  # rectangles include their end pixel
    w, m = h // 2 + _STROKE, y + h // 2
    seg = {"a": (x, y, x + w, y + s), "g": (x, m - s // 2, x + w, m + s - s // 2),
           "d": (x, y + h - s, x + w, y + h), "f": (x, y, x + s, m), "b": (x + w - s, y, x + w, m),
           "e": (x, m, x + s, y + h), "c": (x + w - s, m, x + w, y + h)}
    for name in _SEGMENTS[digit]:
        draw.rectangle(seg[name], fill=(0, 0, 0))

def _synth_image(rng: random.Random):
    """One synthetic image and its frames [(color name, digit, (x1, y1, x2, y2))], target first."""
    w, h = rng.randint(448, 672), rng.randint(448, 672)
    base = rng.randint(228, 245)
    img = Image.new("RGB", (w, h), (base, base, base))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(40, 70)):  # clutter: thin grey lines ...
        g = rng.randint(110, 200)
        draw.line([(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)], fill=(g, g, g),
                  width=rng.choice((1, 1, 2)))
    for _ in range(rng.randint(25, 45)):  # ... and small grey shapes
        g, x, y, s = rng.randint(110, 200), rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 20)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + s, y + s * rng.uniform(0.5, 1.5)), outline=(g, g, g), width=rng.choice((1, 2)))
    # mild noise on the background only, so frame pixels keep their exact colour (tests rely on it);
    # in 4x4 px blocks because per-pixel noise makes PNG encoding 3-4x slower
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, 6, (h // 4 + 1, w // 4 + 1, 1))
    noise = noise.astype(np.int16).repeat(4, 0).repeat(4, 1)[:h, :w]
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    n = rng.randint(3, 5)
    colors = rng.sample(sorted(SYNTH_COLORS), n)
    target = rng.randrange(10)
    digits = [target] + rng.sample([d for d in range(10) if d != target], n - 1)  # a wrong crop reads wrong
    frames = []
    while len(frames) < n:  # rejection sampling ends fast: 5 frames fill under 10% of the smallest image
        side = rng.randint(*_FRAME_SIDES)
        x, y = rng.randint(8, w - 8 - side), rng.randint(8, h - 8 - side)
        box = (x, y, x + side, y + side)
        if any(x < b[2] + 8 and b[0] < box[2] + 8 and y < b[3] + 8 and b[1] < box[3] + 8
               for _, _, b in frames):
            continue  # frames keep 8 px apart
        # PIL's rectangle includes its end pixel, so the frame covers exactly [x1, x2) x [y1, y2)
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(255, 255, 255),
                       outline=SYNTH_COLORS[colors[len(frames)]], width=_BORDER)
        lo, hi = _BORDER, side - _BORDER - 1  # thin grey lines inside: blur into the digit when small
        for _ in range(3):
            g = rng.randint(100, 160)
            draw.line([(x + rng.randint(lo, hi), y + rng.randint(lo, hi)) for _ in range(2)], fill=(g, g, g))
        gw = _GLYPH_H // 2 + _STROKE + 1
        _draw_digit(draw, digits[len(frames)], x + (side - gw) // 2, y + (side - _GLYPH_H - 1) // 2)
        frames.append((colors[len(frames)], digits[len(frames)], box))
    return img, frames

def _synth_one(out: Path, split: str, i: int, seed: int) -> str:
    """Draw and save one synthetic image; its metadata line (JSON)."""
    rng = random.Random(f"visrl-synth/{seed}/{split}/{i}")  # per image: any subset reproduces alone
    img, frames = _synth_image(rng)
    color, digit, box = frames[0]
    rel = f"images/{split}_{i:05d}.png"
    img.save(out / rel, compress_level=1)  # speed over size; the bytes are still deterministic
    return json.dumps({"question_id": f"synth-{split}-{i:05d}", "dataset": "synth", "split": split,
                       "image": rel, "question": rng.choice(_QUESTIONS).format(color), "answer": str(digit),
                       "bboxs": [list(box)], "width": img.width, "height": img.height})

def make_synth(out_dir, n_train: int = 2000, n_val: int = 200, n_test: int = 200,
               seed: int = 0) -> dict[str, Path]:
    """Write the synthetic set (PNGs + train/val/test.jsonl in Visual-CoT's metadata format)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    # threads, not processes: PNG encoding and numpy release the GIL, and nothing is forked or re-imported
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            lines = pool.map(_synth_one, [out] * n, [split] * n, range(n), [seed] * n)
            paths[split] = out / f"{split}.jsonl"
            paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths
