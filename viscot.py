"""The Visual-CoT benchmark protocol: what is scored, and how, exactly as upstream does it.

Top to bottom: detection Acc@0.5 as the official scorer computes it; the Visual-CoT judge; the readers that turn a
release directory (benchmark/<name>.json, benchmark_det/<name>.jsonl), a RefCOCO-style REC file or our records into
Items; the per-set report with its means. evaluate.py runs the model on the Items; docs/recipe.md gives the protocol.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import chat
import data
import synth

# --------------------------------------------------------------------------------------------
# Detection Acc@0.5, exactly as the official scorer computes it (Visual-CoT's REC calculation.py):
# parse the reply with its string operations, scale by max(w, h), move the ground-truth pixel box into
# the padded square, IoU on float32 tensors (torchvision's box_iou: no +1), correct iff IoU > 0.5.

def official_box_values(text: str) -> list[float] | None:
    """The official parse: drop ' .', '[' and ']', split on ', ', float() the first four; None if that fails."""
    parts = str(text).replace(" .", "").replace("[", "").replace("]", "").split(", ")
    try:  # float() exactly as upstream, which also takes 'nan', 'inf', '1_0' and surrounding whitespace
        return [float(parts[i]) for i in range(4)]
    except (ValueError, IndexError):
        return None

def square_gt_box(box, width: int, height: int) -> list[float]:
    """A ground-truth pixel box moved into Visual-CoT's centred square: + (long - short) // 2 on the short axis."""
    x1, y1, x2, y2 = box
    dx, dy = max(height - width, 0) // 2, max(width - height, 0) // 2
    return [x1 + dx, y1 + dy, x2 + dx, y2 + dy]

def iou_float32(a, b) -> float:
    """IoU as torchvision's box_iou computes it on float32: no +1, no validity checks (NaN stays NaN)."""
    with np.errstate(all="ignore"):  # inverted, empty or non-finite boxes give 0, inf or NaN, never a warning
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        wh = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None)
        inter = wh[0] * wh[1]
        return float(inter / (area_a + area_b - inter))

def box_correct(text: str, gt_box, width: int, height: int, parser: str = "official") -> bool:
    """Acc@0.5 of one box reply against a ground-truth pixel box (width, height as the benchmark file gives them)."""
    if parser == "official":
        values = official_box_values(text)
    elif parser == "lenient":
        values = chat.parse_box(text)  # first four numbers inside [...]; None for NaN, inverted and the like
    else:
        raise ValueError(f"unknown box parser {parser!r}, expected 'official' or 'lenient'")
    if values is None:
        return False  # unparsable: wrong, and it stays in the denominator
    return iou_float32([v * max(width, height) for v in values], square_gt_box(gt_box, width, height)) > 0.5

def detection_scores(text: str, gt_box, width: int, height: int) -> dict:
    """Both parsers' verdicts on one box reply, and whether each could parse it."""
    return {"official": box_correct(text, gt_box, width, height, "official"),
            "lenient": box_correct(text, gt_box, width, height, "lenient"),
            "official_parsed": official_box_values(text) is not None,
            "lenient_parsed": chat.parse_box(text) is not None}

# --------------------------------------------------------------------------------------------
# The Visual-CoT judge (llava/eval/eval_cot_score.py). Its system prompt is a triple-quoted string:
# the text with a newline before and after; the user template likewise. Both kept byte for byte.

JUDGE_SYSTEM = ("\nYou are responsible for proofreading the answers, you need to give a score to the model's answer "
                "by referring to the standard answer, based on the given question. The full score is 1 point and the "
                "minimum score is 0 points. Please output the score in the form \"score: <score>\". The evaluation "
                "criteria require that the closer the model's answer is to the standard answer, the higher the "
                "score.\n")
JUDGE_USER = "\nquestion: %s\nstandard answer: %s\nmodel's answer: %s\n"
_JUDGE_SCORE = re.compile(r"score: ([\d\.]+)")
_LEADING_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")

JUDGE_MODEL = "gpt-3.5-turbo-1106"  # the model the official Visual-CoT judge script asks for

