"""Evaluation: runs and resume, the endpoint path, prediction rows, pictures (the protocol itself, detection
scorer, answer scores, means, judge and readers, is tested in test_viscot.py)."""

import base64
import dataclasses
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tyro
from PIL import Image

import chat
import data
import endpoint
import evaluate as ev
import runs
import viscot
from conftest import write_rec_file

# --------------------------------------------------------------------------------------------
# Runs. A fake generate_fn where the model does not matter; the tiny model where it does.


def _text(messages):
    return "".join(p["text"] for p in messages[0]["content"] if p["type"] == "text")


class FakeModel:
    """Replies by prompt type: a fixed box for focus prompts, a fixed answer otherwise; logs every prompt."""

    def __init__(self, box="[0.250, 0.250, 0.750, 0.750]", answer="4", fail_after=None):
        self.box, self.answer, self.fail_after, self.prompts = box, answer, fail_after, []

    def __call__(self, prompts):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.prompts += prompts
        return [self.box if chat.FOCUS_INSTRUCTION in _text(m) or "Locate the region" in _text(m) else self.answer
                for m, _ in prompts]


def _config(out, data_path, **kw):
    return ev.EvalConfig(data=str(data_path), out=str(out), pictures=2, **kw)


def test_cli_flags_parse():
    cfg = tyro.cli(ev.EvalConfig, args=[
        "--model", "m", "--adapter", "a", "--data", "d", "--image-root", "r", "--sets", "docvqa", "gqa", "--limit", "5",
        "--out", "o", "--box", "center", "--endpoint", "http://x", "--judge-endpoint", "http://j", "--predictions", "p",
        "--batch-size", "3", "--official-prompt", "--seed", "7", "--parser", "lenient"])
    assert (cfg.sets, cfg.limit, cfg.box, cfg.official_prompt, cfg.batch_size, cfg.seed, cfg.parser) == (
        ("docvqa", "gqa"), 5, "center", True, 3, 7, "lenient")


def test_rec_items_get_the_locate_prompt(tmp_path):
    rec = write_rec_file(tmp_path)
    items = viscot.read_items(str(rec))  # upstream joins the file name to the image folder: so do we when needed
    text = ev.focus_prompt(items[0])[0]["content"][1]["text"]
    assert text == "Locate the region this sentence describes: left dog 0. Please provide the bounding box coordinates."


def test_run_on_the_release_with_ablations(release, tmp_path):
    fake = FakeModel(box="[0.100, 0.300, 0.300, 0.500]", answer="may 5")  # item 1's true box in square form
    results = ev.evaluate(_config(tmp_path / "model", release, sets=("docvqa",), official_prompt=True), fake)
    det = results["sets"]["docvqa"]["detection"]
    assert (det["n"], det["correct"], det["degenerate_gt"]) == (3, 1, 1)
    assert any("ceiling 2/3" in n for n in results["notes"])
    focus_texts = [_text(m) for m, images in fake.prompts if len(images) == 1]
    assert focus_texts[0] == "what is the date?. " + chat.FOCUS_INSTRUCTION  # the official test-time form
    answer_prompts = [m for m, images in fake.prompts if len(images) == 2]  # and its 3-turn answer step
    assert answer_prompts[0] == chat.vcot_answer_messages("What is the date?", fake.box)
    rows = [json.loads(line) for line in (tmp_path / "model" / "predictions.jsonl").read_text().splitlines()]
    # and the benchmark's crop (Visual-CoT's >= 224 px window), not the training default
    assert rows[0]["crop"] == list(chat.crop_window(chat.text_to_box(fake.box, 300, 200), 300, 200, rule="vcot"))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["crop"] == "vcot"
    assert config["decoding"]["do_sample"] is False and config["decoding"]["repetition_penalty"] == 1.0  # as run
    assert results["sets"]["docvqa"]["answer"]["exact_match"] == pytest.approx(1 / 3)

    answers_only = FakeModel()
    gt = ev.evaluate(_config(tmp_path / "gt", release, sets=("docvqa",), box="gt"), answers_only)
    assert gt["sets"]["docvqa"]["detection"]["correct"] == 2  # every box but the inverted one
    assert [len(images) for _, images in answers_only.prompts] == [2, 2, 2]  # no focus step, [image, crop]
    assert "ablation" in " ".join(gt["notes"])
    direct = FakeModel()
    none = ev.evaluate(_config(tmp_path / "none", release, sets=("docvqa",), box="none"), direct)
    assert "detection" not in none["sets"]["docvqa"] and none["means"].get("detection") is None
    assert [_text(m) for m, _ in direct.prompts] == ["\nWhat is the date?", "\nWhat is on the y axis?", "\nWho signed?"]
    before = (tmp_path / "none" / "predictions.jsonl").read_bytes()
    with pytest.raises(data.UserError, match="--box.*pass --overwrite to replace it"):  # same --out, other settings
        ev.evaluate(_config(tmp_path / "none", release, sets=("docvqa",), box="center"), FakeModel())
    assert (tmp_path / "none" / "predictions.jsonl").read_bytes() == before
    center = ev.evaluate(_config(tmp_path / "none", release, sets=("docvqa",), box="center", overwrite=True), FakeModel())
    rows = [json.loads(line) for line in (tmp_path / "none" / "predictions.jsonl").read_text().splitlines()]
    assert [r["box_mode"] for r in rows] == ["center"] * 3 and "detection" in center["sets"]["docvqa"]


