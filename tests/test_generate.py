"""Self-evolution data generation: the diversity box, the pair filter, judge replies over HTTP, resume,
malformed boxes, and pairs that `visrl.py dpo` trains on."""

import base64
import io
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import chat
import data
import dpo
import endpoint
import generate

# --------------------------------------------------------------------------------------------
# helpers


def _records(synth_dir, tmp_path, n, drop_boxes=()):
    """n synthetic records with distinct questions ('Q3: What digit ...'), so a scripted sampler can
    tell them apart; records whose number is in drop_boxes lose their box (no annotation)."""
    records = data.read_records(synth_dir / "train.jsonl")[:n]
    for i, r in enumerate(records):
        r.question = f"Q{i}: {r.question}"
        if i in drop_boxes:
            r.boxes = []
    path = tmp_path / "records.jsonl"
    data.write_records(path, records)  # images stay in synth_dir: read back with image_root=synth_dir
    return path, data.read_records(path, image_root=synth_dir)


def _cfg(path, synth_dir, out, **overrides):
    base = dict(data=str(path), image_root=str(synth_dir), out=str(out), attempts=3, chunk=2, seed=0,
                use_annotated_boxes=True)  # both crop scores exercised; the default reads no box (tested below)
    return generate.GenerateConfig(**{**base, **overrides})


def _prompt_kind(messages):
    """('focus' | 'answer' | 'direct', question) of one of our prompts (either prompt set)."""
    content = messages[0]["content"]
    text = next(p["text"] for p in content if p["type"] == "text").removeprefix("\n")
    n_images = sum(p["type"] == "image" for p in content)
    for instruction in (chat.FOCUS_INSTRUCTION, chat.VISRL_INSTRUCTION):
        if n_images == 1 and text.endswith(" " + instruction):
            return "focus", text[:-len(instruction) - 1]
    if n_images == 2:
        return "answer", text.split(" " + chat.VISRL_INSTRUCTION)[0]
    return "direct", text


class Scripted:
    """A stand-in policy: replies are a seeded function of (seed, position, prompt), as a sampled model's
    are, so resumed and uninterrupted runs can be compared. Focus: the true box, a random box, or junk;
    answers: right or wrong."""

    def __init__(self, records, kill_at=None):
        self.by_question = {r.question: r for r in records}
        self.calls, self.kill_at = [], kill_at

    def __call__(self, prompts, sampling, seed):
        self.calls.append([_prompt_kind(m)[0] for m, _ in prompts])
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        replies = []
        for i, (messages, images) in enumerate(prompts):
            kind, question = _prompt_kind(messages)
            r = self.by_question[question]
            rng = random.Random(f"{seed}|{i}|{question}|{kind}")
            u = rng.random()
            if kind == "focus":
                box = r.box or (0.0, 0.0, r.width / 2, r.height / 2)
                replies.append(chat.box_to_text(box, r.width, r.height) if u < 0.45 else
                               chat.box_to_text(chat.random_box(r.width, r.height, rng), r.width, r.height)
                               if u < 0.85 else "[0.1, 0.2")
            else:
                replies.append(r.answer if u < 0.5 else "wrong " * (1 + len(r.answer) % 2) + "answer")
        return replies


def _read_lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# the diversity box


@pytest.mark.parametrize("first,size", [
    ((100, 120, 180, 200), (600, 500)),   # small box
    ((10, 10, 400, 300), (640, 480)),     # big box: sides capped at the image's
    ((0, 0, 30, 480), (640, 480)),        # full-height strip at the border
    ((300.5, 7.25, 301.75, 9.0), (608, 498)),  # sub-pixel box
])
def test_diversity_box_never_overlaps_and_keeps_its_size(first, size):
    width, height = size
    fw, fh = first[2] - first[0], first[3] - first[1]
    found = 0
    for seed in range(200):
        result = generate.diversity_box(first, width, height, random.Random(seed))
        assert result == generate.diversity_box(first, width, height, random.Random(seed))  # deterministic
        if result is None:
            continue
        found += 1
        (x1, y1, x2, y2), d = result
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert chat.iou((x1, y1, x2, y2), first) == 0.0
        assert x2 <= first[0] or x1 >= first[2] or y2 <= first[1] or y1 >= first[3]
        assert any(abs(d - t) < 1e-9 for t in (0.4, 0.5, 0.6, 0.7, 0.8))
        assert (1 - d) * fw - 1e-9 <= x2 - x1 <= (1 + d) * fw + 1e-9
        assert (1 - d) * fh - 1e-9 <= y2 - y1 <= (1 + d) * fh + 1e-9
    assert found >= 150
    boxes = {generate.diversity_box(first, width, height, random.Random(s)) for s in range(20)}
    assert len(boxes) > 15  # the seed matters


