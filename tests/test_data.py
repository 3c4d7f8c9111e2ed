"""Tests for data.py: readers, validation with file:line errors, paths inside roots."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chat  # noqa: E402
import data  # noqa: E402
from data import DataError  # noqa: E402

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
        {"from": "human", "value": "<image>\nWhat colour is it? " + chat.FOCUS_INSTRUCTION},
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

def upstream_pair(image="a.png", question="What colour is it?", **overrides):
    """One item of upstream VisRL's pair file, written from its format (data_gen/eval/convert_statistic_format.py):
    the human prompt is <image>, the question and the VisRL instruction; box and answer turns as gpt turns."""
    item = {"images": [image],
            "conversations": [{"from": "human", "value": "<image>\n" + question + " Please first provide the bounding "
                               "box coordinate of the region, then refer to the corresponding sub-image to answer the "
                               "question better."}],
            "chosen_step": {"from": "gpt", "value": "[0.016, 0.042, 0.156, 0.417]"},
            "rejected_step": {"from": "gpt", "value": "[0.500, 0.500, 0.900, 0.900]"},
            "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"}}
    return {**item, **overrides}


def test_read_upstream_pair_files(tmp_path):
    _png(tmp_path / "a.png")
    f = tmp_path / "dpo.json"
    f.write_text(json.dumps([upstream_pair(), upstream_pair(question="Is it round?")], indent=4))  # upstream's layout
    pairs = data.read_pairs(f)
    assert [p.record.question for p in pairs] == ["What colour is it?", "Is it round?"]
    p = pairs[0]
    assert (p.chosen_box, p.rejected_box, p.chosen_answer, p.rejected_answer, p.box_form) == (
        "[0.016, 0.042, 0.156, 0.417]", "[0.500, 0.500, 0.900, 0.900]", "red", "blue", "square")
    assert p.record.image == str((tmp_path / "a.png").resolve()) and (p.record.width, p.record.height) == (64, 48)
    assert p.record.source == f"{f}:2" and pairs[1].record.source.startswith(f"{f}:")
    assert data.file_kind(upstream_pair()) == "pairs"
    with pytest.raises(DataError, match=r"dpo\.json:2: field 'rejected_step'"):
        f.write_text(json.dumps([upstream_pair(rejected_step={"from": "gpt", "value": ""})], indent=4))
        data.read_pairs(f)
    with pytest.raises(DataError, match="this is a pairs file"):  # and a records reader names what it is
        data.read_records(f)


UPSTREAM_FOCUS = "Please provide the bounding box coordinate of the region that can help you answer the question better."
UPSTREAM_VISRL = ("Please first provide the bounding box coordinate of the region, then refer to the corresponding "
                  "sub-image to answer the question better.")


def sft_round_items(question="What colour is it?"):
    """One item of each of upstream's SFT round files, written from their format (preprocess/sft_format_round1.py and
    sft_format_round2.py cut Visual-CoT's 4-turn items; LLaMA-Factory ShareGPT, `image` + `conversations`)."""
    round1 = {"image": ["a.png"], "question_id": 7, "dataset": "gqa", "conversations": [
        {"from": "human", "value": "<image>\n" + question + " " + UPSTREAM_FOCUS},
        {"from": "gpt", "value": "[0.016, 0.042, 0.156, 0.417]"}]}
    round2 = {"image": ["a.png", "a_1_2_10_20.jpg"], "question_id": 7, "dataset": "gqa", "conversations": [
        {"from": "human", "value": "<image>\n" + question + " " + UPSTREAM_VISRL + "\n<image>"},
        {"from": "gpt", "value": "red"}]}
    return round1, round2


def test_read_upstream_sft_round_files(tmp_path):
    _png(tmp_path / "a.png")
    f = tmp_path / "sft.json"
    f.write_text(json.dumps(list(sft_round_items()), indent=4))  # upstream's demo_sft_data holds both rounds
    r1, r2 = data.read_records(f)
    assert (r1.question, r1.steps, r1.box_text, r1.boxes, r1.dataset) == (
        "What colour is it?", ("focus",), "[0.016, 0.042, 0.156, 0.417]", [], "gqa")
    # round 2's crop file is named by its pixel box: the answer step alone, on that box
    assert (r2.question, r2.steps, r2.answers, r2.box, r2.box_text) == (
        "What colour is it?", ("answer",), ["red"], (1, 2, 10, 20), None)
    assert (r2.width, r2.height) == (64, 48) and r2.image == str((tmp_path / "a.png").resolve())
    round1, round2 = sft_round_items()
    for bad, field in ((dict(round2, image=["a.png", "a_crop.jpg"]), "image"),
                       (dict(round1, conversations=round1["conversations"][:1]), "conversations"),
                       (dict(round1, conversations=[round1["conversations"][0], {"from": "gpt", "value": "red"}]),
                        "conversations")):
        f.write_text(json.dumps([round1, bad], indent=4))
        with pytest.raises(DataError, match=rf"sft\.json:\d+: field '{field}'"):
            data.read_records(f)


def test_upstream_question_pool_is_items_10000_to_20000_of_each_subset():
    records = [data.Record(f"{name}{i}", "x.png", "q", ["a"], dataset=name)
               for name, n in (("gqa", 10_005), ("DocVQA", 20_500), ("flickr30k", 21_000)) for i in range(n)]
    records.insert(5, data.Record("late", "x.png", "q", ["a"], dataset="gqa"))  # file order within a subset counts
    pool = data.upstream_question_pool(records)
    assert [r.id for r in pool] == [f"gqa{i}" for i in range(9999, 10005)] + [f"flickr30k{i}" for i in range(10_000, 20_000)]


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
