"""The Visual-CoT benchmark protocol: the official detection scorer, the judge's prompt and reply parsing,
the benchmark readers, answer scores and the means over sets (the `release` fixture is in conftest.py: test_evaluate.py runs on it too)."""

import json
import warnings

import pytest
import torch

import chat
import data
import viscot
from conftest import write_rec_file

# --------------------------------------------------------------------------------------------
# Detection Acc@0.5 on hand-made boxes (expected values worked out by hand in the comments).


@pytest.mark.parametrize("text, gt, width, height, expected", [
    ("[0.0, 0.0, 0.5, 0.5]", [0, 0, 50, 50], 100, 100, True),      # IoU 1
    ("[0.0, 0.0, 0.5, 0.5]", [0, 0, 100, 50], 100, 100, False),    # 2500 / 5000 = 0.5 exactly: wrong (strict >)
    ("[0.0, 0.0, 0.51, 0.5]", [0, 0, 100, 50], 100, 100, True),    # 2550 / 5000 = 0.51
    ("[0.1, 0.3, 0.3, 0.5]", [20, 10, 60, 50], 200, 100, True),    # wide: gt moves down by (200-100)//2 = 50 -> IoU 1
    ("[0.1, 0.05, 0.3, 0.25]", [20, 10, 60, 50], 200, 100, False),  # the same box without the pad: IoU 0
    ("[0.5, 0.1, 0.6, 0.3]", [50, 30, 80, 90], 100, 300, True),    # tall: gt moves right by 100 -> [150, 30, 180, 90]
    ("[0.1, 0.3, 0.3, 0.5]", [20.4, 10.2, 60.6, 50.8], 200, 100, True),  # float gt (infographicsvqa), unrounded
    # 0.07 * 700 = 49.00000000000001: float64 IoU 0.5000000000000001 > 0.5, float32 (the official tensors) 0.5
    ("[0.000, 0.000, 0.070, 0.050]", [0, 0, 98, 35], 700, 700, False),
])
def test_official_acc_on_hand_made_boxes(text, gt, width, height, expected):
    assert viscot.box_correct(text, gt, width, height) is expected


def test_float32_iou_is_what_flips_the_threshold_case():
    pred, gt = [0.0, 0.0, 0.07 * 700, 0.05 * 700], [0, 0, 98, 35]
    assert chat.iou(pred, gt) > 0.5  # plain float64 would call it correct
    assert viscot.iou_float32(pred, gt) == 0.5
    # against torch float32, the official tensors, on assorted boxes (inverted, empty, NaN)
    boxes = [[0, 0, 10, 10], [5, 5, 15, 12.5], [10, 10, 0, 0], [3, 3, 3, 9], [float("nan"), 0, 4, 4], [1e-3, 2, 7.77, 9.1]]
    for a in boxes:
        for b in boxes:
            ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
            wh = (torch.minimum(ta[2:], tb[2:]) - torch.maximum(ta[:2], tb[:2])).clamp(min=0)
            inter = wh[0] * wh[1]
            ref = inter / ((ta[2] - ta[0]) * (ta[3] - ta[1]) + (tb[2] - tb[0]) * (tb[3] - tb[1]) - inter)
            got = viscot.iou_float32(a, b)
            assert (got != got and ref != ref) or got == ref.item(), (a, b, got, ref)


def test_square_gt_box_uses_floor_division_of_the_pad():
    assert viscot.square_gt_box([0, 0, 100, 100], 201, 100) == [0, 50, 100, 150]  # (201 - 100) // 2 = 50, not 50.5
    assert viscot.square_gt_box([0, 0, 10, 10], 100, 203) == [51, 0, 61, 10]
    assert viscot.square_gt_box([1, 2, 3, 4], 50, 50) == [1, 2, 3, 4]


@pytest.mark.parametrize("text, official, lenient", [
    ("[0.0, 0.0, 0.5, 0.5]", True, True),
    ("[0.0,0.0,0.5,0.5]", False, True),                           # no ', ' to split on: official fails
    ("[0.0, 0.0, 0.5, 0.5] .", True, True),                        # ' .' is stripped
    ("[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]", True, True),    # two boxes: scored on the first
    ("The box is [0.0, 0.0, 0.5, 0.5]", False, True),              # leading words break float()
    ("no box here", False, False),
    ("[nan, 0.0, 0.5, 0.5]", False, False),                        # float('nan') parses; its IoU is NaN: wrong
    ("[0.5, 0.5, 0.0, 0.0]", False, False),                        # inverted prediction
    ("", False, False),
])
def test_official_and_lenient_parsers(text, official, lenient):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN and inverted boxes must not even warn
        scores = viscot.detection_scores(text, [0, 0, 50, 50], 100, 100)
    assert (scores["official"], scores["lenient"]) == (official, lenient)


