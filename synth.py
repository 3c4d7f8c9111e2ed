"""The built-in data every command can run on offline: the synthetic intention-driven VQA set (`--data synth`; the
tiny checkpoint is shapes.py's). What a page shows, and why the answer needs the
crop and the crop the right box: docs/guide.md, "The built-in tiny model and synthetic set".
"""

import hashlib
import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw

import data

SYNTH_VERSION = 3  # bump when the generator changes: cached copies are keyed by it
SYNTH_COLORS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 60, 220),
                "yellow": (225, 185, 0), "magenta": (200, 40, 200), "cyan": (0, 175, 195)}
QUESTIONS = ("What pattern is inside the {} frame?", "Which pattern fills the {} square?",
              "What is the pattern in the {} box?", "Name the pattern the {} frame contains.")
SYNTH_PATTERNS = ("horizontal", "vertical", "diagonal", "checkered", "dotted", "grid")
_PERIOD = 12

def _tint(col: int, row: int) -> tuple[int, int, int]:
    """The light colour of a frame's pattern, saying where its cell is: red falls along x, blue along y. Vision tokens
    carry no absolute position (Qwen's ViT and LM use rotary positions only), so the frame's pixels say it instead."""
    return (255 - 80 * col, 160, 255 - 80 * row)

def _pattern(name: str, size: int, du: int, dv: int, light=(255, 255, 255)) -> np.ndarray:
    """A black-and-`light` pattern, half dark on average: downscaled, every pattern is the same flat colour."""
    v, u = np.mgrid[0:size, 0:size]
    u, v = (u + du) % _PERIOD, (v + dv) % _PERIOD
    half = _PERIOD / 2
    dark = {"horizontal": v < half, "vertical": u < half, "diagonal": ((u + v) % _PERIOD) < half,
            "checkered": (u < half) ^ (v < half), "grid": (u < 3.5) | (v < 3.5),
            "dotted": (u - half + 0.5) ** 2 + (v - half + 0.5) ** 2 < 0.16 * _PERIOD ** 2}[name]
    return np.where(dark[..., None], np.zeros(3, np.uint8), np.array(light, np.uint8))

# The page is a grid of CELL px cells so that, in the tiny model's 1/12 scale view, a cell is one 28 px merged
# vision token; a frame sits at the centre of its cell, so the box text of a cell is always the same string.
SIDE, CELL = 1344, 336
_FRAME_SIDE, _JITTER, BORDER, _N_FRAMES = 288, 0, 28, (3, 5)
DISTRACTOR_BORDER, DISTRACTOR_LIGHT = (140, 140, 140), (200, 200, 200)

