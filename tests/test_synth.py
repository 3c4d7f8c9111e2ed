"""The synthetic set: deterministic, readable by the common reader, boxes exact, and its premise holds:
the pattern that answers the question vanishes in the model's view of the whole page but not in the crop."""

from pathlib import Path

import numpy as np
from PIL import Image

import chat
import data
import shapes
import synth


def _contains(win, box):
    return win[0] <= box[0] and win[1] <= box[1] and box[2] <= win[2] and box[3] <= win[3]


def test_synth(tmp_path):
    p1 = synth.make_synth(tmp_path / "a", n_train=12, n_val=3, n_test=4, seed=0)
    p2 = synth.make_synth(tmp_path / "b", n_train=12, n_val=3, n_test=4, seed=0)
    p3 = synth.make_synth(tmp_path / "c", n_train=12, n_val=0, n_test=0, seed=1)
    for split in ("train", "val", "test"):
        assert p1[split].read_bytes() == p2[split].read_bytes()
    image = "images/train_00007.png"
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert p1["train"].read_bytes() != p3["train"].read_bytes()
    sizes = {"train": 12, "val": 3, "test": 4}
    for split, n in sizes.items():
        records = data.read_records(p1[split])
        assert len(records) == n and len({r.id for r in records}) == n
        for r in records:
            assert r.answer in synth.SYNTH_PATTERNS
            assert r.box[2] - r.box[0] == r.box[3] - r.box[1] == synth._FRAME_SIDE  # centred, no jitter
            assert r.width == r.height == synth.SIDE
            color = next(c for c in synth.SYNTH_COLORS if f" {c} " in r.question)
            x1, y1, x2, y2 = map(int, r.box)
            # the frame lies inside one grid cell
            assert x1 // synth.CELL == (x2 - 1) // synth.CELL and y1 // synth.CELL == (y2 - 1) // synth.CELL
            img = data.load_image(r)
            border = [(x1, y1), (x2 - 1, y1), (x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2) // 2, y1 + 2),
                      (x1 + 2, (y1 + y2) // 2)]
            assert all(img.getpixel(p) == synth.SYNTH_COLORS[color] for p in border)
            assert img.getpixel((x1 - 1, y1 - 1)) != synth.SYNTH_COLORS[color]  # the box is tight
            win = chat.crop_window(r.box, r.width, r.height)
            # an odd side may lose its last pixel, as upstream's floor division does
            assert _contains(win, (x1, y1, x2 - 1, y2 - 1)) and win[2] - win[0] == win[3] - win[1] >= 224


def test_the_pattern_is_gone_in_the_full_view_and_clear_in_the_crop(tmp_path):
    paths = synth.make_synth(tmp_path, n_train=12, n_val=0, n_test=0, seed=3)
    view = int(shapes.TinyConfig().max_pixels ** 0.5) // 28 * 28  # the tiny model's view of a square page, in pixels
    for r in data.read_records(paths["train"]):
        img = data.load_image(r).convert("L")
        x1, y1, x2, y2 = r.box
        inner = (x1 + synth.BORDER + 8, y1 + synth.BORDER + 8, x2 - synth.BORDER - 8, y2 - synth.BORDER - 8)
        scale = view / r.width
        full = np.asarray(img.resize((view, view), Image.BICUBIC), np.float32)
        full = full[round(inner[1] * scale):round(inner[3] * scale), round(inner[0] * scale):round(inner[2] * scale)]
        win = chat.crop_window(r.box, r.width, r.height)
        crop_scale = view / (win[2] - win[0])
        crop = np.asarray(img.crop(win).resize((view, view), Image.BICUBIC), np.float32)
        crop = crop[round((inner[1] - win[1]) * crop_scale):round((inner[3] - win[1]) * crop_scale),
                    round((inner[0] - win[0]) * crop_scale):round((inner[2] - win[0]) * crop_scale)]
        # the full view: a flat colour (the cell's, whatever the pattern); the crop: a high-contrast texture
        assert full.std() < 12, (r.answer, full.std())
        assert crop.std() > 30 and crop.std() > 4 * full.std(), (r.answer, crop.std(), full.std())


def test_only_the_question_frame_is_coloured():
    import random

    for k in range(6):
        img, frames = synth._synth_image(random.Random(k))
        pixels = np.asarray(img)
        (color, _, box), distractors = frames[0], frames[1:]
        assert 2 <= len(distractors) <= 4 and len({p for _, p, _ in frames}) == len(frames)  # every crop reads differently
        for _, _, (x1, y1, x2, y2) in distractors:
            assert tuple(pixels[y1, x1]) == tuple(pixels[(y1 + y2) // 2, x1 + 2]) == synth.DISTRACTOR_BORDER
        # the named colour appears nowhere outside the question's frame
        x1, y1, x2, y2 = box
        outside = np.ones(pixels.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert not (pixels[outside] == synth.SYNTH_COLORS[color]).all(-1).any()
        assert (pixels[y1:y2, x1:x2] == synth.SYNTH_COLORS[color]).all(-1).sum() > 4 * 288 * 20


def test_the_synth_cache_key_changes_with_everything_that_draws_the_set(monkeypatch, tmp_path):
    import PIL

    base = synth.cache_key(0, 2000, 200, 200)
    assert synth.cache_key(0, 2000, 200, 200) == base
    assert len({base, synth.cache_key(1, 2000, 200, 200), synth.cache_key(0, 2001, 200, 200),
                synth.cache_key(0, 2000, 200, 201)}) == 4
    monkeypatch.setattr(PIL, "__version__", "0.0.0")
    assert synth.cache_key(0, 2000, 200, 200) != base
    monkeypatch.undo()
    edited = tmp_path / "synth.py"  # the generator's code: one changed line is another set
    edited.write_text(Path(synth.__file__).read_text().replace("_PERIOD = 12", "_PERIOD = 13"))
    monkeypatch.setattr(synth, "__file__", str(edited))
    assert synth.cache_key(0, 2000, 200, 200) != base


# -----------------------------------------------------------------------------
# the tiny checkpoint
