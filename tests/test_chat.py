"""Tests for chat.py: the prompt table, box text forms, parsing, IoU, crops, tokenisation, batching."""

import random
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chat  # noqa: E402
import data  # noqa: E402

# -----------------------------------------------------------------------------
# prompts

def test_prompts():
    q = "What is the name of the shop?"
    text = lambda messages: "".join(p["text"] if p["type"] == "text" else "<image>" for p in messages[0]["content"])
    # upstream (default): the newline LLaMA-Factory keeps after <image>; VisRL's instruction for the RL box step
    assert text(chat.focus_messages(q)) == "<image>\n" + q + (" Please provide the bounding box coordinate of the "
                                                              "region that can help you answer the question better.")
    assert text(chat.focus_messages(q, rl=True)) == "<image>\n" + q + (
        " Please first provide the bounding box coordinate of the region, then refer to the corresponding sub-image"
        " to answer the question better.")
    assert text(chat.answer_messages(q)) == "<image>\n" + q + " " + chat.VISRL_INSTRUCTION + "\n<image>"
    assert text(chat.direct_messages(q)) == "<image>\n" + q
    # visrl: one box instruction for every stage, no newline
    for rl in (False, True):
        assert text(chat.focus_messages(q, "visrl", rl=rl)) == "<image>" + q + " " + chat.FOCUS_INSTRUCTION
    assert text(chat.answer_messages(q, "visrl")) == "<image>" + q + " " + chat.VISRL_INSTRUCTION + "\n<image>"
    assert text(chat.direct_messages(q, "visrl")) == "<image>" + q
    official = chat.focus_messages(q, official=True)[0]["content"][1]["text"]
    assert official == "what is the name of the shop?. " + chat.FOCUS_INSTRUCTION
    assert all(m["role"] == "user" for f in (chat.focus_messages, chat.answer_messages, chat.direct_messages)
               for m in f(q))
    with pytest.raises(ValueError, match="prompt set"):
        chat.focus_messages(q, "nope")

def test_the_3_turn_answer_step_is_the_string_visual_cot_builds():
    # llava/eval/model_cot_loader.py, from a benchmark conversation item (its literal expressions)
    question, box = "What is the date?", "[0.100, 0.300, 0.300, 0.500]"
    raw = [{"from": "human", "value": "<image>\n" + question + " Please provide the bounding box coordinate of the "
                                      "region that can help you answer the question better."},
           {"from": "gpt", "value": box}, {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "may 5"}]
    upstream = [raw[0]["value"].split(" Please provide the bounding box coordinate of the region")[0], box,
                raw[2]["value"] + "\nPlease answer the question based on the original image and local detail image."
                + raw[0]["value"].split("Please provide the bounding box coordinate of the region")[0].replace(
                    "<image>\n", "")]
    ours = chat.vcot_answer_messages(question, box)
    as_text = [m["content"] if isinstance(m["content"], str) else
               "".join("<image>" if p["type"] == "image" else p["text"] for p in m["content"]) for m in ours]
    assert as_text == upstream and [m["role"] for m in ours] == ["user", "assistant", "user"]


# -----------------------------------------------------------------------------
# box text forms

def test_recipe_example_round_trip():
    text = chat.box_to_text((217, 343, 242, 393), 391, 500)
    assert text == "[0.542, 0.686, 0.592, 0.786]"
    box = chat.text_to_box(text, 391, 500)
    assert box == pytest.approx((217, 343, 242, 393), abs=0.5)
    assert chat.box_to_text(box, 391, 500) == text