def judge_messages(question: str, reference: str, prediction: str) -> list[dict]:
    """The judge's chat: the official system prompt and user text."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER % (question, reference, prediction)}]

def parse_judge_score(reply: str | None) -> float:
    """Official reply parsing: lower-case; no 'score' -> 0; not exactly one 'score: x' -> 0; clipped to [0, 1]."""
    found = [] if reply is None else _JUDGE_SCORE.findall(reply.lower())  # None: a failed call
    if len(found) != 1:  # none (which covers upstream's no-'score' check) or several
        return 0.0
    # upstream float()s the match and crashes on 'score: 0.5.'; we take its leading number instead
    number = _LEADING_NUMBER.match(found[0])
    return min(max(float(number.group()), 0.0), 1.0) if number else 0.0

# --------------------------------------------------------------------------------------------
# What is evaluated: one Item per question (or referring expression), from any of the readers below.

# the 11 scored sets of the Visual-CoT benchmark and their sizes in the release
SCORED_SETS = {"docvqa": 888, "dude": 603, "sroie": 686, "infographicsvqa": 360, "textcap": 853, "textvqa": 526,
               "flickr30k": 1546, "gqa": 978, "openimages": 945, "vsr": 404, "cub": 492}
UNSCORED_SETS = ("visual7w", "emotic")  # in the release, not in the published tables

@dataclass
class Item:
    """One evaluation question about one image, and what it is scored against."""
    set: str                      # benchmark set name ('docvqa', 'synth', 'REC_refcoco_unc_val', ...)
    id: str                       # unique within its set
    image: str                    # absolute path
    question: str                 # the bare question (answer step); the expression for box-only items
    answers: list[str]            # empty for box-only items
    gt_box: list[float] | None    # original-image pixels as the file gives them (may be inverted)
    width: int                    # as the file gives them: the official scorer uses these
    height: int
    kind: str = "vqa"             # "vqa" box then answer | "det" box only, focus prompt | "rec" box only, locate prompt
    expression: str = ""          # focus-step text when it differs from `question` (benchmark_det's 'expression')
    judge_question: str = ""      # the question as the judge sees it (benchmark: first turn, '<image>\n' kept)
    source: str = ""              # "file:line", for error messages

    @property
    def degenerate(self) -> bool:
        """An inverted ground-truth box: no prediction can score on it (8 docvqa items in the release)."""
        b = self.gt_box
        return b is not None and (b[2] < b[0] or b[3] < b[1])

def _parse_file(path: Path, parse, errors: list[str]) -> list[dict]:
    """parse(obj, source) of each object of a file, plus its position `pos`; bad ones go to errors (file:line)."""
    return data.read_objects(path, lambda obj, line, pos: {**parse(obj, f"{path}:{line}"), "pos": pos}, errors)

def _qid(obj: dict, key: str = "question_id"):
    return None if obj.get(key) is None else str(data.field(obj, key, (int, str), "an integer or a string"))

def _conv_fields(obj: dict, source: str) -> dict:
    """A benchmark/<name>.json item (data.from_vcot_conversation), its first turn kept as the judge sees it."""
    conv = data.from_vcot_conversation(obj, source, inverted_ok=True)
    if conv["steps"] != ("focus", "answer"):
        raise data.BadField("conversations", "expected 4 turns {from, value}: question, box, <image>, answer")
    first = obj["conversations"][0]["value"]
    return dict(qid=_qid(obj), image=conv["image"], box=list(conv["boxes"][0]), question=conv["question"],
                answer=conv["answers"][0], source=source,
                judge_question=first.split(data.BOX_CUT)[0] if data.BOX_CUT.strip() in first else first)

def _det_fields(obj: dict, source: str) -> dict:
    """benchmark_det/<name>.jsonl (or a RefCOCO-style REC file) line: img_path, expression, bbox, height, width."""
    return dict(qid=_qid(obj), sent_id=_qid(obj, "sent_id"), image=data.field(obj, "img_path", str, "an image path"),
                expression=data.field(obj, "expression", str, "a string"), source=source,
                box=list(data.boxes_field([data.field(obj, "bbox", list, "a list")], "bbox", inverted_ok=True)[0]),
                width=data.field(obj, "width", int, "an integer"), height=data.field(obj, "height", int, "an integer"))

def _unique_ids(items: list[Item]) -> list[Item]:
    """Resume keys on (set, id): a repeated id gets its file line appended."""
    seen = set()
    for item in items:
        if (item.set, item.id) in seen:
            item.id = f"{item.id}@{item.source.rsplit(':', 1)[-1]}"
        seen.add((item.set, item.id))
    return items

def read_benchmark_set(conv_path: Path | None, det_path: Path | None, name: str, image_root,
                       limit: int | None = None, skip_bad: bool = False) -> list[Item]:
    """One Visual-CoT set from benchmark/<name>.json and/or benchmark_det/<name>.jsonl (paired by question_id). Only a
    .json: the box after '###', the size from the image. Only a .jsonl: box-only items ('det' with question_id, else
    'rec': a RefCOCO-style file). Inverted ground-truth boxes are read and flagged, never rejected."""
    root, errors = os.path.abspath(image_root), []
    convs = _parse_file(conv_path, _conv_fields, errors) if conv_path else None
    dets = _parse_file(det_path, _det_fields, errors) if det_path else None
    if convs is not None and dets is not None:
        if any(r["qid"] is None for r in convs + dets):  # upstream pairs the two files item by item
            by_pos = {d["pos"]: d for d in dets}  # by position in the file: a skipped bad line shifts nothing
            rows = [(c, by_pos.pop(c["pos"])) for c in convs if c["pos"] in by_pos]
            if len(rows) != len(convs) or by_pos:
                errors.append(f"{det_path}: without question_id the items pair by position, but "
                              f"{len(convs) - len(rows) + len(by_pos)} have no partner in {conv_path}")
        else:
            by_id = defaultdict(list)
            for d in dets:
                by_id[d["qid"]].append(d)
            rows = []
            for c in convs:
                if by_id.get(c["qid"]):
                    rows.append((c, by_id[c["qid"]].pop(0)))
                else:
                    errors.append(f"{c['source']}: field 'question_id': {c['qid']} has no line in {det_path}")
            errors += [f"{d['source']}: field 'question_id': {d['qid']} has no item in {conv_path}"
                       for ds in by_id.values() for d in ds]
    else:
        rows = [(c, None) for c in convs] if convs is not None else [(None, d) for d in dets]
    items = []
    for c, d in rows[:limit]:
        main = c or d
        line = main["source"].rsplit(":", 1)[-1]
        try:
            key = "image" if c else "img_path"
            rel = main["image"]  # found as given, under cot/ (the release's layout), or by file name (REC files)
            path = data.find_image(rel, (os.path.join("cot", rel), os.path.basename(rel)), root, key)
            width, height = (d["width"], d["height"]) if d else data.image_size(path, key, verify=False)
        except data.BadField as e:
            errors.append(f"{main['source']}: {e}")
            continue
        if c:
            items.append(Item(name, c["qid"] or line, path, c["question"], [c["answer"]], d["box"] if d else c["box"],
                              width, height, "vqa", expression=d["expression"] if d else "",
                              judge_question=c["judge_question"], source=c["source"]))
        else:
            items.append(Item(name, d["qid"] or d["sent_id"] or line, path, d["expression"], [], d["box"], width,
                              height, "det" if d["qid"] is not None else "rec", source=d["source"]))
    data.report_bad(errors, skip_bad, f"set {name!r}", len(items))
    return _unique_ids(items)

def read_benchmark(root, sets=(), image_root=None, limit: int | None = None, skip_bad: bool = False) -> list[Item]:
    """A directory laid out like the Visual-CoT release (benchmark/, benchmark_det/); sets default to the 11 scored."""
    root, missing, items = Path(root), [], []
    for name in tuple(sets) or SCORED_SETS:
        conv, det = root / "benchmark" / f"{name}.json", root / "benchmark_det" / f"{name}.jsonl"
        if not conv.exists() and not det.exists():
            missing.append(name)
            continue
        items += read_benchmark_set(conv if conv.exists() else None, det if det.exists() else None, name,
                                    image_root or root, limit, skip_bad)
    if missing:
        raise data.DataError(f"{root}: no benchmark/<name>.json or benchmark_det/<name>.jsonl for set(s) "
                             f"{', '.join(missing)}; pass --sets to evaluate a subset")
    return items

def items_from_records(path: Path, image_root=None, limit: int | None = None, skip_bad: bool = False,
                       name: str | None = None) -> list[Item]:
    """Our records or Visual-CoT metadata (data.read_records); the set is each line's 'dataset', else `name`."""
    path = Path(path)
    if name is None:  # 'synth-v1-seed0/test' says more than 'test'
        name = f"{path.parent.name}/{path.stem}" if path.stem in ("train", "val", "test") else path.stem
    datasets = dict(data.read_objects(path, lambda obj, line, _: (line, obj.get("dataset")), []))
    one_set = len(set(datasets.values())) <= 1
    records = data.read_records(path, image_root=image_root, skip_bad=skip_bad, limit=limit if one_set else None)
    items, counts = [], defaultdict(int)
    for r in records:
        ds = datasets.get(int(r.source.rsplit(":", 1)[-1]))
        set_name = ds if isinstance(ds, str) and ds else name
        if limit is not None and counts[set_name] >= limit:
            continue
        counts[set_name] += 1
        items.append(Item(set_name, r.id, r.image, r.question, list(r.answers), list(r.box) if r.boxes else None,
                          r.width, r.height, "vqa", judge_question=r.question, source=r.source))
    return _unique_ids(items)

