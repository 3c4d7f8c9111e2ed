"""Evaluation: two-step inference (focus -> crop -> answer), scored with the Visual-CoT benchmark protocol.

    python evaluate.py --model tiny --data synth --out runs/eval
    python evaluate.py --model CKPT --adapter runs/dpo2/adapter --data viscot_benchmark --out runs/eval-viscot
    python evaluate.py --predictions runs/eval/predictions.jsonl --judge-endpoint URL --out runs/eval

Top to bottom: the judge call; prediction with resume (batches through chat.two_step, the one Visual-CoT inference, also
behind `visrl.py infer|serve` and generate.py); pictures; `infer`; the CLI (also `visrl.py eval`). The protocol is in
viscot.py (official detection scorer, judge prompt, benchmark readers, Items, report); docs/recipe.md explains it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from PIL import Image, ImageDraw
from tqdm import tqdm

import chat
import data
import endpoint
import model
import runs
import viscot

# ---- The Visual-CoT judge, through the endpoint client -------------------------------------

def judge_answer(url: str, question: str, reference: str, prediction: str, judge_model: str = viscot.JUDGE_MODEL,
                 retries: int = 3, deterministic: bool = False) -> tuple[float, str | None, str | None]:
    """(score, reply, error) of one judge call; after `retries` failed calls the score is 0 (as upstream). The request
    is the official script's (model and messages only: the server's sampling defaults); deterministic adds temperature
    0 and max_tokens 256, so that a rerun scores the same."""
    sampling = (256, 0.0, 1.0) if deterministic else (None, None, None)
    try:
        reply = endpoint.chat_completion(url, viscot.judge_messages(question, reference, prediction), judge_model,
                                         *sampling, retries=retries - 1)
    except endpoint.EndpointError as e:
        return 0.0, None, str(e)
    return viscot.parse_judge_score(reply), reply, None

# ---- Inference: step 1 box (the model's, or an ablation's), crop, step 2 answer ------------
# One predictions.jsonl line per item, appended and flushed batch by batch; a rerun skips the items already there.

CENTER_BOX_TEXT = "[0.250, 0.250, 0.750, 0.750]"  # upstream's centre-box ablation, '%.3f' as it prints it

def focus_prompt(item: viscot.Item, form: str = "recipe", prompts: str = "upstream") -> list[dict]:
    """Step 1 messages: the focus prompt (the recipe's, the benchmark's test-time form `vcot`, or upstream's test
    script's `upstream-test`), or REC's."""
    if item.kind == "rec":
        return chat.rec_messages(item.question)
    if form == "upstream-test":
        return chat.upstream_test_messages(item.question, "box")
    return chat.focus_messages(item.expression or item.question, prompts, official=form == "vcot")

def ablation_box(item: viscot.Item, mode: str, width: int, height: int, seed: int = 0, box_form: str = "square",
                 image_processor=None) -> tuple[str, tuple]:
    """(box text in box_form, pixel box) for --box gt | center | random; random is seeded per item, so reruns agree;
    the centre box of the square form is upstream's text."""
    if mode == "gt":
        if item.gt_box is None:
            raise data.DataError(f"{item.source}: --box gt needs a ground-truth box, this item has none")
        box = tuple(item.gt_box)
    elif mode == "center":
        box = chat.center_box(width, height)
        if box_form == "square":
            return CENTER_BOX_TEXT, box
    elif mode == "random":
        box = chat.random_box(width, height, random.Random(f"visrl-eval/{seed}/{item.set}/{item.id}"))
    else:
        raise ValueError(f"no ablation box for mode {mode!r}")
    return chat.write_box(box, width, height, box_form, image_processor), box

def predict_batch(items: list[viscot.Item], generate_fn, box: str = "model", prompt_form: str = "recipe",
                  crop_rule: str = "raw", seed: int = 0, prompts: str = "upstream", box_form: str = "square",
                  image_processor=None) -> list[dict]:
    """Prediction rows for a batch of items; generate_fn maps [(messages, images)] to reply texts. Boxes are read in
    box_form (pixel: with the model's image processor); a row of another form than the benchmark's square one also
    holds its box in square text (square_box_text: what the detection scorer reads)."""
    images = [viscot.load_item_image(it) for it in items]
    rows = [{"set": it.set, "id": it.id, "kind": it.kind, "question": it.question, "answers": it.answers,
             "gt_box": it.gt_box, "width": it.width, "height": it.height, "image": it.image,
             "image_size": list(im.size), "judge_question": it.judge_question, "degenerate": it.degenerate,
             "box_mode": box, "box_form": box_form, "box_text": None, "box": None, "box_parsed": None, "crop": None,
             "answer": None} for it, im in zip(items, images)]
    if box == "none":
        replies = generate_fn([(chat.direct_messages(it.question, prompts), [im]) for it, im in zip(items, images)])
        for row, reply in zip(rows, replies):
            row["answer"] = reply.strip()
        return rows
    boxes = None if box == "model" else [ablation_box(it, box, *im.size, seed, box_form, image_processor)
                                         for it, im in zip(items, images)]
    steps = chat.two_step(generate_fn, images, [focus_prompt(it, prompt_form, prompts) for it in items],
                          [it.question if it.kind == "vqa" else None for it in items], crop_rule, prompts, boxes,
                          prompt_form, box_form, image_processor)
    for row, step in zip(rows, steps):
        row.update(step)
        if box_form != "square":  # every digit: 3 decimals would flip near-threshold IoUs
            row["square_box_text"] = (None if step["box"] is None else
                                      chat.box_to_text(step["box"], row["width"], row["height"], "square", exact=True))
    return rows

def _check_field(row: dict, key: str, kinds: str, required: bool = False):
    """row[key] checked against kinds ('str', 'int', 'box', 'none', 'bool', 'strs'); bools are never numbers."""
    if key not in row:
        if required:
            raise data.BadField(key, "missing")
        return
    value = row[key]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    ok = {"str": isinstance(value, str), "int": isinstance(value, int) and not isinstance(value, bool),
          "none": value is None, "bool": isinstance(value, bool),
          "box": isinstance(value, list) and len(value) == 4 and all(number(v) for v in value),
          "strs": isinstance(value, list) and all(isinstance(v, str) for v in value)}
    if not any(ok[k] for k in kinds.split("|")):
        expected = {"str": "a string", "int": "an integer", "none": "null", "bool": "true or false",
                    "box": "[x1, y1, x2, y2] (four finite numbers)", "strs": "a list of strings"}
        raise data.BadField(key, f"expected {' or '.join(expected[k] for k in kinds.split('|'))}, "
                                 f"got {json.dumps(value)[:60]}")

# what scoring, the judge and the pictures read from a prediction row, and what each may hold
ROW_FIELDS = (("set", "str", True), ("id", "str|int", True), ("answers", "strs", True), ("width", "int", True),
              ("height", "int", True), ("answer", "str|none", False), ("box_text", "str|none", False),
              ("gt_box", "box|none", False), ("box", "box|none", False), ("crop", "box|none", False),
              ("square_box_text", "str|none", False), ("box_form", "str", False), ("question", "str", False),
              ("judge_question", "str|none", False), ("image", "str", False), ("degenerate", "bool", False))

def _check_rows(numbered: list[tuple[int, dict]], path, skip_bad: bool = False) -> list[dict]:
    """Prediction rows checked field by field before any scoring, each error as file:line: field '...'; integer ids
    (as the Visual-CoT release has them) become strings. Returns the rows."""
    seen, errors, rows = {}, [], []
    if numbered:
        data.check_kind(numbered[0][1], "predictions", path)
    for n, row in numbered:
        try:
            for key, kinds, required in ROW_FIELDS:
                _check_field(row, key, kinds, required)
            if row["width"] <= 0 or row["height"] <= 0:
                raise data.BadField("width", f"image size {row['width']}x{row['height']} is not positive")
            if (crop := row.get("crop")) is not None and not (crop[2] > crop[0] and crop[3] > crop[1]):
                raise data.BadField("crop", f"empty or inverted window {crop}")
        except data.BadField as e:
            errors.append(f"{path}:{n}: {e}")
            continue
        row["id"] = str(row["id"])
        key = (row["set"], row["id"])
        if key in seen:
            errors.append(f"{path}:{n}: field 'id': {key} already at line {seen[key]} (duplicate prediction)")
            continue
        seen[key] = n
        rows.append(row)
    data.report_bad(errors, skip_bad, path, len(rows))
    return rows

def reply_function(cfg: "EvalConfig"):
    """generate_fn for the run: the in-process model (batched) or an OpenAI-compatible endpoint (concurrent)."""
    if cfg.endpoint:
        max_pixels = resolve_eval_convention(cfg).max_pixels  # the convention's cap, applied before sending

        def generate_endpoint(prompts):
            with ThreadPoolExecutor(max_workers=max(1, cfg.batch_size)) as pool:
                return list(pool.map(lambda prompt: endpoint.chat_completion(
                    cfg.endpoint, endpoint.to_openai_messages(*prompt, max_pixels), cfg.endpoint_model,
                    cfg.max_new_tokens, cfg.temperature, cfg.top_p), prompts))
        return generate_endpoint

    cfg = resolve_eval_convention(cfg)  # also when called alone (the demo shares one model between two evaluations)
    net, processor = model.load(cfg.model, cfg.adapter, dtype=cfg.dtype, max_pixels=cfg.max_pixels)
    return lambda prompts: model.sample(net, processor, prompts, eval_sampling(cfg), batch_size=cfg.batch_size,
                                        seed=cfg.seed)

def eval_sampling(cfg: "EvalConfig") -> model.Sampling:
    """How the in-process model answers (greedy by default)."""
    return model.Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)