def test_square_differs_from_axis():
    # wide 600x400 image: S = 600, the image sits (600 - 400) // 2 = 100 px down in the square
    box = (60, 40, 300, 200)
    assert chat.box_to_text(box, 600, 400, "square") == "[0.100, 0.233, 0.500, 0.500]"  # 140/600, 300/600
    assert chat.box_to_text(box, 600, 400, "axis") == "[0.100, 0.100, 0.500, 0.500]"    # 40/400, 200/400
    # tall 400x600 image: the image sits 100 px right in the square
    box = (40, 60, 200, 300)
    assert chat.box_to_text(box, 400, 600, "square") == "[0.233, 0.100, 0.500, 0.500]"
    assert chat.box_to_text(box, 400, 600, "axis") == "[0.100, 0.100, 0.500, 0.500]"
    # odd difference: offset (500 - 391) // 2 = 54, floor division
    assert chat.box_to_text((0, 0, 391, 500), 391, 500) == f"[{54 / 500:.3f}, 0.000, {445 / 500:.3f}, 1.000]"
    # and back: square value * 600 - 100 on the short axis, axis value * side
    assert chat.text_to_box("[0.100, 0.233, 0.500, 0.500]", 600, 400) == pytest.approx((60, 39.8, 300, 200))
    assert chat.text_to_box("[0.100, 0.233, 0.500, 0.500]", 600, 400, "axis") == \
        pytest.approx((60, 93.2, 300, 200))

def test_rel1000_form_is_qwen3_vl_s_relative_0_to_1000_worked_by_hand():
    """Qwen3-VL grounds in integers 0-1000 of each side (QwenLM/Qwen3-VL cookbooks/omni_recognition.ipynb: "we use
    relative coordinates, and the coordinates are scaled from 0 to 1000"; qwen-vl-finetune/tools/process_bbox.ipynb:
    round(x / w * 1000)). Non-square images, by hand."""
    assert chat.box_to_text((64, 48, 320, 240), 640, 480, "rel1000") == "[100, 100, 500, 500]"
    # 10/300 = 33.3 -> 33; 20/200 -> 100; 155.5/300 = 518.3 -> 518; 199/200 -> 995
    assert chat.box_to_text((10, 20, 155.5, 199), 300, 200, "rel1000") == "[33, 100, 518, 995]"
    assert chat.text_to_box("[33, 100, 518, 995]", 300, 200, "rel1000") == pytest.approx((9.9, 20.0, 155.4, 199.0))
    # a Visual-CoT / VisRL data box (square-normalised: the 300 x 200 page centred in a 300 px square, 50 px above
    # it) is x 30-90, y 0.3 * 300 - 50 = 40 to 0.5 * 300 - 50 = 100 in pixels: 100, 200, 300, 500 per mille
    data_box = chat.text_to_box("[0.100, 0.300, 0.300, 0.500]", 300, 200, "square")
    assert data_box == pytest.approx((30, 40, 90, 100))
    assert chat.box_to_text(data_box, 300, 200, "rel1000") == "[100, 200, 300, 500]"
    assert chat.box_to_text((30, 40, 90, 100), 200, 300, "rel1000") == "[150, 133, 450, 333]"  # portrait
    assert chat.text_to_box("[100, 200, 1001, 500]", 300, 200, "rel1000") is None  # past the edge: a failure
    assert chat.text_to_box("[100, 200, 1200, 500]", 300, 200, "rel1000", strict=True) == (30, 40, 300, 100)  # cut
    assert chat.rewrite_box_text("[100.4, 200, 300, 500.6]", "rel1000") == "[100, 200, 300, 501]"


def test_pixel_form():
    assert chat.box_to_text((100, 50, 500, 250), 1000, 500, "pixel", resized=(560, 280)) == "[56, 28, 280, 140]"
    assert chat.text_to_box("[56, 28, 280, 140]", 1000, 500, "pixel", resized=(560, 280)) == \
        pytest.approx((100, 50, 500, 250))
    with pytest.raises(ValueError):
        chat.box_to_text((0, 0, 1, 1), 10, 10, "pixel")
    with pytest.raises(ValueError):
        chat.box_to_text((0, 0, 1, 1), 10, 10, "polar")

@pytest.mark.parametrize("text", [
    "", "no box here", "[0.1, 0.2, 0.3]", "[nan, 0.1, 0.2, 0.3]", "[0.1, inf, 0.2, 0.3]", "[NaN, NaN, 1, 1]",
    "[1e999, 0, 1, 1]", "[0.5, 0.2, 0.3, 0.4]", "[0.1, 0.4, 0.3, 0.2]", "[-0.1, 0.2, 0.3, 0.4]", "[", "]]",
    "][0.1, 0.2, 0.3, 0.4", "[0.1, 0.2, 0.3, 0.4", "[0.1, 0.2] [0.3, 0.4]", "框[一, 二, 三, 四]", None, 42,
])
def test_parse_failures(text):
    assert chat.parse_box(text) is None
    assert chat.text_to_box(text, 100, 100) is None

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
    assert chat.parse_box(text) == pytest.approx(expected)