def test_degenerate_ground_truth_never_scores():
    gt = [464.0, 951.0, 510.0, 457.0]  # docvqa question 491 in the release: y2 < y1
    for text in ("[0.211, 0.558, 0.232, 0.268]", "[0.211, 0.268, 0.232, 0.558]", "[0.0, 0.0, 1.0, 1.0]"):
        assert not viscot.box_correct(text, gt, 2200, 1704)


# --------------------------------------------------------------------------------------------
# The judge's reply parsing.


@pytest.mark.parametrize("reply, score", [
    ("score: 0.8", 0.8),
    ("The answer is close. Score: 0.7", 0.7),        # lower-cased first
    ("score: 0.5.", 0.5),                              # upstream's float() crashes here
    ("score: 1.5", 1.0),                               # clipped
    ("score: 0.2 ... on reflection score: 0.9", 0.0),  # two matches: 0
    ("I would give it 0.9", 0.0),                      # no 'score'
    ("score:0.9", 0.0),                                # 'score' but no 'score: x' match
    ("score: .", 0.0),
    ("", 0.0),
    (None, 0.0),                                       # a failed call
])
def test_parse_judge_score(reply, score):
    assert viscot.parse_judge_score(reply) == pytest.approx(score)


def test_judge_prompt_is_upstreams():
    system, user = viscot.judge_messages("<image>\nWhat is it?", "a cat", "cat")
    assert system["content"].startswith("\nYou are responsible for proofreading the answers, you need to give a score")
    assert system["content"].endswith('Please output the score in the form "score: <score>". The evaluation criteria '
                                      "require that the closer the model's answer is to the standard answer, the higher "
                                      "the score.\n")
    assert user["content"] == "\nquestion: <image>\nWhat is it?\nstandard answer: a cat\nmodel's answer: cat\n"


# --------------------------------------------------------------------------------------------
# Benchmark readers on files in the upstream layout: benchmark/<name>.json + benchmark_det/<name>.jsonl.
# The `release` fixture (conftest.py) is a two-set release in that layout.


def test_benchmark_reader_on_the_upstream_layout(release):
    items = viscot.read_benchmark(release, sets=("docvqa", "gqa"))
    assert [(it.set, it.id) for it in items] == [("docvqa", "1"), ("docvqa", "491"), ("docvqa", "7"), ("gqa", "3")]
    first, inverted, floaty = items[:3]
    assert first.question == "What is the date?" and first.answers == ["May 5"] and first.kind == "vqa"
    assert first.judge_question == "<image>\nWhat is the date?"  # the official judge's question
    assert first.image == str(release / "cot" / "docvqa" / "a.png") and (first.width, first.height) == (300, 200)
    assert inverted.degenerate and inverted.gt_box == [60.0, 70.0, 80.0, 20.0] and not first.degenerate
    assert floaty.gt_box == [10.5, 20.25, 50.75, 60.0]  # benchmark_det's unrounded pixel box, not the '###' one
    assert viscot.read_items(str(release), sets=("docvqa",), limit=2) == items[:2]
    # one file alone: its benchmark_det twin joins it; images relative to the release root
    assert viscot.read_items(str(release / "benchmark" / "docvqa.json")) == items[:3]
    det_only = viscot.read_benchmark_set(None, release / "benchmark_det" / "docvqa.jsonl", "docvqa", release)
    assert [it.kind for it in det_only] == ["det"] * 3 and det_only[0].answers == []
    with pytest.raises(data.DataError, match="pass --sets"):
        viscot.read_benchmark(release)  # the 11 scored sets by default; 9 are missing here


def test_benchmark_reader_reports_file_line_and_field(release):
    det = release / "benchmark_det" / "docvqa.jsonl"
    lines = det.read_text().splitlines()
    lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "bbox"})
    lines[2] = lines[2].replace('"width": 100', '"width": "wide"')
    det.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError) as err:
        viscot.read_benchmark(release, sets=("docvqa",))
    message = str(err.value)
    assert f"{det}:2: field 'bbox': missing" in message
    assert f"{det}:3: field 'width': expected an integer" in message
    items = viscot.read_benchmark(release, sets=("docvqa",), skip_bad=True)
    assert [it.id for it in items] == ["7"]  # the two bad lines and the items they pair with are skipped


def test_files_without_question_ids_pair_by_position(release):
    conv, det = release / "benchmark" / "docvqa.json", release / "benchmark_det" / "docvqa.jsonl"
    convs = json.loads(conv.read_text())
    dets = [json.loads(line) for line in det.read_text().splitlines()]
    dets = [dets[1], dets[2], dets[0]]  # into the .json's order (1, 491, 7), as upstream's files are
    for obj in convs + dets:
        del obj["question_id"]
    dets[1]["bbox"] = "oops"
    conv.write_text(json.dumps(convs))
    det.write_text("".join(json.dumps(d) + "\n" for d in dets))
    items = viscot.read_benchmark(release, sets=("docvqa",), skip_bad=True)
    # the bad second line drops its pair only: the third .json item still meets the third .jsonl line
    assert [(it.question, it.gt_box) for it in items] == [("What is the date?", [30.0, 40.0, 90.0, 100.0]),
                                                          ("Who signed?", [10.5, 20.25, 50.75, 60.0])]


