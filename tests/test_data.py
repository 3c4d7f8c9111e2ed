"""Tests for data.py: prompts, box text forms, parsing, IoU, crops, readers, tokenisation, batching."""

import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DataError  # noqa: E402

# -----------------------------------------------------------------------------
# prompts

def test_prompts():
    q = "What is the name of the shop?"
    text = data.focus_messages(q)[0]["content"][1]["text"]
    assert text == q + (" Please provide the bounding box coordinate of the region"
                        " that can help you answer the question better.")
    official = data.focus_messages(q, official=True)[0]["content"][1]["text"]
    assert official == "what is the name of the shop?. " + data.FOCUS_INSTRUCTION
    content = data.answer_messages(q)[0]["content"]
    assert [c["type"] for c in content] == ["image", "text", "image"]
    assert content[1]["text"] == q + " " + data.VISRL_INSTRUCTION + "\n"
    content = data.direct_messages(q)[0]["content"]
    assert [c["type"] for c in content] == ["image", "text"] and content[1]["text"] == q
    assert all(m["role"] == "user" for f in (data.focus_messages, data.answer_messages, data.direct_messages)
               for m in f(q))

# -----------------------------------------------------------------------------
# box text forms

def test_recipe_example_round_trip():
    text = data.box_to_text((217, 343, 242, 393), 391, 500)
    assert text == "[0.542, 0.686, 0.592, 0.786]"
    box = data.text_to_box(text, 391, 500)
    assert box == pytest.approx((217, 343, 242, 393), abs=0.5)
    assert data.box_to_text(box, 391, 500) == text

def test_square_differs_from_axis():
    # wide 600x400 image: S = 600, the image sits (600 - 400) // 2 = 100 px down in the square
    box = (60, 40, 300, 200)
    assert data.box_to_text(box, 600, 400, "square") == "[0.100, 0.233, 0.500, 0.500]"  # 140/600, 300/600
    assert data.box_to_text(box, 600, 400, "axis") == "[0.100, 0.100, 0.500, 0.500]"    # 40/400, 200/400
    # tall 400x600 image: the image sits 100 px right in the square
    box = (40, 60, 200, 300)
    assert data.box_to_text(box, 400, 600, "square") == "[0.233, 0.100, 0.500, 0.500]"
    assert data.box_to_text(box, 400, 600, "axis") == "[0.100, 0.100, 0.500, 0.500]"
    # odd difference: offset (500 - 391) // 2 = 54, floor division
    assert data.box_to_text((0, 0, 391, 500), 391, 500) == f"[{54 / 500:.3f}, 0.000, {445 / 500:.3f}, 1.000]"
    # and back: square value * 600 - 100 on the short axis, axis value * side
    assert data.text_to_box("[0.100, 0.233, 0.500, 0.500]", 600, 400) == pytest.approx((60, 39.8, 300, 200))
    assert data.text_to_box("[0.100, 0.233, 0.500, 0.500]", 600, 400, "axis") == \
        pytest.approx((60, 93.2, 300, 200))

def test_pixel_form():
    assert data.box_to_text((100, 50, 500, 250), 1000, 500, "pixel", resized=(560, 280)) == "[56, 28, 280, 140]"
    assert data.text_to_box("[56, 28, 280, 140]", 1000, 500, "pixel", resized=(560, 280)) == \
        pytest.approx((100, 50, 500, 250))
    with pytest.raises(ValueError):
        data.box_to_text((0, 0, 1, 1), 10, 10, "pixel")
    with pytest.raises(ValueError):
        data.box_to_text((0, 0, 1, 1), 10, 10, "polar")

@pytest.mark.parametrize("text", [
    "", "no box here", "[0.1, 0.2, 0.3]", "[nan, 0.1, 0.2, 0.3]", "[0.1, inf, 0.2, 0.3]", "[NaN, NaN, 1, 1]",
    "[1e999, 0, 1, 1]", "[0.5, 0.2, 0.3, 0.4]", "[0.1, 0.4, 0.3, 0.2]", "[-0.1, 0.2, 0.3, 0.4]", "[", "]]",
    "][0.1, 0.2, 0.3, 0.4", "[0.1, 0.2, 0.3, 0.4", "[0.1, 0.2] [0.3, 0.4]", "框[一, 二, 三, 四]", None, 42,
])
def test_parse_failures(text):
    assert data.parse_box(text) is None
    assert data.text_to_box(text, 100, 100) is None

