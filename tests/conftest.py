"""Shared fixtures: one tiny checkpoint per architecture and a small synthetic set per test session."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session", autouse=True)
def visrl_cache(tmp_path_factory):
    """Built-in assets go to a temporary cache, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("visrl-cache")
    os.environ["VISRL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_path(visrl_cache):
    import model

    return model.resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_qwen2_path(visrl_cache):
    import model

    return model.resolve_model_path("tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen3_path(visrl_cache):
    import model

    return model.resolve_model_path("tiny-qwen3-vl")


@pytest.fixture(scope="session")
def tiny_qwen35_path(visrl_cache):
    import model

    return model.resolve_model_path("tiny-qwen3.5")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    import synth

    root = tmp_path_factory.mktemp("synth")
    synth.make_synth(root, n_train=48, n_val=8, n_test=8, seed=0)
    return root


def write_pairs(records, path, seed=0):
    """Hand-made preference pairs from annotated records: the true box and answer are chosen; a
    random box elsewhere and another pattern are rejected."""
    import json
    import random

    import chat
    import data
    import synth

    rng = random.Random(seed)
    with open(path, "w") as f:
        for r in records:
            wrong = rng.choice([p for p in synth.SYNTH_PATTERNS if p != r.answer])
            pair = data.Pair(r, chat.box_to_text(r.box, r.width, r.height),
                             chat.box_to_text(chat.random_box(r.width, r.height, rng), r.width, r.height),
                             r.answer, wrong)
            f.write(json.dumps(data.pair_json(pair, path.parent)) + "\n")
    return path


@pytest.fixture(scope="session")
def pairs_file(synth_dir):
    import data

    return write_pairs(data.read_records(synth_dir / "train.jsonl")[:16], synth_dir / "pairs.jsonl")


# --------------------------------------------------------------------------------------------
# A Visual-CoT release in the upstream layout (benchmark/<name>.json + benchmark_det/<name>.jsonl), for the
# benchmark readers (test_viscot.py) and runs on it (test_evaluate.py).


def _conv(qid, image, box, question, box_text, answer):
    return {"dataset": "docvqa", "split": "val", "question_id": qid, "image": [image, f"{image}###{box}"],
            "conversations": [
                {"from": "human", "value": f"<image>\n{question} Please provide the bounding box coordinate of the "
                                           "region that can help you answer the question better."},
                {"from": "gpt", "value": box_text}, {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": answer}]}


def _det(qid, image, box, question, width, height):
    return {"img_path": image, "expression": question, "bbox": box, "height": height, "width": width, "question_id": qid}


@pytest.fixture()
def release(tmp_path):
    """A two-set release: docvqa (3 items, one with the upstream inverted box) and gqa (1 item)."""
    import json

    from PIL import Image

    (tmp_path / "cot" / "docvqa").mkdir(parents=True)
    (tmp_path / "cot" / "gqa").mkdir(parents=True)
    for name, size in (("docvqa/a.png", (300, 200)), ("docvqa/b.png", (100, 80)), ("docvqa/c.png", (120, 160)),
                       ("gqa/d.png", (240, 240))):
        Image.new("RGB", size, (200, 200, 200)).save(tmp_path / "cot" / name)
    convs = [_conv(1, "cot/docvqa/a.png", "[30, 40, 90, 100]", "What is the date?", "[0.100, 0.300, 0.300, 0.500]", "May 5"),
             _conv(491, "cot/docvqa/b.png", "[60, 70, 80, 20]", "What is on the y axis?", "[0.600, 0.800, 0.800, 0.300]",
                   "% change"),
             _conv(7, "cot/docvqa/c.png", "[10, 20, 51, 60]", "Who signed?", "[0.188, 0.125, 0.444, 0.375]", "J. Doe")]
    dets = [_det(7, "cot/docvqa/c.png", [10.5, 20.25, 50.75, 60.0], "Who signed?", 120, 160),  # not in the .json's order
            _det(1, "cot/docvqa/a.png", [30.0, 40.0, 90.0, 100.0], "What is the date?", 300, 200),
            _det(491, "cot/docvqa/b.png", [60.0, 70.0, 80.0, 20.0], "What is on the y axis?", 100, 80)]
    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark_det").mkdir()
    (tmp_path / "benchmark" / "docvqa.json").write_text(json.dumps(convs, indent=2))
    (tmp_path / "benchmark_det" / "docvqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dets))
    (tmp_path / "benchmark" / "gqa.json").write_text(json.dumps(
        [_conv(3, "cot/gqa/d.png", "[0, 0, 120, 120]", "Is it red?", "[0.000, 0.000, 0.500, 0.500]", "yes")]))
    (tmp_path / "benchmark_det" / "gqa.jsonl").write_text(
        json.dumps(_det(3, "cot/gqa/d.png", [0, 0, 120, 120], "Is it red?", 240, 240)) + "\n")
    return tmp_path


def write_rec_file(root):
    """A RefCOCO-style file in the upstream layout (two expressions about one 100x100 image)."""
    import json

    from PIL import Image

    Image.new("RGB", (100, 100)).save(root / "COCO_1.jpg")
    rec = root / "REC_refcoco_unc_val.jsonl"
    rec.write_text("".join(json.dumps({"img_path": "train2014/COCO_1.jpg", "expression": f"Left Dog {i}",
                                       "bbox": [25.0, 25.0, 75.0, 75.0], "height": 100, "width": 100, "sent_id": i}) + "\n"
                           for i in range(2)))
    return rec


# --------------------------------------------------------------------------------------------
# Entry points run as a user runs them, and the bytes of what a command must not touch.

ROOT = Path(__file__).resolve().parent.parent


def start_cli(*args, cwd=None):
    """Start `python <script> args...` (script relative to the repository root) as a user would."""
    import subprocess

    script, *rest = args
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, rest)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "VISRL_DEBUG": "0"})


def finish_cli(process, timeout=600):
    """(returncode, stdout, stderr) of a started command."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def run_cli(*args, cwd=None, timeout=600):
    return finish_cli(start_cli(*args, cwd=cwd), timeout)


def snapshot(*roots):
    """{path: bytes} of every file under roots (a file root is itself): compare before and after a command."""
    files = {}
    for root in map(Path, roots):
        for path in ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())):
            files[str(path)] = path.read_bytes()
    return files


def assert_one_line_error(returncode, stderr, *fragments):
    """An expected error: exit code 2, `error: ...` once, every fragment in it, no traceback."""
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("error: ") == 1, stderr[-3000:]
    message = stderr[stderr.index("error: "):]
    for fragment in fragments:
        assert fragment in message, (fragment, message[:2000])


def plain_token_logps(net, processor, sample):
    """Independent reference for the fused path: one sample through a plain HF forward (pixel values in,
    full [L, V] logits out), the log-softmax of each supervised token, [n_supervised]."""
    import torch

    import chat
    import data

    image = data.load_image(sample.record)
    # the pixel cap (chat.fit_image, tested against upstream's rule in test_chat.py) comes before the processor
    pixels = processor.image_processor(images=[chat.fit_image(image if w is None else image.crop(w),
                                                              processor.image_processor) for w in sample.images],
                                       return_tensors="pt")
    input_ids = torch.tensor([sample.input_ids])
    logits = net(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 mm_token_type_ids=(input_ids == net.config.image_token_id).int(), **pixels).logits[0, :-1]
    targets = torch.tensor(sample.labels[1:])
    mask = targets != chat.IGNORE_INDEX
    return torch.log_softmax(logits[mask].float(), -1).gather(1, targets[mask][:, None])[:, 0]