def predict(items: list[viscot.Item], cfg: "EvalConfig", generate_fn=None) -> list[dict]:
    """Predictions for the items, in item order: those already in --out/predictions.jsonl are kept, the rest run."""
    path = Path(cfg.out) / "predictions.jsonl"
    done = {(r.get("set"), r.get("id")): r for r in data.read_jsonl_rows(path, repair=True)}
    todo = [it for it in items if (it.set, it.id) not in done]
    if done:
        print(f"evaluate: {len(items) - len(todo)} of {len(items)} items already in {path}; running {len(todo)}",
              file=sys.stderr)
    if todo:
        generate_fn = generate_fn or reply_function(cfg)
        image_processor = (model.load_processor(cfg.model, cfg.max_pixels).image_processor
                           if cfg.box_form == "pixel" else None)
        with open(path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"evaluate (box {cfg.box})",
                                                          dynamic_ncols=True) as bar:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start:start + cfg.batch_size]
                for row in predict_batch(batch, generate_fn, cfg.box, prompt_form(cfg), cfg.crop, cfg.seed,
                                         cfg.prompts, cfg.box_form, image_processor):
                    f.write(json.dumps(row) + "\n")
                    done[(row["set"], row["id"])] = row
                f.flush()  # a killed run loses at most the batch in flight
                bar.update(len(batch))
    return [done[(it.set, it.id)] for it in items]