def test_diversity_tolerance_grows_and_gives_up():
    # the free strips are 25 px wide, (a) is 50 px wide: no box fits until d > 0.5
    tolerances = [r[1] for s in range(100) if (r := generate.diversity_box((25, 0, 75, 100), 100, 100, random.Random(s)))]
    assert tolerances and min(tolerances) >= 0.6 - 1e-9
    assert generate.diversity_box((0, 0, 100, 100), 100, 100, random.Random(0)) is None  # nowhere to go
    rng = random.Random(0)  # 100 tries at most, then None: the rng advanced by exactly 100 * 4 draws
    generate.diversity_box((0, 0, 100, 100), 100, 100, rng)
    reference = random.Random(0)
    for _ in range(400):
        reference.random()
    assert rng.random() == reference.random()


# --------------------------------------------------------------------------------------------
# the pair filter

KEPT = "kept"
FILTER_TABLE = [
    # answer scores, crop scores, (chosen, rejected, reason)
    ([1.0, 0.0], [0.9, 0.1], (0, 1, KEPT)),
    ([0.8, 0.2], [0.8, 0.2], (0, 1, KEPT)),                       # every boundary exactly: kept
    ([0.9, 0.21], [0.9, 0.1], (None, None, "all answer scores > low")),
    ([0.79, 0.0], [0.9, 0.1], (None, None, "all answer scores < high")),
    ([0.5, 0.5, 0.5], [0.9, 0.5, 0.1], (None, None, "all answer scores > low")),
    ([0.1, 0.1], [0.9, 0.1], (None, None, "all answer scores < high")),
    ([1.0], [0.9], (None, None, "all answer scores > low")),
    ([0.0], [0.1], (None, None, "all answer scores < high")),
    ([1.0, 1.0, 0.0, 0.0], [0.5, 0.9, 0.1, 0.0], (1, 2, KEPT)),    # ties: the first that qualifies
    ([1.0, 1.0, 0.0, 0.0], [0.9, 0.9, 0.2, 0.2], (0, 2, KEPT)),    # ties: the first of equals
    ([0.0, 1.0, 0.0, 1.0], [0.0, 0.8, 0.2, 0.9], (1, 0, KEPT)),    # rejected may come first
    ([1.0, 0.0], [0.79, 0.1], (None, 1, "no chosen candidate (top answer score with crop >= high)")),
    ([1.0, 0.9, 0.0], [0.5, 1.0, 0.0], (None, 2, "no chosen candidate (top answer score with crop >= high)")),
    ([1.0, 0.0], [0.9, 0.21], (0, None, "no rejected candidate (lowest answer score with crop <= low)")),
    ([1.0, 0.1, 0.0], [0.9, 0.0, 0.5], (0, None, "no rejected candidate (lowest answer score with crop <= low)")),
    ([None, 1.0, 0.0], [1.0, 0.9, 0.0], (1, 2, KEPT)),             # unscored candidates are ignored
    ([1.0, 0.0, 0.0], [0.9, None, 0.1], (0, 2, KEPT)),
    ([None, None], [0.9, None], (None, None, "no scored candidate")),
    ([], [], (None, None, "no scored candidate")),
]


@pytest.mark.parametrize("answers,crops,expected", FILTER_TABLE)
def test_pair_filter_table(answers, crops, expected):
    verdict = generate.select_pair(answers, crops)
    assert (verdict.chosen, verdict.rejected, verdict.reason) == expected