def test_parse_failure_count_and_speed():
    replies = ["[0.1, 0.2, 0.3, 0.4]", "[0.1,0.2,0.3,0.4]", "sure: [0, 0, 1, 1]", "[0.3, 0.2, 0.1, 0.4]",
               "I cannot tell", "[nan, 0, 1, 1]", "[0.1, 0.2, 0.3]"]
    assert sum(chat.parse_box(r) is None for r in replies) == 4
    junk = ["[" * 200_000, "]" * 200_000, "[" + "1." * 100_000 + "]", "[" + "9" * 200_000 + "e" * 1000,
            "[" + "0, " * 100_000, "é" * 200_000]
    t = time.perf_counter()
    for j in junk:
        chat.parse_box(j)
    assert time.perf_counter() - t < 1.0

def test_text_to_box_rejects_and_clips():
    assert chat.text_to_box("[0.1, 0.2, 1.3, 0.4]", 391, 500) is None  # normalised value outside the image
    assert chat.text_to_box("[0.0, 0.0, 0.05, 1.0]", 391, 500) is None  # all in the left pad: empty
    assert chat.text_to_box("[0.0, 0.0, 0.5, 0.5]", 391, 500) == pytest.approx((0, 0, 196, 250))  # clipped
    assert chat.text_to_box("[0, 0, 2000, 2000]", 100, 50, "pixel", resized=(200, 100)) == (0, 0, 100, 50)

def test_iou_union_and_ablation_boxes():
    a = (0, 0, 10, 10)
    assert chat.iou(a, a) == 1.0
    assert chat.iou(a, (20, 20, 30, 30)) == 0.0
    assert chat.iou(a, (10, 0, 20, 10)) == 0.0  # touching edges
    assert chat.iou(a, (0, 0, 5, 5)) == 0.25
    assert chat.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert chat.iou((0, 0, 4, 2), (2, 0, 6, 2)) == pytest.approx(4 / 12)
    assert chat.iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0
    assert data.union_box([(0, 5, 10, 10), (3, 0, 4, 20)]) == (0, 0, 10, 20)
    with pytest.raises(ValueError):
        data.union_box([])
    assert chat.center_box(391, 500) == pytest.approx((125 - 54, 125, 375 - 54, 375))
    assert chat.center_box(600, 400) == pytest.approx((150, 50, 450, 350))
    b1, b2 = chat.random_box(600, 400, random.Random(0)), chat.random_box(600, 400, random.Random(0))
    assert b1 == b2
    for seed in range(200):
        x1, y1, x2, y2 = chat.random_box(600, 400, random.Random(seed))
        assert 0 <= x1 < x2 <= 600 and 0 <= y1 < y2 <= 400
        assert 60 - 1e-9 <= x2 - x1 <= 300 + 1e-9 and 40 - 1e-9 <= y2 - y1 <= 200 + 1e-9

# -----------------------------------------------------------------------------
# crops

def _contains(win, box):
    return win[0] <= box[0] and win[1] <= box[1] and box[2] <= win[2] and box[3] <= win[3]

def test_crop_vcot_hand_example():
    # centre (459 // 2, 736 // 2) = (229, 368), half side max(12, 25, 112) = 112
    assert chat.crop_window((217, 343, 242, 393), 391, 500, rule="vcot") == (117, 256, 341, 480)

@pytest.mark.parametrize("box", [
    (0, 0, 10, 10), (590, 0, 600, 10), (0, 390, 10, 400), (590, 390, 600, 400),  # corners
    (300, 0, 310, 5), (300, 395, 310, 400), (0, 200, 4, 210), (596, 200, 600, 210),  # borders
    (250, 150, 300, 200), (100.4, 100.6, 120.2, 180.9),
])
def test_crop_vcot_small_boxes(box):
    win = chat.crop_window(box, 600, 400, rule="vcot")
    assert all(isinstance(v, int) for v in win)
    assert win[2] - win[0] == 224 and win[3] - win[1] == 224  # shifted inside, never cut
    assert 0 <= win[0] and 0 <= win[1] and win[2] <= 600 and win[3] <= 400
    assert _contains(win, box)