def read_items(data_arg: str, sets=(), image_root=None, limit: int | None = None, skip_bad: bool = False,
               seed: int = 0) -> list[Item]:
    """--data: a Visual-CoT release directory, a directory with test.jsonl, one file, or `synth` (its test split)."""
    path = synth.resolve_data("synth", "test", seed) if data_arg == "synth" else Path(data_arg)
    if path.is_dir() and ((path / "benchmark").is_dir() or (path / "benchmark_det").is_dir()):
        return read_benchmark(path, sets, image_root, limit, skip_bad)
    if path.is_dir():
        if not (path / "test.jsonl").exists():
            raise data.DataError(f"{path}: neither a Visual-CoT release (benchmark/, benchmark_det/) "
                                 f"nor a directory with test.jsonl")
        path = path / "test.jsonl"
    if not path.is_file():
        raise data.DataError(f"{path}: no such file or directory")
    first = next(iter(data.read_objects(path, lambda obj, *_: obj, [], limit=1)), {})  # the first JSON object
    # image paths of a file inside benchmark/ or benchmark_det/ are relative to the release root
    release = path.parent.parent if path.parent.name in ("benchmark", "benchmark_det") else path.parent
    conv, det = release / "benchmark" / f"{path.stem}.json", release / "benchmark_det" / f"{path.stem}.jsonl"
    root = image_root or release
    if "conversations" in first:  # a benchmark .json; its benchmark_det twin joins if present
        items = read_benchmark_set(path, det if det.exists() else None, path.stem, root, limit, skip_bad)
    elif "img_path" in first and "expression" in first:  # a benchmark_det .jsonl; likewise its benchmark twin
        items = read_benchmark_set(conv if conv.exists() else None, path, path.stem, root, limit, skip_bad)
    else:
        items = items_from_records(path, image_root, limit, skip_bad)
    if sets:
        items = [it for it in items if it.set in sets]
        if not items:
            raise data.DataError(f"{data_arg}: no items in set(s) {', '.join(sets)}")
    return items