def test_pair_filter_all_equal_and_thresholds():
    # with the default thresholds "all equal" is always caught first (all > 0.2 or all < 0.8);
    # thresholds that overlap let it show on its own
    assert generate.select_pair([0.5, 0.5], [0.9, 0.1], answer_high=0.5, answer_low=0.5).reason == \
        "all answer scores equal"
    assert generate.select_pair([0.6, 0.5], [0.9, 0.1], answer_high=0.5, answer_low=0.5).reason == KEPT
    assert generate.select_pair([1.0, 0.0], [0.6, 0.4], crop_high=0.6, crop_low=0.4).reason == KEPT
    assert generate.select_pair([1.0, 0.0], [0.6, 0.4], crop_high=0.61, crop_low=0.4).chosen is None


# --------------------------------------------------------------------------------------------
# judge replies


@pytest.mark.parametrize("reply,score", [
    ('{"score": 0.8}', 0.8), ('```json\n{"score": 1}\n```', 1.0), ("score: 0.5.", 0.5), ("0.3", 0.3),
    ('{"score": "0.7"}', 0.7), ('Sure. {"score": 0.6} since it matches', 0.6), ("Score = 0", 0.0),
    ('{"score": 0.9}\n{"score": 0.9}', 0.9), ("'score': .25", 0.25),
    ("no idea", None), ('{"score": 8}', None), ('{"score": NaN}', None), ('{"score": -0.1}', None),
    ("score: 0.2, later score: 0.9", None), ('{"score": true}', None), ("", None), ('{"points": 1}', None),
    ("[0.5]", None), (None, None),
])
def test_parse_score_json(reply, score):
    assert generate.parse_score_json(reply) == score


def test_rule_answer_score():
    assert generate.rule_answer_score("4", ["4"]) == 1.0
    assert generate.rule_answer_score("The digit is 4.", "4") == 1.0      # containment
    assert generate.rule_answer_score("Seven", ["eight", "seven"]) == 1.0  # a list; normalised
    assert generate.rule_answer_score("wrong", "7") == 0.0
    assert 0.5 < generate.rule_answer_score("recieve", "receive") < 1.0    # ANLS partial credit


def test_judge_prompts_are_upstream_verbatim(synth_dir, tmp_path):
    _, records = _records(synth_dir, tmp_path, 1)
    r = records[0]
    # upstream (zhangquanchen/VisRL data_gen/generate.py), its f-strings as they appear in that file
    gt_questin, gt_response, response = r.question + " ", r.answer, "seven"
    judge_score_prompt = f'''You are responsible for proofreading the answers, you need to give the score to the model's answer by referring to the standard answer, based on the given question and image.
    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in JSON format, for example, {{"score": 0.8}}, without showing the intermediate process.
    The evaluation criteria require that the closer the model's answer is to the standard answer, the higher the score.

    Question: {gt_questin}
    Standard answer: {gt_response}
    Model's answer: {response}
    '''
    judge_bbox_prompt = f'''You are responsible for verifying the relevance of the image based on the provided question and standard answer, you need to assess whether the image aligns with the standard answer.
    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in JSON format, for example, {{"score": 0.8}}, without showing the intermediate process.
    The evaluation criteria is that, the higher score will be if the image effectively encompasses the information provided in the standard answer based on question.

    Question: {gt_questin}
    Standard answer: {gt_response}
    '''
    image = data.load_image(r)
    crop = image.crop(chat.crop_window(r.box, *image.size))
    answer_msg = generate.judge_answer_messages(r, response, image)[0]["content"]
    crop_msg = generate.judge_crop_messages(r, crop)[0]["content"]
    assert [p["type"] for p in answer_msg] == ["image_url", "text"] and answer_msg[1]["text"] == judge_score_prompt
    assert [p["type"] for p in crop_msg] == ["image_url", "text"] and crop_msg[1]["text"] == judge_bbox_prompt
    assert _decode(answer_msg[0]).size == image.size and _decode(crop_msg[0]).size == crop.size


def _decode(part):
    return Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))


# --------------------------------------------------------------------------------------------
# runs with a scripted policy