@pytest.mark.parametrize("text,expected", [
    ("[0.1,0.2,0.3,0.4]", (0.1, 0.2, 0.3, 0.4)),
    ("[0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
    ("The region is [0.1 0.2 0.3 0.4], I think.", (0.1, 0.2, 0.3, 0.4)),
    ("[[0.1, 0.2, 0.3, 0.4]]", (0.1, 0.2, 0.3, 0.4)),
    ('{"bbox_2d": [10, 20, 30, 40], "label": "sign"}', (10, 20, 30, 40)),
    ("[0.1, 0.2, 0.3, 0.4, 0.9]", (0.1, 0.2, 0.3, 0.4)),
    ("[0.1, 0.2, 0.3, 0.4] and [0.5, 0.6, 0.7, 0.8]", (0.1, 0.2, 0.3, 0.4)),
    ("[.5, 0, 1., 1]", (0.5, 0, 1, 1)),
])
def test_parse_lenient(text, expected):
    assert data.parse_box(text) == pytest.approx(expected)

def test_parse_failure_count_and_speed():
    replies = ["[0.1, 0.2, 0.3, 0.4]", "[0.1,0.2,0.3,0.4]", "sure: [0, 0, 1, 1]", "[0.3, 0.2, 0.1, 0.4]",
               "I cannot tell", "[nan, 0, 1, 1]", "[0.1, 0.2, 0.3]"]
    assert sum(data.parse_box(r) is None for r in replies) == 4
    junk = ["[" * 200_000, "]" * 200_000, "[" + "1." * 100_000 + "]", "[" + "9" * 200_000 + "e" * 1000,
            "[" + "0, " * 100_000, "é" * 200_000]
    t = time.perf_counter()
    for j in junk:
        data.parse_box(j)
    assert time.perf_counter() - t < 1.0

def test_text_to_box_rejects_and_clips():
    assert data.text_to_box("[0.1, 0.2, 1.3, 0.4]", 391, 500) is None  # normalised value outside the image
    assert data.text_to_box("[0.0, 0.0, 0.05, 1.0]", 391, 500) is None  # all in the left pad: empty
    assert data.text_to_box("[0.0, 0.0, 0.5, 0.5]", 391, 500) == pytest.approx((0, 0, 196, 250))  # clipped
    assert data.text_to_box("[0, 0, 2000, 2000]", 100, 50, "pixel", resized=(200, 100)) == (0, 0, 100, 50)

def test_iou_union_and_ablation_boxes():
    a = (0, 0, 10, 10)
    assert data.iou(a, a) == 1.0
    assert data.iou(a, (20, 20, 30, 30)) == 0.0
    assert data.iou(a, (10, 0, 20, 10)) == 0.0  # touching edges
    assert data.iou(a, (0, 0, 5, 5)) == 0.25
    assert data.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert data.iou((0, 0, 4, 2), (2, 0, 6, 2)) == pytest.approx(4 / 12)
    assert data.iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0
    assert data.union_box([(0, 5, 10, 10), (3, 0, 4, 20)]) == (0, 0, 10, 20)
    with pytest.raises(ValueError):
        data.union_box([])
    assert data.center_box(391, 500) == pytest.approx((125 - 54, 125, 375 - 54, 375))
    assert data.center_box(600, 400) == pytest.approx((150, 50, 450, 350))
    b1, b2 = data.random_box(600, 400, random.Random(0)), data.random_box(600, 400, random.Random(0))
    assert b1 == b2
    for seed in range(200):
        x1, y1, x2, y2 = data.random_box(600, 400, random.Random(seed))
        assert 0 <= x1 < x2 <= 600 and 0 <= y1 < y2 <= 400
        assert 60 - 1e-9 <= x2 - x1 <= 300 + 1e-9 and 40 - 1e-9 <= y2 - y1 <= 200 + 1e-9

# -----------------------------------------------------------------------------
# crops

def _contains(win, box):
    return win[0] <= box[0] and win[1] <= box[1] and box[2] <= win[2] and box[3] <= win[3]

def test_crop_vcot_hand_example():
    # centre (459 // 2, 736 // 2) = (229, 368), half side max(12, 25, 112) = 112
    assert data.crop_window((217, 343, 242, 393), 391, 500) == (117, 256, 341, 480)

@pytest.mark.parametrize("box", [
    (0, 0, 10, 10), (590, 0, 600, 10), (0, 390, 10, 400), (590, 390, 600, 400),  # corners
    (300, 0, 310, 5), (300, 395, 310, 400), (0, 200, 4, 210), (596, 200, 600, 210),  # borders
    (250, 150, 300, 200), (100.4, 100.6, 120.2, 180.9),
])
def test_crop_vcot_small_boxes(box):
    win = data.crop_window(box, 600, 400)
    assert all(isinstance(v, int) for v in win)
    assert win[2] - win[0] == 224 and win[3] - win[1] == 224  # shifted inside, never cut
    assert 0 <= win[0] and 0 <= win[1] and win[2] <= 600 and win[3] <= 400
    assert _contains(win, box)

def test_crop_vcot_big_and_small_images():
    box = (100, 50, 500, 350)  # 400 x 300: half side 200
    win = data.crop_window(box, 600, 400)
    assert win == (100, 0, 500, 400)  # centre (300, 200), half side 200: 400 px, the whole height
    # an odd side over 224 may lose its last pixel, exactly as upstream's floor division does
    win = data.crop_window((0, 0, 301, 301), 600, 600)
    assert win == (0, 0, 300, 300)
    assert data.crop_window((10, 10, 20, 20), 150, 100) == (0, 0, 150, 100)  # smaller image: all of it
    assert data.crop_window((10, 10, 20, 20), 300, 150) == (0, 0, 224, 150)

def test_crop_raw_and_image():
    assert data.crop_window((10.2, 20.7, 30.1, 40.0), 100, 100, "raw") == (10, 20, 31, 40)
    assert data.crop_window((50, 50, 50, 50), 100, 100, "raw") == (50, 50, 51, 51)
    assert data.crop_window((100, 100, 100, 100), 100, 100, "raw") == (99, 99, 100, 100)
    img = Image.new("RGB", (600, 400))
    assert img.crop(data.crop_window((0, 0, 10, 10), *img.size)).size == (224, 224)
    assert img.crop(data.crop_window((0, 0, 10, 10), *img.size, rule="raw")).size == (10, 10)
    with pytest.raises(ValueError):
        data.crop_window((0, 0, 1, 1), 10, 10, rule="nope")

# -----------------------------------------------------------------------------
# readers

def _png(path, size=(64, 48), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path

def _meta(**kw):
    item = {"dataset": "x", "split": "train", "question": "What colour is it?", "answer": "red",
            "image": "a.png", "width": 64, "height": 48, "bboxs": [[1, 2, 10, 20]]}
    item.update(kw)
    return {k: v for k, v in item.items() if v is not None}

def _conv(box="[1, 2, 10, 20]", image="a.png"):
    return {"question_id": 7, "image": [image, f"{image}###{box}"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it? " + data.FOCUS_INSTRUCTION},
        {"from": "gpt", "value": "[0.016, 0.208, 0.156, 0.479]"},
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "red"}]}

def _write_jsonl(path, items):
    path.write_text("".join((it if isinstance(it, str) else json.dumps(it)) + "\n" for it in items))
    return path

def test_read_visual_cot_metadata(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "cot" / "docvqa" / "d.png", size=(30, 40))
    f = _write_jsonl(tmp_path / "train.jsonl", [
        _meta(bboxs=[[1, 2, 10, 20], [5, 5, 30, 30]]),
        _meta(dataset="docvqa", image="d.png", width=30, height=40, answer="x", question_id=12)])
    r1, r2 = data.read_records(f)
    assert (r1.question, r1.answers, r1.answer) == ("What colour is it?", ["red"], "red")
    assert r1.boxes == [(1, 2, 10, 20), (5, 5, 30, 30)] and r1.box == (1, 2, 30, 30)
    assert (r1.width, r1.height, r1.id, r1.source) == (64, 48, "train-1", f"{f}:1")
    assert Path(r1.image) == tmp_path / "a.png"
    assert Path(r2.image) == tmp_path / "cot" / "docvqa" / "d.png" and r2.id == "12"  # release layout
    assert data.load_image(r1).mode == "RGB"

def test_read_visual_cot_conversations(tmp_path):
    _png(tmp_path / "a.png")
    f = tmp_path / "bench.json"
    f.write_text(json.dumps([_conv(), _conv(box="[0, 0, 64, 48]")], indent=4))
    r1, r2 = data.read_records(f)
    assert r1.question == "What colour is it?" and r1.answers == ["red"] and r1.id == "7"
    assert r1.boxes == [(1, 2, 10, 20)] and (r1.width, r1.height) == (64, 48)  # size from the image header
    assert r2.box == (0, 0, 64, 48)
    assert r1.source == f"{f}:2" and r2.source.startswith(f"{f}:")  # the line each item starts on

def test_read_ours_and_write_round_trip(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    f = _write_jsonl(tmp_path / "ours.jsonl", [
        {"id": "q1", "image": "imgs/a.png", "question": "Q?", "answers": ["a", "b"], "boxes": [[0, 0, 5.5, 6]]},
        {"id": 2, "image": "imgs/a.png", "question": "R?", "answers": "c", "width": 64, "height": 48}])
    r1, r2 = data.read_records(f)
    assert (r1.answers, r1.boxes, r1.width, r1.height) == (["a", "b"], [(0, 0, 5.5, 6)], 64, 48)
    assert (r2.id, r2.answers, r2.boxes, r2.box) == ("2", ["c"], [], None)
    out = tmp_path / "copy.jsonl"
    data.write_records(out, [r1, r2])
    assert json.loads(out.read_text().splitlines()[0])["image"] == "imgs/a.png"
    back = data.read_records(out)
    assert [(b.id, b.image, b.question, b.answers, b.boxes, b.width, b.height) for b in back] == \
           [(r.id, r.image, r.question, r.answers, r.boxes, r.width, r.height) for r in (r1, r2)]
    assert len(data.read_records(f, limit=1)) == 1

BAD_META = [  # (what to write on line 2, field the message must name)
    (_meta(question=None), "question"),
    (_meta(answer=3), "answer"),
    (_meta(image="missing.png"), "image"),
    (_meta(image="garbage.png"), "image"),
    (_meta(image="../outside.png"), "image"),
    (_meta(bboxs=[[10, 2, 1, 20]]), "bboxs"),
    (_meta(bboxs=[[1, 2, 10]]), "bboxs"),
    (_meta(bboxs=[[1, float("nan"), 10, 20]]), "bboxs"),
    (_meta(bboxs=[[1, 2, 10, 200]]), "bboxs"),
    (_meta(bboxs="[1, 2, 10, 20]"), "bboxs"),
    (_meta(width=65), "width"),
    (_meta(height="48"), "height"),
]

@pytest.mark.parametrize("item,key", BAD_META)
def test_bad_metadata_records(tmp_path, item, key):
    root = tmp_path / "root"
    _png(root / "a.png")
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    _png(tmp_path / "outside.png")  # exists, but outside the image root
    f = _write_jsonl(root / "train.jsonl", [_meta(), item, _meta()])
    with pytest.raises(DataError) as e:
        data.read_records(f)
    msg = str(e.value)
    assert "train.jsonl:2:" in msg and f"field '{key}'" in msg and "1 bad record" in msg
    assert len(data.read_records(f, skip_bad=True)) == 2

def test_bad_other_records(tmp_path, capsys):
    _png(tmp_path / "a.png")
    outside = _png(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "x.png")
    f = _write_jsonl(tmp_path / "ours.jsonl", [
        {"image": "a.png", "question": "Q?", "answers": "a"},
        {"image": str(outside), "question": "Q?", "answers": "a"},          # absolute, outside the root
        {"image": "a.png", "question": "Q?", "answers": []},
        '{"image": "a.png", "question": ',                                   # bad JSON
        {"image": "a.png", "question": "Q?", "answers": "a", "boxes": [[0, 0, 1, float("inf")]]},
        {"image": "a.png", "question": "Q?", "answers": "a"}])
    with pytest.raises(DataError) as e:
        data.read_records(f)
    msg = str(e.value)
    for part in ("ours.jsonl:2: field 'image'", "ours.jsonl:3: field 'answers'", "ours.jsonl:4: invalid JSON",
                 "ours.jsonl:5: field 'boxes'", "4 bad record"):
        assert part in msg
    good = data.read_records(f, skip_bad=True)
    assert [r.source for r in good] == [f"{f}:1", f"{f}:6"]
    assert "skipped 4 bad record" in capsys.readouterr().err
    # conversation format: the message names the line the bad item starts on
    c = tmp_path / "bench.json"
    c.write_text(json.dumps([_conv(), _conv(box="[10, 2, 1, 20]"), _conv(box="[1, 2, 3]")], indent=4))
    line2 = c.read_text().splitlines().index("    {", 2) + 1
    with pytest.raises(DataError) as e:
        data.read_records(c)
    assert f"bench.json:{line2}: field 'image'" in str(e.value) and "2 bad record" in str(e.value)

def test_many_errors_are_truncated_and_load_image_errors(tmp_path):
    _png(tmp_path / "a.png")
    f = _write_jsonl(tmp_path / "t.jsonl", [_meta(image="nope.png")] * 25)
    with pytest.raises(DataError, match="and 5 more"):
        data.read_records(f)
    rec = data.read_records(_write_jsonl(tmp_path / "ok.jsonl", [_meta()]))[0]
    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"ok\.jsonl:1: field 'image'"):
        data.load_image(rec)

# -----------------------------------------------------------------------------
# tokenisation, labels and batching (on the tiny checkpoint's tokenizer and image processor)

@pytest.fixture(scope="module")
def processor(tiny_path):
    import model

    return model.load_model(str(tiny_path))[1]


@pytest.mark.parametrize("messages", [
    data.focus_messages("What digit is inside the red frame?"),
    data.answer_messages("Which number is written in the blue square?"),
    data.direct_messages("Read the digit in the cyan box."),
])
def test_render_chat_matches_the_qwen_template(processor, messages):
    expected = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert data.render_chat(messages) == expected
    full = messages + [{"role": "assistant", "content": "7"}]
    assert data.render_chat(full, add_generation_prompt=False) == \
        processor.tokenizer.apply_chat_template(full, tokenize=False)


def test_only_assistant_tokens_are_supervised(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    record = data.read_records(synth_dir / "train.jsonl")[0]
    focus, answer = data.sft_samples(record, tok, image_processor)
    box_text = data.box_to_text(record.box, record.width, record.height)
    for sample, response in ((focus, box_text), (answer, record.answer)):
        supervised = [t for t, label in zip(sample.input_ids, sample.labels) if label != data.IGNORE_INDEX]
        assert supervised == [label for label in sample.labels if label != data.IGNORE_INDEX]
        assert tok.decode(supervised) == response + "<|im_end|>"
        # everything before the response is the prompt, rendered by the chat format
        n_prompt = sample.labels.index(next(label for label in sample.labels if label != data.IGNORE_INDEX))
        prompt = tok.decode(sample.input_ids[:n_prompt])
        assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system\n" in prompt
    assert record.question + " " + data.FOCUS_INSTRUCTION in tok.decode(focus.input_ids)
    assert record.question + " " + data.VISRL_INSTRUCTION + "\n<|vision_start|>" in tok.decode(answer.input_ids)


def test_crop_alone_sample_is_the_bare_question_on_the_crop(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    record = data.read_records(synth_dir / "train.jsonl")[1]
    focus, answer, crop = data.sft_samples(record, tok, image_processor, crop_alone=True)
    assert crop.kind == "crop" and crop.images == answer.images[1:]
    text = tok.decode(crop.input_ids)
    assert text.count("<|vision_start|>") == 1 and "<|vision_end|>" + record.question + "<|im_end|>" in text
    assert tok.decode([t for t, label in zip(crop.input_ids, crop.labels) if label != data.IGNORE_INDEX]) == \
        record.answer + "<|im_end|>"
    pixels = data.collate([crop], image_processor, tok.pad_token_id, 0)  # one image: the crop, not the whole page
    expected = image_processor(images=[data.load_image(record).crop(crop.images[0])], return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert torch.equal(pixels["pixel_values"], expected["pixel_values"])
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    merge = image_processor.merge_size ** 2
    assert crop.input_ids.count(image_pad) == int(expected["image_grid_thw"].prod()) // merge


def test_image_tokens_match_the_processor(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for record in data.read_records(synth_dir / "train.jsonl")[:4]:
        for sample in data.sft_samples(record, tok, image_processor):
            pixels = data.collate([sample], image_processor, tok.pad_token_id, image_pad)
            grid = pixels["image_grid_thw"]
            assert len(grid) == (1 if sample.kind == "focus" else 2)
            expected = int((grid.prod(-1) // image_processor.merge_size**2).sum())
            assert sample.input_ids.count(image_pad) == expected
            assert pixels["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_collate_processes_each_distinct_view_once_and_the_cache_decodes_nothing_twice(processor, synth_dir,
                                                                                      monkeypatch):
    tok, image_processor = processor.tokenizer, processor.image_processor
    records = data.read_records(synth_dir / "train.jsonl")[:3]
    samples = [s for r in records for s in data.sft_samples(r, tok, image_processor, crop_alone=True)]
    # independently: every row's images processed on their own, in token order
    expected = [image_processor(images=[data.load_image(s.record) if w is None else data.load_image(s.record).crop(w)],
                                return_tensors="pt") for s in samples for w in s.images]
    batch = data.collate(samples, image_processor, tok.pad_token_id, 0)
    # per record: the page and one crop window (the answer and crop-alone samples share it)
    assert batch["image_grid_thw"].shape[0] == 2 * len(records) and len(batch["image_index"]) == len(expected)
    offsets = [0] + batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    for i, e in zip(batch["image_index"], expected):
        assert torch.equal(batch["pixel_values"][offsets[i]:offsets[i + 1]], e["pixel_values"])
        assert batch["image_grid_thw"][i].tolist() == e["image_grid_thw"][0].tolist()
    plain = [data.collate([s], image_processor, tok.pad_token_id, 0) for s in samples]
    loads = []
    real_load = data.load_image
    monkeypatch.setattr(data, "load_image", lambda record: loads.append(record.image) or real_load(record))
    cache = {}
    for _ in range(2):  # two epochs, one sample per batch
        for s, expected_batch in zip(samples, plain):
            got = data.collate([s], image_processor, tok.pad_token_id, 0, cache)
            assert torch.equal(got["pixel_values"], expected_batch["pixel_values"])
            assert torch.equal(got["image_grid_thw"], expected_batch["image_grid_thw"])
    assert len(cache) == 2 * len(records) and len(loads) <= 2 * len(records)  # never a view decoded twice


def test_encode_rejects_extra_images(processor):
    with pytest.raises(ValueError, match="placeholders"):
        data.encode(processor.tokenizer, processor.image_processor, data.focus_messages("q"),
                    [(300, 300), (224, 224)], "x")


def test_collate_pads_right_and_marks_image_tokens(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    record = data.read_records(synth_dir / "train.jsonl")[0]
    samples = data.sft_samples(record, tok, image_processor)
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    batch = data.collate(samples, image_processor, tok.pad_token_id, image_pad)
    lengths = [len(s.input_ids) for s in samples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["input_ids"][short, min(lengths):] == tok.pad_token_id).all()
    assert batch["mm_token_type_ids"].sum() == (batch["input_ids"] == image_pad).sum()
    assert batch["image_grid_thw"].shape == (2, 3)  # the page (shown by both) and the crop: each once
    assert batch["row_grid_thw"].shape == (3, 3) and batch["image_index"] == [0, 0, 1]
    # response positions: exactly the supervised tokens, each predicted from the position before it
    for r, s in enumerate(samples):
        mine = batch["response_row"] == r
        assert batch["response_targets"][mine].tolist() == [t for t in s.labels if t != data.IGNORE_INDEX]
        flat = batch["input_ids"].reshape(-1)
        assert torch.equal(flat[batch["response_index"][mine] + 1], batch["response_targets"][mine])


# -----------------------------------------------------------------------------
# paths stay inside their root after resolving links; --out never overlaps an input or an earlier run

def test_a_link_out_of_the_image_root_is_refused_a_linked_root_works(tmp_path):
    outside = _png(tmp_path / "elsewhere" / "secret.png")
    root = tmp_path / "data"
    _png(root / "store" / "a.png")
    (root / "images").symlink_to(root / "store")            # a link within the root's own tree
    (root / "leak.png").symlink_to(outside)                 # a link inside the root pointing out of it
    (root / "loop.png").symlink_to(root / "loop.png")
    f = _write_jsonl(root / "ours.jsonl", [
        {"image": "images/a.png", "question": "Q?", "answers": "a"},
        {"image": "leak.png", "question": "Q?", "answers": "a"},
        {"image": "../elsewhere/secret.png", "question": "Q?", "answers": "a"},
        {"image": "loop.png", "question": "Q?", "answers": "a"},
        {"image": "a" * 300 + ".png", "question": "Q?", "answers": "a"},
        {"image": "a.png\u0000.png", "question": "Q?", "answers": "a"}])
    with pytest.raises(DataError) as e:
        data.read_records(f)
    msg = str(e.value)
    for line in (2, 3):
        assert f"ours.jsonl:{line}: field 'image':" in msg and "is outside the image root" in msg
    assert "ours.jsonl:4: field 'image'" in msg and "ours.jsonl:5: field 'image'" in msg and "too long" in msg
    assert "ours.jsonl:6: field 'image'" in msg and "NUL byte" in msg and "5 bad record" in msg
    (good,) = data.read_records(f, skip_bad=True)
    assert good.image == str((root / "store" / "a.png").resolve())
    # the root itself a link: its target's tree is the root
    (tmp_path / "linked").symlink_to(root)
    assert data.read_records(tmp_path / "linked" / "ours.jsonl", skip_bad=True)[0].image == good.image
    # a wider root allows what a narrower one refuses
    wide = _write_jsonl(tmp_path / "wide.jsonl", [{"image": "data/leak.png", "question": "Q?", "answers": "a"}])
    assert data.read_records(wide)[0].image == str(outside.resolve())


def test_path_inside_resolves_before_it_checks(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "up").symlink_to(tmp_path)
    assert data.path_inside(tmp_path / "root", "x/../y.png") == (tmp_path / "root" / "y.png").resolve()
    assert data.path_inside(tmp_path / "root", "up/root/z.png") == (tmp_path / "root" / "z.png").resolve()
    for rel in ("up/y.png", "/etc/passwd", "../root2/y.png"):
        with pytest.raises(data.PathError) as e:
            data.path_inside(tmp_path / "root", rel)
        assert e.value.outside and str(tmp_path) not in str(e.value)  # names the path, never the root


def test_check_out_refuses_overlaps_and_earlier_runs(tmp_path):
    model_dir, run = tmp_path / "model", tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for out in (model_dir, model_dir / "sub", tmp_path):
        with pytest.raises(data.UserError, match="overlaps the --model"):
            data.check_out(out, ("adapter",), inputs=[("--model", model_dir)])
    with pytest.raises(data.UserError, match="holds the --data"):
        data.check_out(tmp_path, ("adapter",), data_files=[("--data", model_dir / "config.json")])
    assert data.check_out(run, ("adapter", "metrics.jsonl")) == []  # a fresh --out
    (run / "adapter").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(data.UserError, match=r"already holds a run \(adapter\); pass --resume .* or --overwrite"):
        data.check_out(run, ("adapter", "metrics.jsonl"))
    assert data.check_out(run, ("adapter", "metrics.jsonl"), resume=True) == []
    with pytest.raises(data.UserError, match="pass one of them"):
        data.check_out(run, ("adapter",), resume=True, overwrite=True)
    replaced = data.check_out(run, ("adapter", "metrics.jsonl"), overwrite=True)
    assert replaced == [(run / "adapter").resolve()]
    data.clear_run(replaced)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only the run's own files go
    with pytest.raises(data.UserError, match="is a file"):
        data.check_out(run / "notes.txt", ("adapter",))


def test_cli_prints_expected_errors_on_one_line_and_keeps_bugs_loud(monkeypatch, capsys):
    def fail(_):
        raise data.DataError("x.jsonl:3: field 'image': missing")

    monkeypatch.setattr(sys, "argv", ["visrl.py"])
    monkeypatch.delenv("VISRL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        data.cli(lambda: None, fail)
    assert e.value.code == 2 and capsys.readouterr().err == "error: x.jsonl:3: field 'image': missing\n"
    monkeypatch.setattr(sys, "argv", ["visrl.py", "--debug"])
    with pytest.raises(SystemExit):
        data.cli(lambda: None, fail)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: x.jsonl:3: field 'image': missing\n")
    monkeypatch.setattr(sys, "argv", ["visrl.py"])
    monkeypatch.setenv("RANK", "1")  # other ranks meet the same check: rank 0 says it
    with pytest.raises(SystemExit):
        data.cli(lambda: None, fail)
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyError):  # a bug is not caught
        data.cli(lambda: None, lambda _: {}["missing"])