def load_item_image(item: Item) -> Image.Image:
    """The item's image as RGB."""
    return data.open_rgb(item.image, item.source)

# --------------------------------------------------------------------------------------------
# Scoring and reports: per-set detection and answer scores, the means, the markdown table.

def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None

def summarize(rows: list[dict], judge: dict | None = None, parser: str = "official") -> dict:
    """Per-set detection and answer scores and the means over sets (official and plain, labelled)."""
    by_set = defaultdict(list)
    for row in rows:
        by_set[row["set"]].append(row)
    sets, notes = {}, []
    for name, group in by_set.items():
        entry = {"items": len(group)}
        boxed = [r for r in group if r.get("box_text") is not None and r.get("gt_box") is not None]
        if boxed:
            # a model that writes another box form than the benchmark's: its box in square text (evaluate.py)
            verdicts = [detection_scores(r.get("square_box_text", r["box_text"]), r["gt_box"], r["width"], r["height"])
                        for r in boxed]
            total, correct = len(boxed), sum(v[parser] for v in verdicts)
            degenerate = sum(1 for r in boxed if r.get("degenerate"))
            entry["detection"] = {
                "n": total, "correct": correct, "acc": 100.0 * correct / total, "parser": parser,
                "acc_official": 100.0 * sum(v["official"] for v in verdicts) / total,
                "acc_lenient": 100.0 * sum(v["lenient"] for v in verdicts) / total,
                "parsers_disagree": sum(v["official"] != v["lenient"] for v in verdicts),
                "unparsed_official": sum(not v["official_parsed"] for v in verdicts),
                "unparsed_lenient": sum(not v["lenient_parsed"] for v in verdicts), "degenerate_gt": degenerate}
            if degenerate:
                notes.append(f"{name}: {degenerate} item(s) have inverted ground-truth boxes; as in the official "
                             "scorer they stay in the denominator and can never score "
                             f"(ceiling {total - degenerate}/{total}).")
        answered = [r for r in group if r.get("answers") and r.get("answer") is not None]
        if answered:
            scores = [chat.answer_scores(r["answer"], r["answers"]) for r in answered]
            entry["answer"] = {"n": len(answered), **{k: _mean(s[k] for s in scores) for k in scores[0]}}
            if judge is not None:  # a row the judge never saw counts 0, like a failed call upstream
                entry["answer"]["judge"] = _mean(judge.get((r["set"], r["id"]), 0.0) for r in answered)
        if (expected := SCORED_SETS.get(name)) and len(group) != expected:
            notes.append(f"{name}: {len(group)} items evaluated; the release has {expected}.")
        sets[name] = entry
    # visual7w and emotic are in the release but not in the published tables: kept out of the means
    averaged = {n: e for n, e in sets.items() if n not in UNSCORED_SETS} or sets
    if len(averaged) < len(sets):
        notes.append(f"{', '.join(n for n in sets if n not in averaged)}: not a scored set; left out of the means.")
    accs = {n: e["detection"]["acc"] for n, e in averaged.items() if "detection" in e}
    kept = {n: a for n, a in accs.items() if a != 0}
    means = {"detection": {"official_mean": _mean(kept.values()), "official_sets": sorted(kept),
                           "dropped_zero_sets": sorted(set(accs) - set(kept)), "plain_mean": _mean(accs.values()),
                           "plain_sets": sorted(accs)}} if accs else {}
    answered_sets = {n: e["answer"] for n, e in averaged.items() if "answer" in e}
    if answered_sets:
        metrics = [k for k in next(iter(answered_sets.values())) if k != "n"]
        means["answer"] = {k: _mean(a[k] for a in answered_sets.values()) for k in metrics}
        means["answer"]["sets"] = sorted(answered_sets)
        if judge is not None and set(answered_sets) & set(SCORED_SETS):
            # official overall: the mean over all 11 scored sets, a set not evaluated counting 0
            means["answer"]["judge_official_11"] = sum(answered_sets[s]["judge"] for s in SCORED_SETS
                                                       if s in answered_sets) / len(SCORED_SETS)
    return {"sets": sets, "means": means, "notes": notes}