def test_crop_vcot_big_and_small_images():
    box = (100, 50, 500, 350)  # 400 x 300: half side 200
    win = chat.crop_window(box, 600, 400, rule="vcot")
    assert win == (100, 0, 500, 400)  # centre (300, 200), half side 200: 400 px, the whole height
    # an odd side over 224 may lose its last pixel, exactly as upstream's floor division does
    win = chat.crop_window((0, 0, 301, 301), 600, 600, rule="vcot")
    assert win == (0, 0, 300, 300)
    assert chat.crop_window((10, 10, 20, 20), 150, 100, rule="vcot") == (0, 0, 150, 100)  # smaller image: all of it
    assert chat.crop_window((10, 10, 20, 20), 300, 150, rule="vcot") == (0, 0, 224, 150)

def test_crop_raw_and_image():
    assert chat.crop_window((10.2, 20.7, 30.1, 40.0), 100, 100, "raw") == (10, 20, 31, 40)
    assert chat.crop_window((50, 50, 50, 50), 100, 100, "raw") == (50, 50, 51, 51)
    assert chat.crop_window((100, 100, 100, 100), 100, 100, "raw") == (99, 99, 100, 100)
    img = Image.new("RGB", (600, 400))
    assert img.crop(chat.crop_window((0, 0, 10, 10), *img.size, rule="vcot")).size == (224, 224)
    assert img.crop(chat.crop_window((0, 0, 10, 10), *img.size, rule="raw")).size == (10, 10)
    assert chat.crop_window((0, 0, 10, 10), *img.size) == (0, 0, 10, 10)  # the default: upstream's raw crop
    with pytest.raises(ValueError):
        chat.crop_window((0, 0, 1, 1), 10, 10, rule="nope")

# -----------------------------------------------------------------------------
# tokenisation, labels and batching (on the tiny checkpoint's tokenizer and image processor)

@pytest.fixture(scope="module")
def processor(tiny_path):
    import model

    return model.load_model(str(tiny_path))[1]


@pytest.mark.parametrize("messages", [
    chat.focus_messages("What digit is inside the red frame?"),
    chat.answer_messages("Which number is written in the blue square?"),
    chat.direct_messages("Read the digit in the cyan box."),
    chat.vcot_answer_messages("Which number is written in the blue square?", "[0.100, 0.200, 0.300, 0.400]"),
])
@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-vl", "tiny-qwen3.5"])
def test_render_chat_matches_the_qwen_template(name, messages):
    """Each family's chat template (Qwen2.5-VL's default system prompt; Qwen3-VL's none; Qwen3.5's empty think block
    after the last user turn, thinking off) rendered by visrl's render_chat and by the checkpoint's own template."""
    import model

    tokenizer = model.load_processor(name).tokenizer
    form = tokenizer.visrl_chat_form
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    assert chat.render_chat(messages, form=form) == expected
    full = messages + [{"role": "assistant", "content": "7"}]
    assert chat.render_chat(full, add_generation_prompt=False, form=form) == \
        tokenizer.apply_chat_template(full, tokenize=False, enable_thinking=False)
    assert ("You are a helpful assistant." in expected) == (form == "qwen2")
    assert expected.count("<think>") == (form == "qwen3.5")  # the vcot form's earlier assistant turn has none