@pytest.mark.parametrize("box_replies", ["strict", "lenient"])
def test_malformed_model_boxes_are_counted_and_skipped(synth_dir, tmp_path, box_replies):
    """strict (upstream's, data_gen/generate.py l.137-161): the whole reply a JSON list, a value above 1 cut at the
    image's edge; lenient: the first [...] anywhere in the reply, nothing above 1."""
    path, records = _records(synth_dir, tmp_path, 1)
    r = records[0]
    good = chat.box_to_text(r.box, r.width, r.height)
    replies = [
        "[0.1, 0.2, 0.3]", good,                      # too few numbers; (b) then has no first box
        good, "[nan, 0.1, 0.2, 0.3]",                 # NaN
        "[0.2, 0.2, 1.7, 0.4]", "[0.5, 0.5, 0.1, 0.1]",  # outside the image; inverted
        "The box is " + good, "",                     # more than the box; no box at all
        good, good,                                   # fine; (b) overlaps (a): replaced
    ]
    calls = []

    def sampler(prompts, sampling, seed):
        kinds = [_prompt_kind(m)[0] for m, _ in prompts]
        calls.append(kinds)
        if kinds[0] == "focus":  # upstream's generation asks for the box with VisRL's instruction
            assert all(m == chat.focus_messages(r.question, rl=True) for m, _ in prompts)
        return replies if kinds[0] == "focus" else [r.answer] * len(prompts)

    summary = generate.generate(_cfg(path, synth_dir, tmp_path / "out", attempts=5, box_replies=box_replies), sampler)
    (line,) = _read_lines(tmp_path / "out" / "candidates.jsonl")
    dropped = [c["dropped"] for c in line["candidates"]]
    failed = "box parse failure"
    strict = box_replies == "strict"
    assert dropped == [failed, "no first box", None, failed, None if strict else failed, failed,
                       failed if strict else None, failed, None, None]
    assert summary["box_parse_failures"] == 5 and summary["candidates"] == 10
    assert summary["candidates_scored"] == 4
    assert calls == [["focus"] * 10, ["answer"] * 4]  # no answer is asked for a skipped candidate
    if strict:  # cut at the right edge, as upstream's crop slices
        assert line["candidates"][4]["box"][2] == r.width and line["candidates"][4]["box"][0] < r.width
    replaced = line["candidates"][9]
    assert replaced["replaced"] and replaced["box_reply"] == good and replaced["box_text"] != good
    assert chat.iou(replaced["box"], line["candidates"][8]["box"]) == 0.0
    assert chat.text_to_box(replaced["box_text"], r.width, r.height) == pytest.approx(replaced["box"])
    assert line["candidates"][2]["crop_score"] == pytest.approx(1.0, abs=0.05)  # the true box (3 decimals)


def test_diversity_rule_replaces_only_above_iou_0_05(synth_dir, tmp_path):
    path, records = _records(synth_dir, tmp_path, 1)
    r = records[0]
    text = lambda box: chat.box_to_text(box, r.width, r.height)  # noqa: E731
    first, near, far = (0, 0, 100, 100), (80, 0, 180, 100), (95, 0, 195, 100)  # IoU 0.111 and 0.026
    replies = [text(first), text(near), text(first), text(far)]

    def sampler(prompts, sampling, seed):
        return replies if _prompt_kind(prompts[0][0])[0] == "focus" else ["1"] * len(prompts)

    generate.generate(_cfg(path, synth_dir, tmp_path / "out", attempts=2), sampler)
    (line,) = _read_lines(tmp_path / "out" / "candidates.jsonl")
    near_cand, far_cand = line["candidates"][1], line["candidates"][3]
    assert near_cand["replaced"] and chat.iou(near_cand["box"], line["candidates"][0]["box"]) == 0.0
    assert not far_cand["replaced"] and far_cand["box_text"] == text(far)