def _fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

def results_markdown(results: dict) -> str:
    """The results as a markdown table (Acc x100, answer scores 0..1) with the means and notes under it."""
    info = results.get("run", {})
    lines = [f"# Evaluation: {info.get('what', '')}", "",
             f"box: `{info.get('box', '')}`; focus prompt: `{info.get('prompt', '')}`; Acc@0.5 with the "
             f"{info.get('parser', 'official')} parser (Visual-CoT protocol, x100); answer scores 0..1.", "",
             "| set | items | Acc@0.5 | Acc@0.5 official parser | Acc@0.5 lenient parser | parsers disagree | "
             "unparsable (official) | exact match | ANLS | containment | judge |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    answer_keys = ("exact_match", "anls", "containment", "judge")
    for name, e in results["sets"].items():
        d, a = e.get("detection", {}), e.get("answer", {})
        lines.append(f"| {name} | {e['items']} | {_fmt(d.get('acc'))} | {_fmt(d.get('acc_official'))} | "
                     f"{_fmt(d.get('acc_lenient'))} | {d.get('parsers_disagree', '-')} | "
                     f"{d.get('unparsed_official', '-')} | {' | '.join(_fmt(a.get(k), 3) for k in answer_keys)} |")
    det, ans = results["means"].get("detection", {}), results["means"].get("answer", {})
    dropped = det.get("dropped_zero_sets")
    lines.append(f"| **mean, official** (drops sets at exactly 0{': ' + ', '.join(dropped) if dropped else ''}) | | "
                 f"{_fmt(det.get('official_mean'))} | | | | | | | | |")
    n_sets = len(det.get("plain_sets", ans.get("sets", [])))
    lines.append(f"| **mean, plain** (all {n_sets} set{'s' if n_sets != 1 else ''}) | | {_fmt(det.get('plain_mean'))} "
                 f"| | | | | {' | '.join(_fmt(ans.get(k), 3) for k in answer_keys)} |")
    if "judge_official_11" in ans:
        lines += ["", f"Judge, official overall (mean over the 11 scored sets, a set not evaluated counts 0): "
                      f"{ans['judge_official_11']:.3f}"]
    if results.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"