def test_only_assistant_tokens_are_supervised(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    record = data.read_records(synth_dir / "train.jsonl")[0]
    focus, answer = chat.sft_samples(record, tok, image_processor)
    box_text = chat.box_to_text(record.box, record.width, record.height)
    for sample, response in ((focus, box_text), (answer, record.answer)):
        supervised = [t for t, label in zip(sample.input_ids, sample.labels) if label != chat.IGNORE_INDEX]
        assert supervised == [label for label in sample.labels if label != chat.IGNORE_INDEX]
        assert tok.decode(supervised) == response + "<|im_end|>"
        # everything before the response is the prompt, rendered by the chat format
        n_prompt = sample.labels.index(next(label for label in sample.labels if label != chat.IGNORE_INDEX))
        prompt = tok.decode(sample.input_ids[:n_prompt])
        assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system\n" in prompt
    assert "<|vision_end|>\n" + record.question + " " + chat.FOCUS_INSTRUCTION in tok.decode(focus.input_ids)
    assert record.question + " " + chat.VISRL_INSTRUCTION + "\n<|vision_start|>" in tok.decode(answer.input_ids)


def test_crop_alone_sample_is_the_bare_question_on_the_crop(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    record = data.read_records(synth_dir / "train.jsonl")[1]
    focus, answer, crop = chat.sft_samples(record, tok, image_processor, crop_alone=True)
    assert crop.kind == "crop" and crop.images == answer.images[1:]
    text = tok.decode(crop.input_ids)
    assert text.count("<|vision_start|>") == 1 and "<|vision_end|>\n" + record.question + "<|im_end|>" in text
    assert tok.decode([t for t, label in zip(crop.input_ids, crop.labels) if label != chat.IGNORE_INDEX]) == \
        record.answer + "<|im_end|>"
    pixels = chat.collate([crop], image_processor, tok.pad_token_id, 0)  # one image: the crop, not the whole page
    expected = image_processor(images=[chat.fit_image(data.load_image(record).crop(crop.images[0]), image_processor)],
                               return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert torch.equal(pixels["pixel_values"], expected["pixel_values"])
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    merge = image_processor.merge_size ** 2
    assert crop.input_ids.count(image_pad) == int(expected["image_grid_thw"].prod()) // merge


def test_image_tokens_match_the_processor(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for record in data.read_records(synth_dir / "train.jsonl")[:4]:
        for sample in chat.sft_samples(record, tok, image_processor):
            pixels = chat.collate([sample], image_processor, tok.pad_token_id, image_pad)
            grid = pixels["image_grid_thw"]
            assert len(grid) == (1 if sample.kind == "focus" else 2)
            expected = int((grid.prod(-1) // image_processor.merge_size**2).sum())
            assert sample.input_ids.count(image_pad) == expected
            assert pixels["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_collate_processes_each_distinct_view_once_and_the_cache_decodes_nothing_twice(processor, synth_dir,
                                                                                      monkeypatch):
    tok, image_processor = processor.tokenizer, processor.image_processor
    records = data.read_records(synth_dir / "train.jsonl")[:3]
    samples = [s for r in records for s in chat.sft_samples(r, tok, image_processor, crop_alone=True)]
    # independently: every row's images processed on their own, in token order
    expected = [image_processor(images=[chat.fit_image(data.load_image(s.record) if w is None else
                                                       data.load_image(s.record).crop(w), image_processor)],
                                return_tensors="pt") for s in samples for w in s.images]
    batch = chat.collate(samples, image_processor, tok.pad_token_id, 0)
    # per record: the page and one crop window (the answer and crop-alone samples share it)
    assert batch["image_grid_thw"].shape[0] == 2 * len(records) and len(batch["image_index"]) == len(expected)
    offsets = [0] + batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    for i, e in zip(batch["image_index"], expected):
        assert torch.equal(batch["pixel_values"][offsets[i]:offsets[i + 1]], e["pixel_values"])
        assert batch["image_grid_thw"][i].tolist() == e["image_grid_thw"][0].tolist()
    plain = [chat.collate([s], image_processor, tok.pad_token_id, 0) for s in samples]
    loads = []
    real_load = data.load_image
    monkeypatch.setattr(chat, "load_image", lambda record: loads.append(record.image) or real_load(record))
    cache = {}
    for _ in range(2):  # two epochs, one sample per batch
        for s, expected_batch in zip(samples, plain):
            got = chat.collate([s], image_processor, tok.pad_token_id, 0, cache)
            assert torch.equal(got["pixel_values"], expected_batch["pixel_values"])
            assert torch.equal(got["image_grid_thw"], expected_batch["image_grid_thw"])
    assert len(cache) == 2 * len(records) and len(loads) <= 2 * len(records)  # never a view decoded twice


def test_encode_rejects_extra_images(processor):
    with pytest.raises(ValueError, match="placeholders"):
        chat.encode(processor.tokenizer, processor.image_processor, chat.focus_messages("q"),
                    [(300, 300), (224, 224)], "x")


def test_collate_pads_right_and_marks_image_tokens(processor, synth_dir):
    tok, image_processor = processor.tokenizer, processor.image_processor
    record = data.read_records(synth_dir / "train.jsonl")[0]
    samples = chat.sft_samples(record, tok, image_processor)
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    batch = chat.collate(samples, image_processor, tok.pad_token_id, image_pad)
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
        assert batch["response_targets"][mine].tolist() == [t for t in s.labels if t != chat.IGNORE_INDEX]
        flat = batch["input_ids"].reshape(-1)
        assert torch.equal(flat[batch["response_index"][mine] + 1], batch["response_targets"][mine])


# -----------------------------------------------------------------------------
# upstream's prompts as token ids: LLaMA-Factory's qwen2_vl template and Qwen2vlPlugin, rebuilt here from their
# literal strings (src/visrl/data/template.py, mm_plugin.py), on upstream's data strings per stage

UPSTREAM_FOCUS = "Please provide the bounding box coordinate of the region that can help you answer the question better."
UPSTREAM_VISRL = ("Please first provide the bounding box coordinate of the region, then refer to the corresponding "
                  "sub-image to answer the question better.")


def upstream_ids(tok, image_processor, human: str, sizes, response: str) -> list[int]:
    """format_system + format_user around the human turn, each <image> replaced as the plugin does, then the
    assistant's content + the stop word <|im_end|> (the supervised part)."""
    for w, h in sizes:
        n = chat.image_token_count(w, h, image_processor)
        human = human.replace("<image>", "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>", 1)
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            + "<|im_start|>user\n" + human + "<|im_end|>\n<|im_start|>assistant\n" + response + "<|im_end|>")
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("stage", ["sft round 1", "sft round 2", "generation box", "generation answer",
                                   "stage 1", "stage 2 box", "stage 2 answer", "inference box", "inference answer"])
def test_prompts_are_upstream_s_tokens(processor, synth_dir, stage):
    tok, ip = processor.tokenizer, processor.image_processor
    record = data.read_records(synth_dir / "train.jsonl")[0]
    q, size = record.question, (record.width, record.height)
    box_text = chat.box_to_text(record.box, *size)
    window = chat.crop_window(record.box, *size)
    crop = (window[2] - window[0], window[3] - window[1])
    vcot_turn = "<image>\n" + q + " " + UPSTREAM_FOCUS  # Visual-CoT's data: SFT round 1 as is
    rl_turn = vcot_turn.replace(UPSTREAM_FOCUS, UPSTREAM_VISRL)  # sft_format_round2.py, data_gen/generate.py
    answer_turn = rl_turn + "\n<image>"  # round 2, generation's answer step, stage 2 (aligner.py)
    pair = data.Pair(record, box_text, "[0.100, 0.100, 0.200, 0.200]", record.answer, "wrong")
    focus, answer = chat.sft_samples(record, tok, ip)
    stage1, = chat.dpo_samples(pair, tok, ip, stage=1)
    box2, answer2 = chat.dpo_samples(pair, tok, ip, stage=2)
    cases = {  # ours: (ids, the upstream human turn, its images, the response)
        "sft round 1": (focus.input_ids, vcot_turn, [size], box_text),
        "sft round 2": (answer.input_ids, answer_turn, [size, crop], record.answer),
        "generation box": (chat.encode(tok, ip, chat.focus_messages(q, rl=True), [size], box_text)[0], rl_turn,
                           [size], box_text),
        "generation answer": (chat.encode(tok, ip, chat.answer_messages(q), [size, crop], "x")[0], answer_turn,
                              [size, crop], "x"),
        "stage 1": (stage1.chosen.input_ids, rl_turn, [size], box_text),
        "stage 2 box": (box2.chosen.input_ids, rl_turn, [size], box_text),
        "stage 2 answer": (answer2.chosen.input_ids, answer_turn, [size, crop], record.answer),
        # inference asks as SFT taught: round 1's turn, then round 2's
        "inference box": (chat.encode(tok, ip, chat.focus_messages(q), [size], "y")[0], vcot_turn, [size], "y"),
        "inference answer": (chat.encode(tok, ip, chat.answer_messages(q), [size, crop], "z")[0], answer_turn,
                             [size, crop], "z"),
    }
    ours, human, sizes, response = cases[stage]
    assert ours == upstream_ids(tok, ip, human, sizes, response)


# -----------------------------------------------------------------------------
# the pixel cap (upstream's image rule)

@pytest.mark.parametrize("size, fitted", [
    ((1344, 1344), (512, 512)),  # sqrt(262144 / 1806336) = 0.38095...; 1344 x it = 512.0
    ((1000, 500), (724, 362)),  # factor sqrt(0.524288) = 0.72408; 724.08 -> 724, 362.04 -> 362
    ((512, 512), (512, 512)),  # at the cap: untouched
    ((300, 20), (300, 28)),  # under the cap, a side under 28 -> 28
    ((5, 6000), (28, 5040)),  # -> (28, 6000), then height / width > 200 -> width * 180
    ((391, 500), (391, 500)),
])
def test_the_pixel_cap_is_upstream_s_rule(processor, tiny_path, size, fitted):
    import model

    image = Image.frombytes("RGB", size, bytes((7 * i) % 256 for i in range(3 * size[0] * size[1])))
    assert processor.image_processor.visrl_max_pixels == 512 * 512  # the default
    assert chat.fitted_size(*size, processor.image_processor) == fitted
    got = chat.fit_image(image, processor.image_processor)
    assert got.size == fitted
    # NEAREST, step by step as upstream resizes (for (5, 6000): twice)
    steps = {(5, 6000): [(28, 6000), (28, 5040)]}.get(size, [fitted] if fitted != size else [])
    expected = image
    for step in steps:
        expected = expected.resize(step, resample=Image.NEAREST)
    assert got.tobytes() == expected.tobytes()
    # an image's tokens are those of its fitted size, which the uncapped processor gives the fitted image
    uncapped = model.load_model(str(tiny_path), max_pixels=0)[1].image_processor
    assert chat.fitted_size(*size, uncapped) == size and chat.fit_image(image, uncapped) is image
    assert chat.image_token_count(*size, processor.image_processor) == chat.image_token_count(*fitted, uncapped)


def test_upstream_sft_round_records_give_their_one_step(processor, tmp_path):
    import json

    from test_data import _png, sft_round_items

    _png(tmp_path / "a.png")
    (tmp_path / "sft.json").write_text(json.dumps(list(sft_round_items())))
    round1, round2 = data.read_records(tmp_path / "sft.json")
    tok, ip = processor.tokenizer, processor.image_processor
    (focus,) = chat.sft_samples(round1, tok, ip)  # the box reply exactly as the file writes it
    assert focus.kind == "focus" and tok.decode([t for t, label in zip(focus.input_ids, focus.labels)
                                                 if label != chat.IGNORE_INDEX]) == "[0.016, 0.042, 0.156, 0.417]<|im_end|>"
    (answer,) = chat.sft_samples(round2, tok, ip)  # the answer on the crop named by the file: the raw box
    assert answer.kind == "answer" and answer.images == [None, (1, 2, 10, 20)]
    with pytest.raises(data.DataError, match="square-normalised"):
        chat.sft_samples(round1, tok, ip, box_form="axis")


def test_rewrite_box_text_is_upstream_s_3_decimals():
    # convert_statistic_format.py: json.loads the box, '{:.3f}' each number, joined by ', '
    assert chat.rewrite_box_text("[0.1,0.25, 0.5,0.6]") == "[0.100, 0.250, 0.500, 0.600]"
    assert chat.rewrite_box_text("the box is [0.12345, 0.2, 0.3, 0.4] ok") == "[0.123, 0.200, 0.300, 0.400]"
    assert chat.rewrite_box_text("[10.4, 20, 30.6, 40]", "pixel") == "[10, 20, 31, 40]"
    with pytest.raises(ValueError):
        chat.rewrite_box_text("[0.1, 0.2")

def _upstream_crop(reply: str, width: int, height: int):
    """Upstream generation's path for a box reply, from data_gen/generate.py: `bbox = ast.literal_eval(reply)` and
    the crop `image[int(y1*h):int(y2*h), int(x1*w):int(x2*w)]` encoded with cv2.imencode, which raises on an empty
    image (l.155-161, l.105-111); the diversity step reads the first reply again with `json.loads` (l.137-139); any
    exception drops the attempt. Returns the crop's (left, top, right, bottom), or None where upstream drops it."""
    import ast
    import json

    import numpy as np
    try:
        bbox = ast.literal_eval(reply)
        json.loads(reply)
        x1, y1, x2, y2 = int(bbox[0] * width), int(bbox[1] * height), int(bbox[2] * width), int(bbox[3] * height)
        crop = np.zeros((height, width, 3), np.uint8)[y1:y2, x1:x2]
        if crop.size == 0:
            raise ValueError("cv2.imencode: !image.empty()")
        (left, right, _), (top, bottom, _) = slice(x1, x2).indices(width), slice(y1, y2).indices(height)
        return left, top, right, bottom  # the pixels numpy's slices take
    except Exception:
        return None

@pytest.mark.parametrize("reply", [
    "[0.1, 0.2, 0.5, 0.6]", " [0.1,0.2,0.5,0.6]\n", "[0, 0, 1, 1]", "[1e-1, 2e-1, 5e-1, 6e-1]",
    "[0.1, 0.2, 0.5, 0.6, 0.7]",  # the first four
    "[0.1, 0.2, 1.3, 0.6]", "[0.95, 0.2, 1.3, 1.6]",  # above 1: cut at the edge
    "The box is [0.1, 0.2, 0.5, 0.6]", "[0.1, 0.2, 0.5, 0.6] is where", "(0.1, 0.2, 0.5, 0.6)", "[.1, 0.2, 0.5, 0.6]",
    "[0.1, 0.2, 0.5]", "[]", "", "[0.1, 0.2, 0.5, 0.6", '{"bbox": [0.1, 0.2, 0.5, 0.6]}', '["0.1", 0, 1, 1]',
    "[NaN, 0, 1, 1]", "[0.1, 0.2, Infinity, 0.6]", "[[0.1, 0.2, 0.5, 0.6]]",
    "[1.1, 0.2, 1.3, 0.6]", "[0.5, 0.2, 0.5, 0.6]", "[0.6, 0.2, 0.5, 0.6]",  # empty crops
    "[0.501, 0.2, 0.509, 0.6]",  # inside one pixel column: int() makes it empty
])
@pytest.mark.parametrize("form", ["square", "axis"])
def test_strict_box_replies_keep_and_crop_what_upstream_s_generation_keeps(reply, form):
    """On a square image (where upstream's axis-read crop and the square form agree) strict reading keeps exactly the
    replies upstream keeps, and its raw crop holds upstream's (rounded outward, at most 1 px more a side)."""
    ours, theirs = chat.read_box(reply, 100, 100, form, strict=True), _upstream_crop(reply, 100, 100)
    assert (ours is None) == (theirs is None)
    if ours is not None:
        window = chat.crop_window(ours, 100, 100)
        assert all(0 <= d <= 1 for d in (theirs[0] - window[0], theirs[1] - window[1],
                                         window[2] - theirs[2], window[3] - theirs[3]))

def test_strict_box_replies_refuse_negative_values_that_upstream_wraps():
    """Upstream slices with a negative index (bug): [-0.3, 0.2, 0.9, 0.6] crops columns 70-90 of a 100 px image, the
    wrong region; strict reading drops such a reply (README fidelity table)."""
    assert _upstream_crop("[-0.3, 0.2, 0.9, 0.6]", 100, 100) == (70, 20, 90, 60)  # numpy: [-30:90] is 70:90
    assert chat.read_box("[-0.3, 0.2, 0.9, 0.6]", 100, 100, strict=True) is None
    assert chat.parse_box_reply("[true, 0, 1, 1]") is None  # JSON's true is no coordinate