def _synth_image(rng: random.Random):
    """One synthetic page and its frames [(color name, pattern, (x1, y1, x2, y2))], target first."""
    w = h = SIDE
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    base = rng.randint(228, 245)
    draw.rectangle((0, 0, w - 1, h - 1), fill=(base, base, base))
    for _ in range(rng.randint(40, 70)):  # clutter: grey lines ...
        g = rng.randint(110, 200)
        draw.line([(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)], fill=(g, g, g),
                  width=rng.choice((2, 4, 6)))
    for _ in range(rng.randint(25, 45)):  # ... and grey shapes
        g, x, y, s = rng.randint(110, 200), rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + s, y + s * rng.uniform(0.5, 1.5)), outline=(g, g, g), width=rng.choice((2, 4, 6)))
    # mild noise on the background only, so frame pixels keep their exact colour (tests rely on it);
    # in 8x8 px blocks because per-pixel noise makes PNG encoding several times slower
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, 6, (h // 8 + 1, w // 8 + 1, 1))
    noise = noise.astype(np.int16).repeat(8, 0).repeat(8, 1)[:h, :w]
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    n = rng.randint(*_N_FRAMES)
    colors = rng.sample(sorted(SYNTH_COLORS), n)
    target = rng.randrange(len(SYNTH_PATTERNS))
    # a wrong crop reads wrong: no distractor shares the target's pattern
    kinds = [target] + rng.sample([d for d in range(len(SYNTH_PATTERNS)) if d != target], n - 1)
    cells = rng.sample(range((w // CELL) * (h // CELL)), n)
    frames = []  # (colour name, pattern, box); a distractor's colour name is what it would have been
    for color, kind, cell in zip(colors, kinds, cells):
        side = _FRAME_SIDE + rng.randint(-_JITTER, _JITTER)
        row, col = divmod(cell, w // CELL)
        x = col * CELL + (CELL - side) // 2 + rng.randint(-_JITTER, _JITTER)  # centred in its cell, jittered
        y = row * CELL + (CELL - side) // 2 + rng.randint(-_JITTER, _JITTER)
        is_question = not frames  # the first frame drawn is the question's
        # PIL's rectangle includes its end pixel, so the frame covers exactly [x1, x2) x [y1, y2)
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(255, 255, 255),
                       outline=SYNTH_COLORS[color] if is_question else DISTRACTOR_BORDER, width=BORDER)
        light = _tint(col, row) if is_question else DISTRACTOR_LIGHT
        tile = _pattern(SYNTH_PATTERNS[kind], side - 2 * BORDER, rng.randrange(_PERIOD), rng.randrange(_PERIOD), light)
        img.paste(Image.fromarray(tile), (x + BORDER, y + BORDER))
        frames.append((color, SYNTH_PATTERNS[kind], (x, y, x + side, y + side)))
    return img, frames

def _synth_one(out: Path, split: str, i: int, seed: int) -> str:
    """Draw and save one synthetic image; its metadata line (JSON)."""
    rng = random.Random(f"visrl-synth/{seed}/{split}/{i}")  # per image: any subset reproduces alone
    img, frames = _synth_image(rng)
    color, pattern, box = frames[0]
    rel = f"images/{split}_{i:05d}.png"
    img.save(out / rel, compress_level=1)  # speed over size; the bytes are still deterministic
    return json.dumps({"question_id": f"synth-{split}-{i:05d}", "dataset": "synth", "split": split,
                       "image": rel, "question": rng.choice(QUESTIONS).format(color), "answer": pattern,
                       "bboxs": [list(box)], "width": img.width, "height": img.height})

def cache_key(seed: int, n_train: int, n_val: int, n_test: int) -> str:
    """What determines a synthetic set, hashed: this module's code (SYNTH_VERSION with it), the sizes, the seed
    and the versions of the libraries that draw and encode the images. Any change gives a new cache directory."""
    parts = [Path(__file__).read_text(encoding="utf-8"), json.dumps([seed, n_train, n_val, n_test]),
             PIL.__version__, np.__version__]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]

def make_synth(out_dir, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
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

def resolve_data(path: str, split: str = "train", seed: int = 0) -> Path:
    """`synth` -> the cached synthetic set (built on first use); a directory -> its `<split>.jsonl`."""
    if path == "synth":
        sizes = {"n_train": 2000, "n_val": 200, "n_test": 200}
        root = data.cache_dir() / f"synth-v{SYNTH_VERSION}-seed{seed}-{cache_key(seed, **sizes)}"
        if not (root / "test.jsonl").exists():
            print(f"building the synthetic set into {root} (once; a few minutes on 2 cores)", file=sys.stderr)
            make_synth(root, seed=seed, **sizes)
        return root / f"{split}.jsonl"
    p = Path(path)
    return p / f"{split}.jsonl" if p.is_dir() else p

@dataclass
class SynthArgs:
    """Write the synthetic intention-driven VQA set (Visual-CoT metadata format, PNG images)."""

    out: str = "synth-data"  # the directory to write (absent or empty)
    n_train: int = 2000  # records in train.jsonl
    n_val: int = 200  # records in val.jsonl
    n_test: int = 200  # records in test.jsonl
    seed: int = 0  # what the pages show

def synth_command(args: SynthArgs) -> dict:
    """`visrl.py synth`: the set in a directory of its own (`--data synth` keeps its own copy in the cache)."""
    data.check_new_dir(args.out)
    paths = make_synth(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    print(f"synthetic set written to {args.out}: " + ", ".join(str(p) for p in paths.values()))
    return paths