def test_rec_file_is_box_only(tmp_path):
    rec = write_rec_file(tmp_path)
    items = viscot.read_items(str(rec))  # upstream joins the file name to the image folder: so do we when needed
    assert [(it.set, it.id, it.kind, it.answers) for it in items] == [
        ("REC_refcoco_unc_val", "0", "rec", []), ("REC_refcoco_unc_val", "1", "rec", [])]
    # the locate prompt these items get is tested with evaluate.focus_prompt in test_evaluate.py


# --------------------------------------------------------------------------------------------
# Offline answer scores on known pairs.


def test_anls_on_known_pairs():
    assert chat.levenshtein("kitten", "sitting") == 3
    assert chat.anls("hello", "hallo") == pytest.approx(0.8)              # 1 edit / 5
    assert chat.anls("kitten", "sitting") == pytest.approx(1 - 3 / 7)     # NL 0.43 < 0.5
    assert chat.anls("abc", "abd") == pytest.approx(2 / 3)
    assert chat.anls("ab", "ac") == 0.0                                    # NL exactly 0.5: not < 0.5
    assert chat.anls("abc", "xyz") == 0.0
    assert chat.anls("  Hello   World ", "hello world") == 1.0            # case and spacing ignored
    assert chat.anls("x", ["nope", "X"]) == 1.0                            # best over the references
    assert chat.anls("", "") == 1.0 and chat.anls("", "a") == 0.0


def test_exact_match_and_containment():
    assert chat.exact_match("The Cat.", "cat") == 1.0 and chat.exact_match("cats", "cat") == 0.0
    assert chat.containment("it is a red car", ["blue", "red car"]) == 1.0
    assert chat.containment("scared", "red") == 0.0  # whole words only
    assert chat.answer_scores("4", ["4"]) == {"exact_match": 1.0, "anls": 1.0, "containment": 1.0}


# --------------------------------------------------------------------------------------------
# Scoring: how the official scorer's verdicts add up per set and over sets.


def test_degenerate_ground_truth_is_counted():
    gt = [464.0, 951.0, 510.0, 457.0]  # docvqa question 491 in the release: y2 < y1
    row = {"set": "docvqa", "id": "491", "answers": ["x"], "answer": "x", "gt_box": gt, "width": 2200, "height": 1704,
           "box_text": "[0.0, 0.0, 1.0, 1.0]", "degenerate": True}
    ok = {**row, "id": "1", "gt_box": [0, 0, 2200, 1704], "degenerate": False,
          "box_text": "[0.000, 0.113, 1.000, 0.887]"}  # wide image: the full-image box in square form
    det = viscot.summarize([row, ok])["sets"]["docvqa"]["detection"]
    assert (det["n"], det["correct"], det["acc"], det["degenerate_gt"]) == (2, 1, 50.0, 1)


def test_means_official_drops_sets_at_exactly_zero_plain_keeps_them():
    def rows(name, n_right, n):
        return [{"set": name, "id": str(i), "answers": [], "gt_box": [0, 0, 50, 50], "width": 100, "height": 100,
                 "box_text": "[0.0, 0.0, 0.5, 0.5]" if i < n_right else "[0.5, 0.5, 1.0, 1.0]"} for i in range(n)]
    results = viscot.summarize(rows("a", 1, 2) + rows("b", 0, 3) + rows("c", 3, 4) + [
        {"set": "c", "id": "x", "answers": [], "gt_box": [0, 0, 50, 50], "width": 100, "height": 100,
         "box_text": "[0.0,0.0,0.5,0.5]"}])  # lenient-only correct
    det = results["means"]["detection"]
    assert results["sets"]["c"]["detection"]["acc"] == 60.0 and results["sets"]["c"]["detection"]["acc_lenient"] == 80.0
    assert results["sets"]["c"]["detection"]["parsers_disagree"] == 1
    assert det["official_mean"] == pytest.approx((50 + 60) / 2) and det["dropped_zero_sets"] == ["b"]
    assert det["plain_mean"] == pytest.approx((50 + 0 + 60) / 3)
    unscored = viscot.summarize(rows("a", 1, 2) + rows("visual7w", 2, 2))
    assert unscored["means"]["detection"]["plain_mean"] == 50.0 and "visual7w" in unscored["sets"]
    lenient = viscot.summarize(rows("c", 3, 4), parser="lenient")["sets"]["c"]["detection"]
    assert lenient["acc"] == 75.0 and lenient["parser"] == "lenient"
