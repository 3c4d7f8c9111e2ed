"""The synthetic set: deterministic, readable by the common reader, boxes exact."""

import data
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
            assert r.answer in "0123456789" and len(r.answer) == 1
            assert 448 <= r.width <= 672 and 448 <= r.height <= 672
            color = next(c for c in synth.SYNTH_COLORS if f" {c} " in r.question)
            x1, y1, x2, y2 = map(int, r.box)
            assert x1 >= 8 and y1 >= 8 and x2 <= r.width - 8 and y2 <= r.height - 8
            img = data.load_image(r)
            border = [(x1, y1), (x2 - 1, y1), (x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2) // 2, y1 + 2),
                      (x1 + 2, (y1 + y2) // 2)]
            assert all(img.getpixel(p) == synth.SYNTH_COLORS[color] for p in border)
            assert img.getpixel((x1 - 1, y1 - 1)) != synth.SYNTH_COLORS[color]  # the box is tight
            win = data.crop_window(r.box, r.width, r.height)
            assert _contains(win, r.box) and win[2] - win[0] == 224 and win[3] - win[1] == 224