def test_interrupted_run_resumes_without_duplicates(synth_dir, tmp_path):
    cfg = _config(tmp_path, synth_dir / "test.jsonl", batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg, FakeModel(fail_after=4))  # dies in the second batch: the first is on disk
    path = tmp_path / "predictions.jsonl"
    assert len(path.read_text().splitlines()) == 2
    resumed = FakeModel()
    ev.evaluate(cfg, resumed)
    assert len(resumed.prompts) == 2 * 6  # focus + answer for the 6 items not done
    lines = path.read_text().splitlines()
    # a kill in the middle of a write leaves a cut-off last line: it is dropped and redone
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    again = FakeModel()
    ev.evaluate(cfg, again)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(again.prompts) == 2 * 3 and len(rows) == 8
    assert len({r["id"] for r in rows}) == 8 and path.read_text().splitlines()[:5] == lines[:5]


def test_tiny_model_run_writes_every_output_and_resumes(synth_dir, tiny_path, tmp_path):
    cfg = _config(tmp_path, synth_dir / "test.jsonl", model=str(tiny_path), max_new_tokens=6, limit=3)
    model_fn = ev.reply_function(cfg)
    seen = []

    def counting(prompts):
        seen.append(len(prompts))
        return model_fn(prompts)

    ev.evaluate(cfg, counting)
    first = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(first) == 3 and seen == [3, 3]  # one batch per step
    cfg.limit = None
    results = ev.evaluate(cfg, counting)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert seen[2:] == [5, 5] and lines[:3] == first and len(lines) == 8
    rows = [json.loads(line) for line in lines]
    assert len({r["id"] for r in rows}) == 8 and all(isinstance(r["box_text"], str) and r["crop"] for r in rows)
    assert results["sets"]["synth"]["items"] == 8 and results["sets"]["synth"]["detection"]["n"] == 8
    assert json.loads((tmp_path / "results.json").read_text())["sets"] == results["sets"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| synth | 8 |" in markdown and "mean, official" in markdown and "mean, plain" in markdown
    pictures = sorted((tmp_path / "pictures").glob("*.png"))
    assert len(pictures) == 2
    # re-scoring the predictions through the real CLI (no model) gives the same numbers
    rescore = tmp_path / "rescore"
    subprocess.run([sys.executable, str(Path(ev.__file__)), "--predictions", str(tmp_path / "predictions.jsonl"),
                    "--out", str(rescore), "--pictures", "0"], check=True, capture_output=True, timeout=120)
    assert json.loads((rescore / "results.json").read_text())["sets"] == results["sets"]


# --------------------------------------------------------------------------------------------
# The endpoint path over real HTTP: a tiny OpenAI-format server on 127.0.0.1.


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.path, body))
            status, reply = self.server.respond(body)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode() \
            if status == 200 else b'{"error": "boom"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.lock = [], threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _images(body):
    return [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url"]


def test_endpoint_and_judge_over_http(server, synth_dir, tmp_path):
    records = data.read_records(synth_dir / "test.jsonl")[:3]
    judge_count = []

    def respond(body):
        if body["messages"][0]["role"] == "system":  # the judge, called one at a time (judge_workers=1)
            judge_count.append(1)
            if len(judge_count) in (1, 3, 4, 5):  # item 1 fails once (its retry succeeds), item 2 fails all 3 tries
                return 500, None
            return 200, "Close enough. Score: 0.5."
        text = body["messages"][0]["content"][-1]["text"] if len(_images(body)) == 1 else ""
        return 200, "[0.25, 0.25, 0.75, 0.75]" if chat.FOCUS_INSTRUCTION in text else "4"

    server.respond = respond
    url = f"http://127.0.0.1:{server.server_port}"
    cfg = _config(tmp_path, synth_dir / "test.jsonl", limit=3, endpoint=url, endpoint_model="served",
                  judge_endpoint=url + "/v1", judge_workers=1)
    results = ev.evaluate(cfg)
    model_calls = [b for p, b in server.requests if b["messages"][0]["role"] != "system"]
    judge_calls = [b for p, b in server.requests if b["messages"][0]["role"] == "system"]
    assert all(p == "/v1/chat/completions" for p, _ in server.requests)
    assert sorted(len(_images(b)) for b in model_calls) == [1, 1, 1, 2, 2, 2]  # focus [image], answer [image, crop]
    assert all(b["model"] == "served" and b["temperature"] == 0.0 for b in model_calls)
    assert all(_images(b)[0]["image_url"]["url"].startswith("data:image/png;base64,") for b in model_calls)
    # every page is sent capped as the in-process model sees it (upstream's 512 x 512 pixel cap), pixel for pixel
    capped = [chat.cap_image(data.load_image(r), runs.UPSTREAM_MAX_PIXELS).tobytes() for r in records]
    for b in model_calls:
        url = _images(b)[0]["image_url"]["url"]
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        assert sent.width * sent.height <= runs.UPSTREAM_MAX_PIXELS < 1344 * 1344 and sent.tobytes() in capped
    assert judge_calls[0]["messages"] == viscot.judge_messages(records[0].question, records[0].answer, "4")
    # the official judge request: its model, and no sampling fields (the server's defaults apply)
    assert all(set(b) == {"model", "messages"} and b["model"] == "gpt-3.5-turbo-1106" for b in judge_calls)
    assert len(judge_calls) == 1 + 1 + 3 + 1  # first item retried once, second item 3 failed tries, third once
    answer = results["sets"]["synth"]["answer"]
    assert answer["judge"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert answer["exact_match"] == pytest.approx(sum(r.answer == "4" for r in records) / 3)
    judged = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert [j["error"] is not None for j in judged] == [False, True, False]
    # rerun: predictions and judge scores are reused; only the failed judge call is tried again (and succeeds)
    server.requests.clear()
    assert ev.evaluate(cfg)["sets"]["synth"]["answer"]["judge"] == pytest.approx(0.5)
    assert len(server.requests) == 1 and server.requests[0][1]["messages"][0]["role"] == "system"
    # --judge-deterministic: temperature 0 and a token limit, for judge scores a rerun repeats
    server.requests.clear()
    (tmp_path / "judge.jsonl").unlink()
    ev.evaluate(dataclasses.replace(cfg, judge_deterministic=True, overwrite=False))
    judge_calls = [b for p, b in server.requests if b["messages"][0]["role"] == "system"]
    assert judge_calls and all(b["temperature"] == 0.0 and b["max_tokens"] == 256 for b in judge_calls)


def test_endpoint_rec_run_scores_boxes_only(server, tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "COCO_1.jpg")
    rec = tmp_path / "REC_refcoco_unc_val.jsonl"
    rec.write_text(json.dumps({"img_path": "COCO_1.jpg", "expression": "the dog", "bbox": [25, 25, 75, 75],
                               "height": 100, "width": 100, "sent_id": 1}) + "\n" +
                   json.dumps({"img_path": "COCO_1.jpg", "expression": "the cat", "bbox": [0, 0, 20, 20],
                               "height": 100, "width": 100, "sent_id": 2}) + "\n")
    server.respond = lambda body: (200, "[0.25, 0.25, 0.75, 0.75]")
    results = ev.evaluate(_config(tmp_path / "out", rec, endpoint=f"http://127.0.0.1:{server.server_port}"))
    assert len(server.requests) == 2  # no answer step
    assert results["sets"]["REC_refcoco_unc_val"]["detection"]["acc"] == 50.0
    assert "answer" not in results["sets"]["REC_refcoco_unc_val"]


def test_endpoint_failure_stops_the_run_and_keeps_what_is_done(server, synth_dir, tmp_path):
    server.respond = lambda body: (500, None)
    cfg = _config(tmp_path, synth_dir / "test.jsonl", limit=2, endpoint=f"http://127.0.0.1:{server.server_port}")
    with pytest.raises(endpoint.EndpointError, match="HTTP 500"):
        ev.evaluate(cfg)
    assert (tmp_path / "predictions.jsonl").read_text() == ""


# --------------------------------------------------------------------------------------------
# Bad prediction rows.


def _prediction(**fields):
    row = {"set": "docvqa", "id": "1", "answers": ["May 5"], "width": 300, "height": 200, "gt_box": [30, 40, 90, 100],
           "box_text": "[0.100, 0.300, 0.300, 0.500]", "answer": "May 5", "question": "What is the date?"}
    return {k: v for k, v in {**row, **fields}.items() if v != "DROP"}


def test_prediction_rows_are_checked_field_by_field(tmp_path):
    path = tmp_path / "predictions.jsonl"
    rows = [_prediction(id=1), _prediction(id=2, gt_box=[1, 2, 3]), _prediction(id=3, answer=7),
            _prediction(id=4, answers="DROP"), _prediction(id=5, width=0), _prediction(id=6, box_text=[0.1]),
            _prediction(id=7, gt_box=[1, 2, 3, float("nan")]), _prediction(id="1")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DataError) as e:
        ev.evaluate(_config(tmp_path / "out", tmp_path, predictions=str(path)))
    message = str(e.value)
    for line, field in ((2, "gt_box"), (3, "answer"), (4, "answers"), (5, "width"), (6, "box_text"), (7, "gt_box")):
        assert f"predictions.jsonl:{line}: field '{field}'" in message, (line, field, message)
    assert "predictions.jsonl:8: field 'id': ('docvqa', '1') already at line 1" in message and "7 bad record" in message
    # integer ids, as the Visual-CoT release has them, are accepted
    path.write_text(json.dumps(_prediction(id=1)) + "\n" + json.dumps(_prediction(id=491, answer="no")) + "\n")
    results = ev.evaluate(_config(tmp_path / "out", tmp_path, predictions=str(path)))
    assert results["sets"]["docvqa"]["detection"]["n"] == 2 and results["sets"]["docvqa"]["answer"]["exact_match"] == 0.5
    with pytest.raises(data.DataError, match="no such file"):
        ev.evaluate(_config(tmp_path / "out", tmp_path, predictions=str(tmp_path / "missing.jsonl")))


def test_a_picture_draws_each_mark_distinctly_and_only_what_is_there(tmp_path):
    Image.new("RGB", (400, 300), (128, 128, 128)).save(tmp_path / "grey.png")
    row = {"image": str(tmp_path / "grey.png"), "question": "Q?", "answers": ["a"], "answer": "a",
           "gt_box": [50, 50, 150, 150], "box": [200, 60, 300, 160], "box_text": "[...]", "crop": [190, 40, 330, 180]}
    scale = 512 / 400

    def at(picture, x, y):  # the pixel at image coordinates (x, y) of the left panel
        return Image.open(picture).convert("RGB").getpixel((round(x * scale), round(y * scale)))

    both = ev.draw_picture(row, tmp_path / "both.png")
    assert at(both, 200, 110) == ev.PREDICTION and at(both, 50, 100) == ev.TRUTH  # on each box's left edge
    assert ev.CROP in {at(both, x, 40) for x in range(190, 330, 2)}  # the crop window's dashes
    assert at(both, 100, 100) == (128, 128, 128)  # inside a box: the image itself
    no_truth = ev.draw_picture({**row, "gt_box": None}, tmp_path / "no_truth.png")
    assert at(no_truth, 50, 100) == (128, 128, 128) and at(no_truth, 200, 110) == ev.PREDICTION
    # the legend's first swatch (left of the caption): the truth's when it is drawn, else the prediction's
    swatch = (6, round(300 * scale) + 4 + 6)
    assert Image.open(both).convert("RGB").getpixel(swatch) == ev.TRUTH
    assert Image.open(no_truth).convert("RGB").getpixel(swatch) == ev.PREDICTION


@pytest.mark.parametrize("form", ["axis", "pixel", "rel1000"])
def test_a_box_form_is_read_in_its_own_form_and_scored_in_the_benchmarks(form, release, tiny_path):
    """A model that writes its boxes in another form than the benchmark's square one: each reply is read in that
    form, cropped there, and the official scorer gets the same box in square text, at every digit."""
    import model

    processor = model.load_processor(str(tiny_path)).image_processor
    items = viscot.read_items(str(release), ["docvqa"])
    by_size = {(it.width, it.height): it for it in items}

    def reply(prompts):  # the box step: each item's true box, written in `form`; the answer step: "x"
        return [chat.write_box(by_size[ims[0].size].gt_box, *ims[0].size, form, processor) if len(ims) == 1 else "x"
                for _, ims in prompts]

    rows = ev.predict_batch(items, reply, box_form=form, image_processor=processor)
    square = ev.predict_batch(items, lambda prompts: [chat.box_to_text(by_size[ims[0].size].gt_box, *ims[0].size)
                                                      if len(ims) == 1 else "x" for _, ims in prompts])
    view = chat.model_view_size(300, 200, processor)
    for row, item in zip(rows, items):
        assert row["box_form"] == form and row["box_text"] == chat.write_box(item.gt_box, item.width, item.height, form,
                                                                             processor)
        if item.degenerate:  # an inverted true box does not parse in any form, and scores nowhere
            assert row["box"] is None and row["square_box_text"] is None
            continue
        assert row["box"] == pytest.approx(item.gt_box, abs=max(item.width, item.height) / (view[0] if form == "pixel"
                                                                                        else 1000))
        assert row["crop"] == list(chat.crop_window(tuple(row["box"]), item.width, item.height))  # cropped there
        assert viscot.official_box_values(row["square_box_text"]) is not None
    if form == "pixel":  # pixels of the view the model sees (112 px wide here), not of the 300 px page
        assert max(chat.parse_box(rows[0]["box_text"])) <= max(view)
    ours, theirs = viscot.summarize(rows)["sets"]["docvqa"], viscot.summarize(square)["sets"]["docvqa"]
    assert ours["detection"]["correct"] == theirs["detection"]["correct"] == 2  # all but the inverted box
    assert ours["detection"]["unparsed_official"] == 1


def test_upstream_test_prompt_asks_as_upstreams_test_script(synth_dir, tmp_path):
    """extras/test_cot.py l.91: `prompt_bbox = prompt + "Please provide the bounding box coordinate of the region that
    can help you answer the question better."` after the image; l.117-123: [image, prompt, crop], which upstream's
    server (no `<image>` in the text) reads as both images before the bare question."""
    items = viscot.read_items(str(synth_dir / "test.jsonl"), limit=2)
    seen = []

    def reply(prompts):
        seen.extend(prompts)
        return ["[0.1, 0.1, 0.5, 0.5]" if len(ims) == 1 else "dotted" for _, ims in prompts]

    rows = ev.predict_batch(items, reply, prompt_form="upstream-test")
    box_prompt, answer_prompt = seen[0][0], seen[2][0]
    question = items[0].question
    assert chat.render_chat(box_prompt).endswith(
        f"<|vision_start|><|image_pad|><|vision_end|>{question}Please provide the bounding box coordinate of the "
        "region that can help you answer the question better.<|im_end|>\n<|im_start|>assistant\n")
    assert answer_prompt == [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                         {"type": "text", "text": question}]}]
    x1, y1, x2, y2 = rows[0]["crop"]
    assert [im.size for im in seen[2][1]] == [tuple(rows[0]["image_size"]), (x2 - x1, y2 - y1)]  # the page, its crop
    assert all(r["answer"] == "dotted" for r in rows)
    # one way to ask at a time, refused before anything is made
    result = subprocess.run([sys.executable, "evaluate.py", "--data", str(synth_dir), "--out", str(tmp_path / "e"),
                             "--official-prompt", "--upstream-test-prompt"], cwd=Path(ev.__file__).parent,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "choose one" in result.stderr and not (tmp_path / "e").exists()