def run_judge(rows: list[dict], cfg: "EvalConfig") -> dict:
    """Judge scores {(set, id): score} for every answered row; cached in --out/judge.jsonl (resumable)."""
    path = Path(cfg.out) / "judge.jsonl"
    cache = {(r.get("set"), r.get("id")): r for r in data.read_jsonl_rows(path, repair=True)}

    def cached(row):  # judged before, on this very answer, and the call worked (a failed one is tried again)
        entry = cache.get((row["set"], row["id"]))
        return entry is not None and entry.get("answer") == row["answer"] and not entry.get("error")

    todo = [r for r in rows if r.get("answers") and r.get("answer") is not None and not cached(r)]
    if todo:
        with open(path, "a", encoding="utf-8") as f, ThreadPoolExecutor(max_workers=max(1, cfg.judge_workers)) as pool:
            futures = {pool.submit(judge_answer, cfg.judge_endpoint, r.get("judge_question") or r.get("question", ""),
                                   r["answers"][0], r["answer"], cfg.judge_model, 3,
                                   cfg.judge_deterministic): r for r in todo}
            for future in tqdm(as_completed(futures), total=len(todo), desc="judge", dynamic_ncols=True):
                r = futures[future]
                score, reply, error = future.result()
                entry = {"set": r["set"], "id": r["id"], "answer": r["answer"], "score": score, "reply": reply,
                         "error": error}
                f.write(json.dumps(entry) + "\n")
                f.flush()
                cache[(r["set"], r["id"])] = entry
    failed = sum(1 for r in rows if cache.get((r["set"], r["id"]), {}).get("error"))
    if failed:
        print(f"warning: {failed} judge call(s) failed after retries and score 0 (as upstream); see {path}",
              file=sys.stderr)
    return {(r["set"], r["id"]): cache[(r["set"], r["id"])]["score"] for r in rows if (r["set"], r["id"]) in cache}