def test_resume_after_a_kill_gives_the_same_files(synth_dir, tmp_path):
    path, records = _records(synth_dir, tmp_path, 7, drop_boxes={1, 4})
    whole = tmp_path / "whole"
    summary = generate.generate(_cfg(path, synth_dir, whole), Scripted(records))
    assert 0 < summary["pairs_kept"] < 7, summary  # the comparison below means something
    assert summary["crop_score_source"] == {"iou with gt box": 5, "answer from crop alone": 2}

    cut = tmp_path / "cut"
    killer = Scripted(records, kill_at=6)  # dies in chunk 1 or 2 (2-3 sampler calls per chunk)
    with pytest.raises(KeyboardInterrupt):
        generate.generate(_cfg(path, synth_dir, cut), killer)
    cand, pairs = cut / "candidates.jsonl", cut / "pairs.jsonl"
    written = cand.read_bytes()
    assert 0 < written.count(b"\n") < 7
    # a kill mid-write: the last question's line is torn, its pair (if any) already on disk is an
    # orphan; and a pair of a finished question is lost
    cand.write_bytes(written[:-25])
    pair_lines = pairs.read_text().splitlines(keepends=True)
    pairs.write_text("".join(pair_lines[1:]) + '{"id": "torn')

    again = generate.generate(_cfg(path, synth_dir, cut), Scripted(records))
    assert cand.read_bytes() == (whole / "candidates.jsonl").read_bytes()
    assert pairs.read_bytes() == (whole / "pairs.jsonl").read_bytes()
    drop = lambda s: {k: v for k, v in s.items() if k != "this_run"}  # noqa: E731
    assert drop(again) == drop(summary)
    assert again["this_run"]["questions"] < 7

    idle = Scripted(records)  # a finished run: nothing to sample, nothing written
    generate.generate(_cfg(path, synth_dir, cut), idle)
    assert idle.calls == [] and pairs.read_bytes() == (whole / "pairs.jsonl").read_bytes()


def test_rerun_with_other_settings_or_a_corrupt_file_is_an_error(synth_dir, tmp_path):
    path, records = _records(synth_dir, tmp_path, 2)
    generate.generate(_cfg(path, synth_dir, tmp_path / "out"), Scripted(records))
    with pytest.raises(ValueError, match="--seed 0 -> 1"):
        generate.generate(_cfg(path, synth_dir, tmp_path / "out", seed=1), Scripted(records))
    cand = tmp_path / "out" / "candidates.jsonl"
    cand.write_text("{oops\n" + cand.read_text())
    with pytest.raises(data.DataError, match=r"candidates.jsonl:1: invalid JSON"):
        generate.generate(_cfg(path, synth_dir, tmp_path / "out"), Scripted(records))


def test_generated_pairs_train_with_dpo(synth_dir, tmp_path):
    """Scripted policy (the random tiny model writes no parseable box): real records, the real rule
    scorer and filter, then `visrl.dpo_train` stage 2 on the pairs.jsonl."""
    import visrl

    path, records = _records(synth_dir, tmp_path, 8, drop_boxes={3})
    out = tmp_path / "gen"
    summary = generate.generate(_cfg(path, synth_dir, out), Scripted(records))
    lines = _read_lines(out / "candidates.jsonl")
    pairs = data.read_pairs(out / "pairs.jsonl", image_root=synth_dir)
    assert len(pairs) == summary["pairs_kept"] >= 2
    for line in lines:
        if line["pair"] is None:
            continue
        win, lose = line["candidates"][line["chosen"]], line["candidates"][line["rejected"]]
        scores = [c["answer_score"] for c in line["candidates"] if c["dropped"] is None]
        assert win["answer_score"] == max(scores) >= 0.8 and win["crop_score"] >= 0.8
        assert lose["answer_score"] == min(scores) <= 0.2 and lose["crop_score"] <= 0.2
        assert (line["pair"]["chosen_box"], line["pair"]["rejected_answer"]) == (win["box_text"], lose["answer"])
    with_gt = [ln for ln in lines if ln["pair"] and ln["gt_box"]]
    assert summary["chosen_acc@0.5"] == sum(
        chat.iou(ln["candidates"][ln["chosen"]]["box"], ln["gt_box"]) > 0.5 for ln in with_gt) / len(with_gt)
    # upstream's joint table (data_gen/eval/statistic_bbox.py l.89-96: TP_TN, TP_FN, FP_FN, FP_TN over the pairs)
    right = lambda ln, key: chat.iou(ln["candidates"][ln[key]]["box"], ln["gt_box"]) > 0.5  # noqa: E731
    table = summary["box_table"]
    assert list(table) == ["chosen right, rejected right", "chosen right, rejected wrong",
                           "chosen wrong, rejected wrong", "chosen wrong, rejected right"]
    assert table["chosen right, rejected wrong"] == sum(
        right(ln, "chosen") and not right(ln, "rejected") for ln in with_gt) / len(with_gt)
    assert sum(table.values()) == pytest.approx(1.0)
    assert json.loads((out / "summary.json").read_text())["pairs_kept"] == len(pairs)

    # no --image-root: the pair file records the root its image paths are relative to
    visrl.train(dpo.DPOConfig(grad_accum=1, data=str(out / "pairs.jsonl"), stage=2, max_steps=1, batch_size=2,
                                    out=str(tmp_path / "dpo")))
    (row,) = _read_lines(tmp_path / "dpo" / "metrics.jsonl")
    assert row["step"] == 1 and row["loss"] == pytest.approx(0.6931, abs=1e-3)  # ln 2 at the reference