# ---- Pictures: a prediction at a glance (evaluate's pictures/, infer's PNG) ----------------

def _ascii(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text.encode("ascii", "replace").decode()  # PIL's built-in font may lack other glyphs

# Marks that stand out on any image (the synthetic question frames alone are red, green, blue, yellow, magenta or
# cyan): bands with black edges, orange for the prediction and white for the truth, a dashed black line for the crop.
PREDICTION, TRUTH, CROP = (255, 140, 0), (255, 255, 255), (0, 0, 0)

def _band(draw: ImageDraw.ImageDraw, box, color) -> None:
    """A 3 px band of color between 1 px black edges."""
    x1, y1, x2, y2 = box
    draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=5)
    draw.rectangle((x1, y1, x2, y2), outline=color, width=3)

def _dashed_rect(draw: ImageDraw.ImageDraw, box, color, dash: int = 6) -> None:
    x1, y1, x2, y2 = box
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True), (y1, y2, x1, False), (y1, y2, x2, False)):
        for start in range(int(a), int(b), 2 * dash):
            dash_line = [(start, fixed), (min(start + dash, b), fixed)]
            draw.line(dash_line if horizontal else [p[::-1] for p in dash_line], fill=color, width=2)

def draw_picture(row: dict, path) -> Path:
    """One PNG: the image with the predicted box (orange), the true box (black and white) and the crop window (dashed),
    the crop beside it, a legend of what is drawn, and the question, box text and answer."""
    image = data.open_rgb(row["image"])
    scale = 512 / max(image.size)
    left = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(left)

    def scaled(box):
        x1, y1, x2, y2 = (v * scale for v in box)
        return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)

    legend = []
    # the crop window last, on top: one equal to the box still shows
    for key, name, color in (("gt_box", "true box", TRUTH), ("box", "predicted box", PREDICTION),
                             ("crop", "crop window", CROP)):
        if row.get(key):
            (_dashed_rect if color == CROP else _band)(draw, scaled(row[key]), color)
            legend.append((name, color))
    panels = [left]
    if row.get("crop"):
        crop = image.crop(tuple(row["crop"]))
        panels.append(crop.resize((max(1, round(crop.width * left.height / crop.height)), left.height)))
    box_note = "" if row.get("box") or not row.get("box_text") else "  (did not parse: the whole image was cropped)"
    caption = [f"Q: {row.get('question', '')}", f"box text: {row.get('box_text')}{box_note}",
               f"answer: {row.get('answer')}   reference: {' | '.join(row.get('answers') or []) or '-'}"]
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    canvas = Image.new("RGB", (max(width, 640), left.height + 16 * (len(caption) + 1) + 8), (255, 255, 255))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + 8
    pen = ImageDraw.Draw(canvas)
    x, y = 4, left.height + 4
    for name, color in legend:  # only what was drawn, each swatch drawn as its mark is
        (_dashed_rect(pen, (x, y + 2, x + 22, y + 11), color, dash=3) if color == CROP else
         _band(pen, (x + 1, y + 3, x + 21, y + 10), color))
        pen.text((x + 28, y), name, fill=(0, 0, 0))
        x += 28 + 7 * len(name) + 20
    for i, text in enumerate(caption, 1):
        pen.text((4, y + 16 * i), _ascii(text), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

def draw_pictures(rows: list[dict], out_dir, n: int) -> list[Path]:
    """A few pictures, taken round-robin over the sets; rows whose image is gone are skipped."""
    by_set = defaultdict(list)
    for row in rows:
        by_set[row["set"]].append(row)
    order = [g[rank] for rank in range(max((len(g) for g in by_set.values()), default=0))
             for g in by_set.values() if rank < len(g)]
    paths = []
    for row in order:
        if len(paths) < n and os.path.isfile(row.get("image", "")):
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{row['set']}-{row['id']}")
            paths.append(draw_picture(row, Path(out_dir) / "pictures" / f"{safe}.png"))
    return paths

# ---- `visrl.py infer`: one image, one question, a picture ----------------------------------

@dataclass
class InferConfig(runs.ConventionArgs):
    """Two-step inference on one image: the model names a box, looks at its crop, answers; draws a PNG."""

    image: str = dataclasses.field(kw_only=True)  # the image file
    question: str = dataclasses.field(kw_only=True)  # what to ask about it
    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl` / `tiny-qwen3-vl` / `tiny-qwen3.5`
    # a trained adapter (merged into the base for inference)
    adapter: Annotated[str | None, runs.default("none: the base model alone")] = None
    # the picture: the image with the predicted box (orange band) and crop window (dashed), the crop beside it
    out: str = "infer.png"
    overwrite: bool = False  # replace an existing --out (never the input image itself)
    max_new_tokens: int = 64  # the longest reply of each step, in tokens
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # weights' dtype: auto = bfloat16 on a GPU, float32 on CPU
    seed: int = 0  # torch's seed before the model loads

def infer_command(cfg: InferConfig) -> dict:
    """Run focus -> crop -> answer on one image (greedy), print the box and answer, save the picture; the row."""
    image = data.open_rgb(cfg.image)  # before loading the model: a typo or a taken --out fails at once
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.image).resolve():
        raise data.UserError(f"--out {cfg.out} is the input image; choose another --out")
    if (out.exists() or out.is_symlink()) and not cfg.overwrite:
        raise data.UserError(f"--out {cfg.out} exists; choose another --out or pass --overwrite")
    cfg = runs.resolve_convention(cfg)
    torch.manual_seed(cfg.seed)
    net, processor = model.load(cfg.model, cfg.adapter, dtype=cfg.dtype, max_pixels=cfg.max_pixels)
    sampling = model.Sampling(max_new_tokens=cfg.max_new_tokens)
    row = chat.two_step(lambda prompts: model.sample(net, processor, prompts, sampling, seed=cfg.seed), [image],
                        [chat.focus_messages(cfg.question, cfg.prompts)], [cfg.question], cfg.crop, cfg.prompts,
                        box_form=cfg.box_form, image_processor=processor.image_processor)[0]
    row = {"image": str(Path(cfg.image).resolve()), "question": cfg.question, "width": image.width,
           "height": image.height, **row, "picture": str(Path(cfg.out))}
    draw_picture(row, cfg.out)
    box = row["box"] if row["box_parsed"] else "unparsable; the whole image was cropped"
    print(f"box text: {row['box_text']}\nbox (pixels): {box}  crop: {row['crop']}\nanswer: {row['answer']}\n"
          f"picture: {cfg.out}")
    return row

# ---- The CLI -------------------------------------------------------------------------------

@dataclass
class EvalConfig(runs.RunConfig):
    """Two-step evaluation (focus -> crop -> answer) with the Visual-CoT benchmark protocol; resumable."""

    data: str = "synth"  # a Visual-CoT release (benchmark/, benchmark_det/), a file, a dir with test.jsonl, or `synth`
    # image paths are relative to this directory
    image_root: Annotated[str | None, runs.default("the release's root, else the data file's directory")] = None
    out: str = "runs/eval"  # predictions.jsonl, results.json, results.md, pictures/ (and judge.jsonl)
    limit: Annotated[int | None, runs.default("every item")] = None  # the first N items of each set
    seed: int = 0  # random-box ablation and sampling; also picks the synthetic set
    # the sets to evaluate
    sets: Annotated[tuple[str, ...], runs.default("every set in --data; of a release, the 11 scored ones")] = ()
    # the box the crop is cut from: the model's own, the ground truth, the centre, a random one; none: answer directly
    box: Literal["model", "gt", "center", "random", "none"] = "model"
    # an OpenAI-compatible server to run instead of the in-process model
    endpoint: Annotated[str | None, runs.default("none: the in-process model")] = None
    endpoint_model: str = "default"  # the `model` field sent to --endpoint
    # an OpenAI-compatible server for the Visual-CoT judge score
    judge_endpoint: Annotated[str | None, runs.default("none: offline answer scores only")] = None
    judge_model: str = viscot.JUDGE_MODEL  # the `model` field sent to --judge-endpoint (the official judge's)
    # judge calls with temperature 0 and max_tokens 256 (the official script sends neither: a rerun may score otherwise)
    judge_deterministic: bool = False
    judge_workers: int = 8  # concurrent judge calls
    # re-score this predictions.jsonl; no model runs
    predictions: Annotated[str | None, runs.default("none: predict first")] = None
    batch_size: int = 8  # prompts per generate call (concurrent requests with --endpoint)
    max_new_tokens: int = 128  # the longest reply of each step, in tokens (upstream's limit)
    temperature: float = 0.0  # sampling temperature; 0 = greedy (upstream's benchmark setting)
    top_p: float = 1.0  # nucleus sampling's probability mass (1: off)
    # the benchmark's test-time forms instead of ours: the focus text (lower-cased question + '. ') and the answer
    # step in Visual-CoT's 3 turns (question; the box as the assistant's turn; crop + its answer instruction)
    official_prompt: bool = False
    # upstream VisRL's test script's forms instead (extras/test_cot.py): the box asked as question + the focus
    # instruction with no space, the answer as the bare question after both images
    upstream_test_prompt: bool = False
    parser: Literal["official", "lenient"] = "official"  # box parser for the headline Acc@0.5 (both are reported)
    pictures: int = 6  # how many PNGs with boxes and crop to draw

    # which items, how they are read and scored: the predictions already made stay what they are
    rerun_may_change = runs.RunConfig.rerun_may_change + (
        "limit", "sets", "skip_bad_records", "batch_size", "judge_endpoint", "judge_model", "judge_deterministic",
        "judge_workers", "predictions", "parser", "pictures")

OUT_FILES = ("predictions.jsonl", "judge.jsonl", "results.json", "results.md", "pictures", "config.json")
RESCORE_FILES = ("judge.jsonl", "results.json", "results.md", "pictures")  # what --predictions writes

def prompt_form(cfg: EvalConfig) -> str:
    """Which prompts a run asks with: `vcot` (--official-prompt), `upstream-test` (--upstream-test-prompt), `recipe`."""
    if cfg.official_prompt and cfg.upstream_test_prompt:
        raise data.UserError("--official-prompt and --upstream-test-prompt are two ways to ask: choose one")
    return "vcot" if cfg.official_prompt else "upstream-test" if cfg.upstream_test_prompt else "recipe"

def resolve_eval_convention(cfg: EvalConfig) -> EvalConfig:
    """The adapter's convention (runs.resolve_convention); --official-prompt crops as the benchmark does
    (Visual-CoT's >= 224 px window) unless --crop says otherwise."""
    resolved = runs.resolve_convention(cfg)
    if cfg.official_prompt and cfg.crop is None:
        resolved = dataclasses.replace(resolved, crop="vcot")
    if resolved.box_form == "pixel" and cfg.endpoint:
        raise data.UserError("--box-form pixel needs the in-process model (its image processor sizes the view), "
                             "not --endpoint")
    return resolved

def rescored_rows(cfg: EvalConfig, lock: runs.RunLock) -> list[dict]:
    """--predictions: the rows of an earlier run, checked field by field; their derived files replaced."""
    if not Path(cfg.predictions).is_file():
        raise data.DataError(f"--predictions {cfg.predictions}: no such file")
    numbered = data.read_jsonl_rows(Path(cfg.predictions), numbered=True)
    rows = _check_rows(numbered, cfg.predictions, cfg.skip_bad_records)
    if cfg.sets:
        rows = [r for r in rows if r["set"] in cfg.sets]
    replaced = []
    if Path(cfg.out).resolve() != Path(cfg.predictions).resolve().parent:  # in place: only derived files are replaced
        replaced = runs.check_out(cfg.out, RESCORE_FILES, overwrite=cfg.overwrite, resumable=False)
    lock.take()
    runs.clear_run(replaced)
    return rows

def predicted_rows(cfg: EvalConfig, generate_fn, lock: runs.RunLock) -> list[dict]:
    """The items' predictions: an earlier run's with the same settings kept (runs.check_rerun), the rest made."""
    inputs = [] if cfg.endpoint else model.input_dirs(cfg.model, cfg.adapter)
    data_files = [] if cfg.data == "synth" else [("--data", cfg.data)]
    replaced = runs.check_out(cfg.out, OUT_FILES, inputs=inputs, data_files=data_files, resume=not cfg.overwrite,
                              overwrite=cfg.overwrite)
    if not replaced:  # without --overwrite the same settings resume the run in --out, other settings are refused
        runs.check_rerun(cfg.out, "evaluate", cfg, "rerun it")
    lock.take(create=False)  # a process still writing --out stops this one here
    items = viscot.read_items(cfg.data, cfg.sets, cfg.image_root, cfg.limit, cfg.skip_bad_records, cfg.seed)
    if not items:
        raise data.DataError(f"{cfg.data}: nothing to evaluate")
    if cfg.box == "none" and any(it.kind != "vqa" for it in items):
        raise data.UserError("--box none answers without a box, but some items are box-only (no answers): "
                             "nothing to do there")
    if cfg.box == "gt" and (bad := next((it for it in items if it.gt_box is None), None)) is not None:
        raise data.DataError(f"{bad.source}: --box gt needs a ground-truth box, this item has none")
    if replaced:  # --overwrite: only once the items are read and the model is loaded
        generate_fn = generate_fn or reply_function(cfg)
    lock.take()
    runs.clear_run(replaced)
    decoding = None if cfg.endpoint else model.decoding_record(  # an endpoint decodes as its server does
        model.load_processor(cfg.model, cfg.max_pixels).tokenizer, eval_sampling(cfg))
    runs.write_config(cfg.out, "evaluate", cfg, decoding)
    return predict(items, cfg, generate_fn)

def evaluate(cfg: EvalConfig, generate_fn=None) -> dict:
    """Run (or resume, or re-score) an evaluation; writes results.json, results.md and pictures into --out, holding its
    lock meanwhile."""
    prompt_form(cfg)  # two prompt forms at once: refused before anything is made
    with runs.RunLock(cfg.out, "evaluate") as lock:
        if cfg.predictions:
            rows = rescored_rows(cfg, lock)
        else:
            cfg = resolve_eval_convention(cfg)
            rows = predicted_rows(cfg, generate_fn, lock)
        judge = run_judge(rows, cfg) if cfg.judge_endpoint else None
        results = viscot.summarize(rows, judge, cfg.parser)
        modes = sorted({r.get("box_mode") for r in rows if r.get("box_mode")})
        box_mode = ", ".join(modes) or cfg.box
        if "model" not in modes and "none" not in modes:
            results["notes"].append(f"Acc@0.5 here scores the ablation's own box ({box_mode}), not a model's.")
        results["run"] = {"what": cfg.endpoint or (cfg.model + (f" + {cfg.adapter}" if cfg.adapter else "")),
                          "data": cfg.predictions or cfg.data, "box": box_mode, "parser": cfg.parser,
                          "prompt": {"vcot": "official test-time", "upstream-test": "upstream's test script",
                                     "recipe": "training form"}[prompt_form(cfg)],
                          "predictions": len(rows), "judge": cfg.judge_endpoint}
        out = Path(cfg.out)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        markdown = viscot.results_markdown(results)
        (out / "results.md").write_text(markdown)
        draw_pictures(rows, out, cfg.pictures)
    print(markdown)
    return results

def main() -> None:
    runs.cli(lambda: tyro.cli(EvalConfig), evaluate)

if __name__ == "__main__":
    main()