# --------------------------------------------------------------------------------------------
# the real tiny model


@pytest.fixture(scope="module")
def tiny_sampler(tiny_path):
    return generate.LocalSampler(generate.GenerateConfig(model=str(tiny_path), batch_size=4))


class Killing:
    def __init__(self, inner, kill_at):
        self.inner, self.kill_at, self.calls = inner, kill_at, 0
        self.processor = inner.processor

    def __call__(self, prompts, sampling, seed):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        return self.inner(prompts, sampling, seed)


def test_tiny_model_run_counts_failures_and_resumes_exactly(tiny_sampler, tiny_path, synth_dir, tmp_path):
    cfg = dict(data=str(synth_dir / "val.jsonl"), model=str(tiny_path), limit=5, attempts=1, chunk=2,
               max_new_tokens=12, batch_size=4)
    summary = generate.generate(generate.GenerateConfig(out=str(tmp_path / "whole"), **cfg), tiny_sampler)
    lines = _read_lines(tmp_path / "whole" / "candidates.jsonl")
    assert [ln["index"] for ln in lines] == list(range(5))
    records = data.read_records(synth_dir / "val.jsonl")
    failures = sum(chat.text_to_box(c["box_reply"], records[ln["index"]].width, records[ln["index"]].height,
                                    strict=True) is None for ln in lines for c in ln["candidates"])
    assert summary["candidates"] == 10 and summary["box_parse_failures"] == failures
    decoding = json.loads((tmp_path / "whole" / "config.json").read_text())["decoding"]  # model.decoding's, as run
    assert decoding["sampled"]["temperature"] == 2.0 and decoding["sampled"]["repetition_penalty"] == 1.0
    assert decoding["greedy"]["do_sample"] is False and decoding["sampled"]["eos_token_id"][0] == "<|im_end|>"
    assert len({c["box_reply"] for ln in lines for c in ln["candidates"]}) > 5  # really sampled
    assert summary["pairs_kept"] == len((tmp_path / "whole" / "pairs.jsonl").read_text().splitlines())

    with pytest.raises(KeyboardInterrupt):  # killed in the second or third chunk ...
        generate.generate(generate.GenerateConfig(out=str(tmp_path / "cut"), **cfg), Killing(tiny_sampler, 3))
    cand = tmp_path / "cut" / "candidates.jsonl"
    assert cand.read_bytes().count(b"\n") in (2, 4)
    cand.write_bytes(cand.read_bytes()[:-30])  # ... in the middle of writing a chunk's last line
    generate.generate(generate.GenerateConfig(out=str(tmp_path / "cut"), **cfg), tiny_sampler)
    assert (tmp_path / "cut" / "candidates.jsonl").read_bytes() == (tmp_path / "whole" / "candidates.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------
# the judge (and the policy) behind an OpenAI-compatible HTTP server


def _serve(handler_fn):
    """A small OpenAI-format server on 127.0.0.1 in a thread: handler_fn(body) -> reply text."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body))
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": handler_fn(body)}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread, requests


def test_judge_scorer_over_http(synth_dir, tmp_path):
    path, records = _records(synth_dir, tmp_path, 3)
    by_question = {r.question: r for r in records}
    gt_crops = {r.question: data.load_image(r).crop(chat.crop_window(r.box, r.width, r.height)) for r in records}

    def same_crop(image, target):  # box text keeps 3 decimals: the parsed box may be a pixel off on a 1344 px page
        if abs(image.width - target.width) > 2 or abs(image.height - target.height) > 2:
            return False
        a = np.asarray(image.convert("RGB").resize((16, 16), Image.BOX), np.float32)
        return float(np.abs(a - np.asarray(target.convert("RGB").resize((16, 16), Image.BOX), np.float32)).mean()) < 8

    def find(text):
        return next(r for q, r in by_question.items() if q in text)

    def reply(body):
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        images = [_decode(p) for p in parts if p["type"] == "image_url"]
        r = find(text)
        if text.endswith(chat.VISRL_INSTRUCTION):  # policy, box step (VisRL's instruction): always the true box
            return chat.box_to_text(r.box, r.width, r.height)
        on_target = same_crop(images[-1], gt_crops[r.question])
        if chat.VISRL_INSTRUCTION in text:  # policy, answer step: right only on the true crop
            return r.answer if on_target else "not sure"
        if "proofreading" in text:
            model_answer = re.search(r"Model's answer: (.*)\n", text).group(1)
            return '```json\n{"score": 1.0}\n```' if model_answer == r.answer else '{"score": 0}'
        if r.question.startswith("Q1:"):
            return "I cannot tell."  # unparseable: these candidates are dropped and counted
        return '{"score": 0.9}' if on_target else "score: 0.1"

    server, thread, requests = _serve(reply)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = _cfg(path, synth_dir, tmp_path / "out", attempts=2, scorer="judge", endpoint=url, judge_endpoint=url,
                   judge_model="judge", endpoint_model="policy", workers=4, retries=0, timeout=10)
        summary = generate.generate(cfg)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()
    # every sampled box is the true box; every diversity box is replaced by one elsewhere
    assert summary["candidates"] == summary["candidates_scored"] + 4 == 12
    assert summary["diversity_replaced"] == 6
    assert summary["judge_parse_failures"] == 4  # Q1's 4 crop replies
    assert summary["pairs_kept"] == 2 and summary["chosen_acc@0.5"] == 1.0 and summary["rejected_acc@0.5"] == 0.0
    assert summary["crop_score_source"] == {"judge": 3}
    pairs = _read_lines(tmp_path / "out" / "pairs.jsonl")
    assert [p["chosen_answer"] for p in pairs] == [records[0].answer, records[2].answer]
    assert all(p["rejected_answer"] == "not sure" for p in pairs)
    judge_calls = [b for _, b in requests if b["model"] == "judge"]
    policy_calls = [b for _, b in requests if b["model"] == "policy"]
    assert len(judge_calls) == 2 * 12 and len(policy_calls) == 12 + 12
    assert all(b["temperature"] == 0.0 for b in judge_calls)
    assert all(b["temperature"] == 2.0 and b["top_p"] == 0.7 and b["top_k"] == 50 for b in policy_calls)
    assert all(path == "/v1/chat/completions" for path, _ in requests)


def test_unreachable_judge_stops_the_run_and_keeps_nothing_half_done(synth_dir, tmp_path):
    path, records = _records(synth_dir, tmp_path, 2)
    server, thread, _ = _serve(lambda body: "")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    cfg = _cfg(path, synth_dir, tmp_path / "out", scorer="judge", judge_endpoint=url, retries=0, timeout=5)
    with pytest.raises(endpoint.EndpointError):
        generate.generate(cfg, Scripted(records))
    assert (tmp_path / "out" / "candidates.jsonl").read_text() == ""
    with pytest.raises(ValueError, match="--judge-endpoint"):
        generate.generate(_cfg(path, synth_dir, tmp_path / "out2", scorer="judge"), Scripted(records))


def test_a_run_that_keeps_no_pair_says_why_and_exits_non_zero(synth_dir, tmp_path, monkeypatch, capsys):
    """The random tiny model writes no parseable box: nothing to pair. The command says so and fails."""
    out = tmp_path / "gen"
    monkeypatch.setattr("sys.argv", ["generate.py", "--data", str(synth_dir), "--limit", "2", "--attempts", "1",
                                     "--max-new-tokens", "8", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        generate.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "train on them with" not in err
    message = err[err.index("error: "):]
    summary = json.loads((out / "summary.json").read_text())  # the work done is kept, and the counts say why
    assert summary["pairs_kept"] == 0 and summary["questions"] == 2
    assert "no preference pair kept from 2 questions" in message
    assert f"{summary['box_parse_failures']} of {summary['candidates']} candidates had a box that did not parse" in message
    assert "--temperature" in message


def test_each_file_kind_is_named_when_given_where_another_is_wanted(synth_dir, tmp_path):
    import evaluate
    import visrl

    path, records = _records(synth_dir, tmp_path, 4)
    out = tmp_path / "gen"
    generate.generate(_cfg(path, synth_dir, out, attempts=1), Scripted(records))
    with pytest.raises(data.DataError, match="this is a pairs file .*train on it with `visrl.py dpo"):
        visrl.train(visrl.SFTConfig(grad_accum=1, data=str(out / "pairs.jsonl"), out=str(tmp_path / "sft"), max_steps=1))
    with pytest.raises(data.DataError, match="candidates log: its pairs are in pairs.jsonl beside it"):
        data.read_pairs(out / "candidates.jsonl")
    with pytest.raises(data.DataError, match="this is a records file .*a pairs file is wanted here"):
        data.read_pairs(path, image_root=synth_dir)
    with pytest.raises(data.DataError, match="this is a pairs file"):
        evaluate.evaluate(evaluate.EvalConfig(predictions=str(out / "pairs.jsonl"), out=str(tmp_path / "ev")))


def test_by_default_the_rule_scorer_reads_no_annotated_box(synth_dir, tmp_path):
    path, records = _records(synth_dir, tmp_path, 4)
    assert all(r.box is not None for r in records)
    summary = generate.generate(_cfg(path, synth_dir, tmp_path / "out", use_annotated_boxes=False), Scripted(records))
    assert summary["crop_score_source"] == {"answer from crop alone": 4}
    lines = _read_lines(tmp_path / "out" / "candidates.jsonl")
    assert all(c["crop_score"] == generate.rule_answer_score(c["crop_answer"], line["answers"])
               for line in lines for c in line["candidates"] if c["dropped"] is None)
    assert generate.GenerateConfig().use_annotated_boxes is False


def test_a_resumed_run_gives_older_pairs_their_image_root(synth_dir, tmp_path):
    path, records = _records(synth_dir, tmp_path, 4)
    out = tmp_path / "gen"
    generate.generate(_cfg(path, synth_dir, out), Scripted(records))
    lines = _read_lines(out / "candidates.jsonl")
    for line in lines:  # as a run from before pair files recorded their root wrote them
        if line["pair"]:
            line["pair"].pop("image_root")
    (out / "candidates.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    generate.generate(_cfg(path, synth_dir, out), Scripted(records))  # the same settings: resumes, nothing to do
    pairs = data.read_pairs(out / "pairs.jsonl")  # no image_root given: each line names its own
    assert len(pairs) == sum(line["pair"] is not None for line in lines) > 0
    assert all(p.record.image.startswith(str(synth_dir.resolve())) for p in pairs)


@pytest.mark.parametrize("pair_box_text", ["rewrite", "as-written"])
def test_pair_box_texts_are_rewritten_with_3_decimals_as_upstream(synth_dir, tmp_path, pair_box_text):
    path, records = _records(synth_dir, tmp_path, 1)
    r = records[0]
    good = chat.box_to_text(r.box, r.width, r.height)
    loose = " " + good.replace(", ", ",").replace("]", "0]") + "\n"  # the same numbers, written loosely (strict JSON)
    # the diversity box: a far corner, so it is not replaced and scores no overlap
    far = (0.0, 0.0, 40.0, 40.0) if r.box[0] > 100 and r.box[1] > 100 else (r.width - 40.0, r.height - 40.0, r.width, r.height)

    def sampler(prompts, sampling, seed):
        kinds = [_prompt_kind(m)[0] for m, _ in prompts]
        if kinds[0] == "focus":
            return [loose, chat.box_to_text(far, r.width, r.height)]
        return [r.answer, "wrong answer"]  # (a) answers right on its crop, (b) wrong

    generate.generate(_cfg(path, synth_dir, tmp_path / "out", attempts=1, pair_box_text=pair_box_text), sampler)
    (pair,) = data.read_pairs(tmp_path / "out" / "pairs.jsonl")
    assert pair.chosen_box == (good if pair_box_text == "rewrite" else loose)
    assert pair.rejected_box == chat.box_to_text(far, r.width, r.height)
    assert generate.GenerateConfig().pair_box_text == "rewrite"
