"""
Data for visrl: the prompt table, box text forms, crops, record readers, tokenisation and batching.
Only stdlib and pillow at import time (torch only inside the batching functions), so it stays cheap to import.
"""

import json
import math
import os
import random
import re
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

# -----------------------------------------------------------------------------
# prompt table: the one place every stage takes its strings from (upstream they drifted apart)

SYSTEM_PROMPT = "You are a helpful assistant."
FOCUS_INSTRUCTION = ("Please provide the bounding box coordinate of the region "
                     "that can help you answer the question better.")
VISRL_INSTRUCTION = ("Please first provide the bounding box coordinate of the region, "
                     "then refer to the corresponding sub-image to answer the question better.")
VCOT_ANSWER_TEXT = "Please answer the question based on the original image and local detail image."
# Visual-CoT's referring-expression prompt (llava/eval/model_refcoco_loader.py), expression lower-cased.
REC_PROMPT = "Locate the region this sentence describes: {}. Please provide the bounding box coordinates."

def focus_messages(question: str, official: bool = False) -> list[dict]:
    """Step 1 prompt: [image] + question + focus instruction; the model replies with a box."""
    # official=True is the Visual-CoT benchmark's test-time text: lower-cased, plus a stray '.'
    text = (question.lower() + ". " if official else question + " ") + FOCUS_INSTRUCTION
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

def rec_messages(expression: str) -> list[dict]:
    """Referring-expression prompt: [image] + Visual-CoT's locate instruction; the model replies with a box."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": REC_PROMPT.format(expression.lower())}]}]

def answer_messages(question: str) -> list[dict]:
    """Step 2 prompt: [image] + question + answer instruction + [crop]; the model replies with the answer."""
    return [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": question + " " + VISRL_INSTRUCTION + "\n"},
        {"type": "image"},  # the crop of the box
    ]}]

def direct_messages(question: str) -> list[dict]:
    """No-box ablation: [image] + the bare question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

# -----------------------------------------------------------------------------
# boxes: (x1, y1, x2, y2) in pixels of the original image; text forms square / axis / pixel

Box = tuple[float, float, float, float]
BOX_FORMS = ("square", "axis", "pixel")

def _pad(width, height):
    """(dx, dy, S): where the image sits in Visual-CoT's centred square of side S = max(w, h)."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2, side

def _divisors(width, height, form, resized):
    """(dx, dy, div_x, div_y) with text value = (pixel + d) / div, and pixel = value * div - d."""
    if form == "square":
        dx, dy, side = _pad(width, height)
        return dx, dy, side, side
    if form == "axis":
        return 0, 0, width, height
    if form == "pixel":
        if resized is None:
            raise ValueError("box form 'pixel' needs resized=(width, height) of the image the model sees")
        return 0, 0, width / resized[0], height / resized[1]
    raise ValueError(f"unknown box form {form!r}, expected one of {BOX_FORMS}")

def box_to_text(box: Box, width: int, height: int, form: str = "square", resized=None) -> str:
    """Box in original pixels -> the text the model writes, e.g. '[0.542, 0.686, 0.592, 0.786]'."""
    dx, dy, div_x, div_y = _divisors(width, height, form, resized)
    x1, y1, x2, y2 = box
    # same operations as Visual-CoT's tools/convert_data_to_llava_format.py: add the pad, divide, '%.3f'
    vals = ((x1 + dx) / div_x, (y1 + dy) / div_y, (x2 + dx) / div_x, (y2 + dy) / div_y)
    if form == "pixel":
        return "[" + ", ".join(str(round(v)) for v in vals) + "]"
    return "[" + ", ".join(f"{v:.3f}" for v in vals) + "]"

# one number: a plain regex with no nested quantifiers, so it stays linear on junk replies;
# nan/inf are matched only so that a reply containing them fails instead of being skipped over
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?i:\bnan\b|\binf(?:inity)?\b)")

def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """Lenient parse: the first four numbers of the first [...] group; None (never raises) if unusable."""
    if not isinstance(text, str):
        return None
    start = text.find("[")
    end = text.find("]", start + 1)
    if start < 0 or end < 0:
        return None
    vals = []
    for m in _NUMBER.finditer(text, start + 1, end):
        vals.append(float(m.group()))
        if len(vals) == 4:
            break
    if len(vals) < 4 or not all(math.isfinite(v) and v >= 0 for v in vals):
        return None
    x1, y1, x2, y2 = vals
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2

def _clip(box, width, height):
    """Box clipped to the image, or None if nothing of it is left."""
    x1, y1, x2, y2 = (min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                      min(max(box[2], 0.0), width), min(max(box[3], 0.0), height))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None

def text_to_box(text: str, width: int, height: int, form: str = "square", resized=None) -> Box | None:
    """A model's box text -> original-image pixels, clipped; None if unusable (callers count these)."""
    vals = parse_box(text)
    if vals is None or (form != "pixel" and max(vals) > 1.0 + 1e-6):
        return None  # a normalised value above 1 points outside the image: a failure, not a clip
    dx, dy, div_x, div_y = _divisors(width, height, form, resized)
    x1, y1, x2, y2 = vals
    return _clip((x1 * div_x - dx, y1 * div_y - dy, x2 * div_x - dx, y2 * div_y - dy), width, height)

def union_box(boxes: list[Box]) -> Box:
    """Several ground-truth boxes merge into their union (as Visual-CoT's data conversion does)."""
    if not boxes:
        raise ValueError("union_box of no boxes")
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))

def iou(a: Box, b: Box) -> float:
    """Intersection over union, plain floats, no +1 in the areas; 0.0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) +
             max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter)
    return inter / union if union > 0 else 0.0

def center_box(width: int, height: int) -> Box:
    """The centre-box ablation: [0.25, 0.25, 0.75, 0.75] in the square convention, in pixels."""
    return text_to_box("[0.25, 0.25, 0.75, 0.75]", width, height, "square")

def random_box(width: int, height: int, rng: random.Random) -> Box:
    """The random-box ablation: sides uniform in [0.1, 0.5] of the image's sides, inside the image."""
    bw, bh = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
    x1, y1 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
    return x1, y1, x1 + bw, y1 + bh

# -----------------------------------------------------------------------------
# crops: the second image of the answer step

def crop_window(box: Box, width: int, height: int, rule: str = "vcot",
                min_half: int = 112) -> tuple[int, int, int, int]:
    """Integer (left, top, right, bottom) of the crop shown to the model for a box."""
    x1, y1, x2, y2 = box
    if rule == "raw":  # VisRL's own crop: the box itself, rounded outward, at least 1 px
        left, top = min(max(math.floor(x1), 0), width - 1), min(max(math.floor(y1), 0), height - 1)
        right, bottom = min(max(math.ceil(x2), left + 1), width), min(max(math.ceil(y2), top + 1), height)
        return left, top, right, bottom
    if rule != "vcot":
        raise ValueError(f"unknown crop rule {rule!r}, expected 'vcot' or 'raw'")
    # Matches cropwithbbox() in deepcs233/Visual-CoT llava/eval/model_cot_loader.py step by step:
    # floor division applied to the coordinates as given (ints or floats), half side at least
    # min_half, shift back inside at the top/left then the bottom/right, then clip. Deviation: upstream
    # gets here from the box text (its 'sum < 5' test picks normalised vs pixels) and does not clip the
    # far side before centring; our boxes are already original pixels, clipped by text_to_box.
    # Like upstream, a box with an odd side above 2 * min_half may lose its last pixel row/column.
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    half = max((x2 - x1) // 2, (y2 - y1) // 2, min_half)
    if cx - half < 0:
        cx = half
    if cy - half < 0:
        cy = half
    if cx + half > width:
        cx = width - half
    if cy + half > height:
        cy = height - half
    return (int(max(0, cx - half)), int(max(0, cy - half)),
            int(min(width, cx + half)), int(min(height, cy + half)))

# -----------------------------------------------------------------------------
# records and readers

@dataclass
class Record:
    """One question about one image: the unit every stage reads."""
    id: str
    image: str               # resolved absolute path
    question: str
    answers: list[str]       # one or more acceptable reference answers
    boxes: list[Box] = field(default_factory=list)  # may be empty: generation needs no boxes
    width: int = 0
    height: int = 0
    source: str = ""         # "path:line", for error messages

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def box(self) -> Box | None:
        return union_box(self.boxes) if self.boxes else None

class UserError(ValueError):
    """An expected error (bad data, flag, file, checkpoint or --out) that the user can act on: entry points
    print its message alone and exit 2 (`cli`); anything else is a bug and keeps its traceback."""

class DataError(UserError):
    """A bad data file or record; the message names the file, the line and the field."""

class PathError(DataError):
    """An image path that is malformed or leaves its root (after resolving symlinks and '..').
    The message names only the path as given, never the root: servers pass it on to clients."""
    def __init__(self, message: str, outside: bool = False):
        super().__init__(message)
        self.outside = outside

NAME_MAX = 255  # bytes in one path component (Linux's NAME_MAX)

def path_inside(root, rel: str) -> Path:
    """root / rel with symlinks and '..' resolved; PathError unless the result lies in root's own resolved
    tree. What is checked is what is opened: a link inside the root pointing outside it is refused, a
    root that is itself a link (or holds links within its resolved tree) works."""
    if not isinstance(rel, str) or not rel:
        raise PathError("empty image path")
    if "\x00" in rel:
        raise PathError(f"{rel[:60]!r}: NUL byte in the image path")
    try:
        too_long = len(rel.encode()) > 4096 or any(len(part.encode()) > NAME_MAX for part in Path(rel).parts)
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800") names no file
        raise PathError(f"{rel[:60]!r}: the image path is not valid text") from None
    if too_long:
        raise PathError(f"{rel[:60]!r}...: image path or one of its names too long")
    base = Path(root).resolve()
    try:
        path = (base / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise PathError(f"{rel!r}: cannot resolve ({type(e).__name__})") from e
    if not path.is_relative_to(base):
        raise PathError(f"{rel!r} is outside the image root", outside=True)
    return path

class BadField(Exception):
    """One bad field of one record: the readers collect these into one DataError naming file:line."""
    def __init__(self, key, msg):
        super().__init__(f"field '{key}': {msg}")

def field(obj, key, types, what, required=True):
    """obj[key] checked against types (bools are never numbers); every reader's field check."""
    if key not in obj:
        if required:
            raise BadField(key, "missing")
        return None
    v = obj[key]
    if not isinstance(v, types) or isinstance(v, bool):
        raise BadField(key, f"expected {what}, got {type(v).__name__} {str(v)[:40]!r}")
    return v

def _answers(obj, key):
    """A reference answer: a string or a non-empty list of strings."""
    v = field(obj, key, (str, list), "a string or a list of strings")
    if isinstance(v, str):
        return [v]
    if not v or not all(isinstance(a, str) for a in v):
        raise BadField(key, "expected a string or a non-empty list of strings")
    return list(v)

def boxes_field(value, key, inverted_ok=False):
    """A list of [x1, y1, x2, y2]: right length, finite, not inverted (inverted_ok: the benchmark's ground
    truth, which the official scorer counts as it is)."""
    if not isinstance(value, list):
        raise BadField(key, "expected a list of [x1, y1, x2, y2]")
    out = []
    for b in value:
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise BadField(key, f"expected a list of [x1, y1, x2, y2], got {str(b)[:60]}")
        if not all(math.isfinite(v) for v in b):
            raise BadField(key, f"non-finite coordinate in {b}")
        if not inverted_ok and (b[2] < b[0] or b[3] < b[1]):
            raise BadField(key, f"inverted box {b} (x2 < x1 or y2 < y1)")
        out.append(tuple(float(v) for v in b))
    return out

BOX_CUT = " Please provide the bounding box"  # Visual-CoT's first turn: the question, then this (upstream cuts here)
FOCUS_CUTS = (BOX_CUT, " Please think step by step and provide the bounding box")

def _from_vcot_meta(obj, name):
    """Visual-CoT metadata/*.jsonl: question, answer, image, width, height, bboxs (+ dataset, split)."""
    rel = field(obj, "image", str, "an image path")
    extra = ()
    dataset = obj.get("dataset")
    if isinstance(dataset, str):  # the release keeps images under cot/<dataset>/, textcap's under textvqa
        sub = "textvqa" if dataset == "textcap" else dataset
        extra = (os.path.join("cot", sub, rel), os.path.join(sub, rel))
    return dict(id=str(obj.get("question_id", name)), image=rel, extra=extra,
                question=field(obj, "question", str, "a string"), answers=_answers(obj, "answer"),
                boxes=boxes_field(field(obj, "bboxs", list, "a list of [x1, y1, x2, y2]"), "bboxs"),
                box_key="bboxs",
                width=field(obj, "width", int, "an integer"), height=field(obj, "height", int, "an integer"))

def _from_vcot_conv(obj, name):
    """Visual-CoT conversation .json item: image [path, 'path###[x1, y1, x2, y2]'], 4 turns."""
    images = field(obj, "image", list, "a list [path, 'path###[x1, y1, x2, y2]']")
    if len(images) < 2 or not all(isinstance(s, str) for s in images) or "###" not in images[1]:
        raise BadField("image", "expected a list [path, 'path###[x1, y1, x2, y2]']")
    nums = [float(m.group()) for m in _NUMBER.finditer(images[1].split("###", 1)[1])]
    turns = field(obj, "conversations", list, "a list of turns")
    if len(turns) < 4 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise BadField("conversations", "expected 4 turns {from, value}: question, box, <image>, answer")
    question = turns[0]["value"].replace("<image>\n", "").replace("<image>", "")
    for cut in FOCUS_CUTS:  # the question is what precedes the focus instruction
        question = question.split(cut)[0]
    answers = [t["value"] for t in turns if t.get("from") == "gpt"][-1:] or [turns[-1]["value"]]
    # the box is the pixel box after '###' (the gpt box turn is the same box, rounded to 3 decimals)
    return dict(id=str(obj.get("question_id", name)), image=images[0], extra=(),
                question=question.strip(), answers=answers, boxes=boxes_field([nums], "image"), box_key="image",
                width=None, height=None)

def _from_ours(obj, name):
    """Our JSONL: id, image, question, answers, boxes (optional), width/height (optional)."""
    qid = field(obj, "id", (str, int), "a string or an integer", required=False)
    return dict(id=str(name if qid is None else qid), image=field(obj, "image", str, "an image path"),
                extra=(), question=field(obj, "question", str, "a string"), answers=_answers(obj, "answers"),
                boxes=boxes_field(obj.get("boxes", []), "boxes"), box_key="boxes",
                width=field(obj, "width", int, "an integer", required=False),
                height=field(obj, "height", int, "an integer", required=False))

def find_image(rel, candidates, root, key="image"):
    """The first candidate path (rel, then the release's other layouts) that is a file inside root after
    resolving links; a path that leaves the root is an error, not a lookup."""
    for cand in (rel, *candidates):
        try:
            p = path_inside(root, cand)
        except PathError as e:
            raise BadField(key, f"{e} {root}" if e.outside else str(e)) from None
        if p.is_file():
            return str(p)
    raise BadField(key, f"file not found: {os.path.join(root, rel)} (image paths are relative to the image "
                        f"root {root}; another one is set with --image-root)")

def image_size(path, key="image", verify=True):
    """(width, height) of an image, after PIL's verify() (a cheap header + data check) unless verify=False."""
    try:
        with Image.open(path) as im:
            size = im.size
            if verify:
                im.verify()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error ...) for bad files
        raise BadField(key, f"unreadable image {path}: {type(e).__name__}: {e}")
    return size

def _record(r, root, source):
    """Check a parsed record against its image file and build the Record."""
    path = find_image(r["image"], r["extra"], root)
    w, h = image_size(path)
    for key, given, actual in (("width", r["width"], w), ("height", r["height"], h)):
        if given is not None and given != actual:
            raise BadField(key, f"{r['width']}x{r['height']} in the file, but the image is {w}x{h}")
    for b in r["boxes"]:  # 1 px of slack for annotation rounding
        if b[0] < -1 or b[1] < -1 or b[2] > w + 1 or b[3] > h + 1:
            raise BadField(r["box_key"], f"box {list(b)} outside the {w}x{h} image")
    return Record(r["id"], path, r["question"], r["answers"], r["boxes"], w, h, source)

def json_items(text):
    """(line, object or error message) for a JSON list or a JSONL text."""
    if text.lstrip().startswith("["):  # a JSON list: decode item by item to know each item's line
        dec, pos = json.JSONDecoder(), text.index("[") + 1
        line = 1 + text.count("\n", 0, pos)
        sep = re.compile(r"[\s,]*")
        while True:
            end = sep.match(text, pos).end()
            line, pos = line + text.count("\n", pos, end), end
            if pos >= len(text) or text[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                yield line, f"invalid JSON: {e}"
                return  # no way to resynchronise inside a list
            yield line, obj
            line, pos = line + text.count("\n", pos, end), end
    for line, s in enumerate(text.splitlines(), 1):
        if s.strip():
            try:
                yield line, json.loads(s)
            except json.JSONDecodeError as e:
                yield line, f"invalid JSON: {e}"

def _read(path, image_root, skip_bad, limit, build) -> list:
    """Read a JSON list or JSONL file, building one item per object; errors collected with file:line."""
    path = Path(path)
    root = str(Path(image_root if image_root is not None else path.parent).resolve())
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    items, errors = [], []
    for line, obj in json_items(text):
        if limit is not None and len(items) >= limit:
            break
        source = f"{path}:{line}"
        if isinstance(obj, str):
            errors.append(f"{source}: {obj}")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{source}: expected a JSON object, got {type(obj).__name__}")
            continue
        try:
            items.append(build(obj, f"{path.stem}-{line}", root, source))
        except BadField as e:
            errors.append(f"{source}: {e}")
    report_bad(errors, skip_bad, path, len(items))
    return items

def read_jsonl_rows(path: Path, repair: bool = False, numbered: bool = False) -> list:
    """Rows of a JSONL file we append to. A cut-off last line (a killed run) is dropped, and with repair cut
    from the file so that appending goes on cleanly; a bad line elsewhere is a DataError naming file:line.
    numbered: (line number, row) pairs."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete, _, tail = raw.rpartition(b"\n")  # every line we write ends in a newline: only a tail can be cut off
    rows = []
    for number, line in enumerate(complete.split(b"\n") if complete else [], 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e}); fix or delete the line") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if tail.strip():
        try:
            row = json.loads(tail)
        except ValueError:
            row = None
        if isinstance(row, dict):  # complete, only its newline is missing
            rows.append((raw.count(b"\n") + 1, row))
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
        else:
            print(f"warning: {path}: dropping a cut-off last line (an interrupted run); it will be redone",
                  file=sys.stderr)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(len(raw) - len(tail))
    return rows if numbered else [row for _, row in rows]


def report_bad(errors: list[str], skip_bad: bool, what, kept: int) -> None:
    """Raise one DataError listing bad items, or (skip_bad) warn on stderr and go on."""
    if errors and not skip_bad:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad record(s) in {what} (--skip-bad-records skips them):\n"
                        + "\n".join(errors[:20]) + more)
    if errors:
        print(f"warning: skipped {len(errors)} bad record(s) in {what}, kept {kept}; first:",
              *errors[:3], sep="\n  ", file=sys.stderr)

def file_kind(obj: dict) -> str:
    """Which of the project's JSON files an object comes from: records, pairs, candidates or predictions."""
    if "chosen_box" in obj or "chosen_answer" in obj:
        return "pairs"
    if "candidates" in obj and "verdict" in obj:
        return "candidates"
    if "box_mode" in obj or "set" in obj:
        return "predictions"
    return "records"

_KIND_HINTS = {
    "records": "a records file (question, answer, image; written by you or `visrl.py synth`): train SFT on it, "
               "or make pairs from it with generate.py",
    "pairs": "a pairs file (written by generate.py): train on it with `visrl.py dpo --data`",
    "candidates": "generate.py's candidates log: its pairs are in pairs.jsonl beside it",
    "predictions": "evaluate.py's predictions: re-score them with `evaluate.py --predictions`"}

def check_kind(obj: dict, expected: str, path) -> None:
    """A file of the wrong kind is named as such, not reported as a record missing every field."""
    kind = file_kind(obj)
    if kind != expected:
        raise DataError(f"{path}: this is {_KIND_HINTS[kind]}; a {expected} file is wanted here")

def read_records(path, image_root=None, skip_bad: bool = False, limit: int | None = None) -> list[Record]:
    """Read Visual-CoT metadata .jsonl, Visual-CoT conversation .json or our .jsonl; every record checked."""
    kind = []  # the format is decided once per file, by its first object

    def build(obj, name, root, source):
        if not kind:
            check_kind(obj, "records", path)
            kind.append(_from_vcot_conv if "conversations" in obj else
                        _from_ours if "answers" in obj or "boxes" in obj else _from_vcot_meta)
        return _record(kind[0](obj, name), root, source)

    return _read(path, image_root, skip_bad, limit, build)

def cache_dir() -> Path:
    """Where built-in assets (tiny model, synthetic data) are written: $VISRL_CACHE or ~/.cache/visrl."""
    return Path(os.environ.get("VISRL_CACHE", Path.home() / ".cache" / "visrl"))


def open_rgb(path, source: str | None = None) -> Image.Image:
    """An image file as RGB (every reader's one opener); a missing or unreadable file is a DataError naming
    the record (source, its file:line) or else the file."""
    where = f"{source}: field 'image': {path}" if source else str(path)
    if not Path(path).is_file():
        raise DataError(f"{where}: no such image file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error ...) for bad files
        raise DataError(f"{where}: cannot read the image: {e}") from e


def load_image(record: Record) -> Image.Image:
    """The record's image as RGB."""
    return open_rgb(record.image, record.source)

def relative_image(image, base_dir) -> str:
    """An image path relative to base_dir when inside it (both resolved, as path_inside resolves), else absolute."""
    img, base = os.path.abspath(image), str(Path(base_dir).resolve())
    return os.path.relpath(img, base) if os.path.commonpath([img, base]) == base else img

def write_records(path, records: list[Record]) -> None:
    """Write our JSONL; image paths relative to the file's folder when inside it, else absolute
    (read those back with an image_root that contains them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            rel = relative_image(r.image, path.parent)
            boxes = [[int(v) if float(v).is_integer() else v for v in b] for b in r.boxes]  # 217, not 217.0
            f.write(json.dumps({"id": r.id, "image": rel, "question": r.question, "answers": r.answers,
                                "boxes": boxes, "width": r.width, "height": r.height}) + "\n")

# -----------------------------------------------------------------------------
# preference pairs: what generate.py writes and `visrl.py dpo` reads. One JSON object per line:
# our record fields (id, image, question, answers, boxes?, width?, height?) plus the model's own
# texts chosen_box, rejected_box, chosen_answer, rejected_answer and the box_form they are in.

PAIR_FIELDS = ("chosen_box", "rejected_box", "chosen_answer", "rejected_answer")

@dataclass
class Pair:
    """One self-generated preference pair about one record."""
    record: Record
    chosen_box: str       # box text as the model wrote it
    rejected_box: str
    chosen_answer: str
    rejected_answer: str
    box_form: str = "square"

def _pair(obj, name, root, source):
    record = _record(_from_ours(obj, name), root, source)
    texts = []
    for key in PAIR_FIELDS:
        text = field(obj, key, str, "a string")
        if not text.strip():
            raise BadField(key, "empty response")
        texts.append(text)
    form = field(obj, "box_form", str, "a string", required=False) or "square"
    if form not in BOX_FORMS:
        raise BadField("box_form", f"expected one of {BOX_FORMS}, got {form!r}")
    return Pair(record, *texts, box_form=form)

def read_pairs(path, image_root=None, skip_bad: bool = False, limit: int | None = None) -> list[Pair]:
    """Read preference pairs (JSONL); a missing or empty chosen/rejected text is an error with file:line.
    Image paths are relative to image_root, else to the root each line records (generate.py writes it),
    else to the file's folder."""
    checked = []

    def build(obj, name, root, source):
        if not checked:
            check_kind(obj, "pairs", path)
            checked.append(True)
        recorded = obj.get("image_root")
        if image_root is None and isinstance(recorded, str) and recorded:
            root = str(Path(recorded).resolve())
        return _pair(obj, name, root, source)

    return _read(path, image_root, skip_bad, limit, build)

def pair_json(pair: Pair, base_dir) -> dict:
    """The JSON object of a pair; the image path relative to base_dir when inside it, base_dir recorded."""
    r = pair.record
    return {"id": r.id, "image": relative_image(r.image, base_dir), "image_root": str(Path(base_dir).resolve()), "question": r.question, "answers": r.answers,
            "boxes": [list(b) for b in r.boxes], "width": r.width, "height": r.height,
            "chosen_box": pair.chosen_box, "rejected_box": pair.rejected_box,
            "chosen_answer": pair.chosen_answer, "rejected_answer": pair.rejected_answer,
            "box_form": pair.box_form}

# -----------------------------------------------------------------------------
# Tokenisation: messages -> Qwen chat text -> token ids (image placeholders expanded) -> batches.
# Rendering is done here, not by a checkpoint's template, so that train and test prompts can
# never drift apart; tests check it against the Qwen chat template byte for byte.

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The Qwen chat format: default system prompt, each image as <|vision_start|><|image_pad|><|vision_end|>."""
    text = "" if messages and messages[0]["role"] == "system" else f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"] for part in content)
        text += f"<|im_start|>{message['role']}\n{content}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def image_grid(width: int, height: int, image_processor) -> tuple[int, int]:
    """(grid_h, grid_w) in patches the image processor will produce for an image of this size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = image_processor.patch_size, image_processor.merge_size
    h, w = smart_resize(height, width, factor=patch * merge,
                        min_pixels=image_processor.size["shortest_edge"],
                        max_pixels=image_processor.size["longest_edge"])
    return h // patch, w // patch


def image_token_count(width: int, height: int, image_processor) -> int:
    """How many <|image_pad|> tokens stand for one image of this size."""
    grid_h, grid_w = image_grid(width, height, image_processor)
    return grid_h * grid_w // image_processor.merge_size**2


def model_view_size(width: int, height: int, image_processor) -> tuple[int, int]:
    """(w, h) of the resized image the model sees (for the `pixel` box form)."""
    grid_h, grid_w = image_grid(width, height, image_processor)
    return grid_w * image_processor.patch_size, grid_h * image_processor.patch_size


def encode(tokenizer, image_processor, messages: list[dict], image_sizes: list[tuple[int, int]],
           response: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels; only the response and its <|im_end|> are supervised.

    image_sizes: (w, h) of each image in order; each image's single <|image_pad|> is expanded to
    the number of tokens its grid gives, so text and pixels always agree.
    """
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompt_ids = tokenizer(render_chat(messages), add_special_tokens=False)["input_ids"]
    counts = iter([image_token_count(w, h, image_processor) for w, h in image_sizes])
    input_ids = []
    for tok in prompt_ids:
        input_ids.extend([image_pad] * next(counts) if tok == image_pad else [tok])
    if next(counts, None) is not None:
        raise ValueError(f"{len(image_sizes)} images given but the prompt has fewer image placeholders")
    labels = [IGNORE_INDEX] * len(input_ids)
    if response is not None:
        response_ids = tokenizer(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
        input_ids += response_ids
        labels += response_ids
    return input_ids, labels


Window = tuple[int, int, int, int]


@dataclass
class Sample:
    """One sequence: ids and labels now, its images as windows of the record's image (decoded in collate)."""

    input_ids: list[int]
    labels: list[int]
    record: Record
    images: list[Window | None]  # in token order: None = the whole image, else a crop window of it
    kind: str  # SFT: "focus" | "answer" | "crop"; a DPO pair's side: "box" | "answer"


def sft_samples(record: Record, tokenizer, image_processor, box_form: str = "square",
                crop_rule: str = "vcot", crop_alone: bool = False) -> list[Sample]:
    """The supervised samples of an annotated record: focus (box text) and answer (with the crop); with
    crop_alone also the bare question on the crop alone, which generate.py's rule scorer asks when a
    record has no box annotation."""
    box = record.box
    if box is None:
        return []
    size = (record.width, record.height)
    resized = model_view_size(record.width, record.height, image_processor) if box_form == "pixel" else None
    box_text = box_to_text(box, record.width, record.height, form=box_form, resized=resized)
    samples = [Sample(*encode(tokenizer, image_processor, focus_messages(record.question), [size], box_text),
                      record, [None], "focus")]
    window = crop_window(box, record.width, record.height, rule=crop_rule)
    crop_size = (window[2] - window[0], window[3] - window[1])
    samples.append(Sample(*encode(tokenizer, image_processor, answer_messages(record.question), [size, crop_size],
                                  record.answer), record, [None, window], "answer"))
    if crop_alone:
        samples.append(Sample(*encode(tokenizer, image_processor, direct_messages(record.question), [crop_size],
                                      record.answer), record, [window], "crop"))
    return samples


def collate(rows: list[Sample], image_processor, pad_id: int, image_token_id: int,
            pixel_cache: dict | None = None) -> dict:
    """Right-pad rows into one batch (SFT samples, or a DPO batch's chosen then rejected rows). Each distinct
    image (a page, a crop window of it) is processed once and referenced by every row that shows it; with a
    pixel_cache (a dict the caller keeps) once per run. Response positions are listed for the fused log-probs."""
    import torch

    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    unique: dict[tuple, int] = {}  # (image path, crop window or None) -> index into the unique images
    views, image_index, response_index, response_row, response_targets = [], [], [], [], []
    for r, row in enumerate(rows):
        input_ids[r, :len(row.input_ids)] = torch.as_tensor(row.input_ids)
        attention_mask[r, :len(row.input_ids)] = 1
        for window in row.images:
            key = (row.record.image, window)
            if key not in unique:
                unique[key] = len(unique)
                views.append((row.record, window))
            image_index.append(unique[key])
        for t in range(1, len(row.input_ids)):  # hidden state at t - 1 predicts token t
            if row.labels[t] != IGNORE_INDEX:
                response_index.append(r * length + t - 1)
                response_row.append(r)
                response_targets.append(row.labels[t])
    cache = {} if pixel_cache is None else pixel_cache
    opened = {}  # each file decoded once per batch
    for record, window in views:
        if (record.image, window) not in cache:
            if record.image not in opened:
                opened[record.image] = load_image(record)
            image = opened[record.image] if window is None else opened[record.image].crop(window)
            out = image_processor(images=[image], return_tensors="pt")  # one by one, as the processor does a list
            cache[record.image, window] = (out["pixel_values"], out["image_grid_thw"])
    pixels = [cache[record.image, window] for record, window in views]
    grid = torch.cat([g for _, g in pixels])  # [U, 3]
    return {
        "input_ids": input_ids,  # [R, L]
        "attention_mask": attention_mask,  # [R, L]
        "mm_token_type_ids": (input_ids == image_token_id).int(),  # [R, L] 1 = image token; drives mrope positions
        "pixel_values": torch.cat([p for p, _ in pixels]),  # [patches of the U unique images, C*T*P*P]
        "image_grid_thw": grid,  # [U, 3]
        "image_index": image_index,  # host list: the unique image of each row image, in token order
        "row_grid_thw": grid[torch.as_tensor(image_index, dtype=torch.long)],  # [row images, 3]
        "response_index": torch.as_tensor(response_index, dtype=torch.long),  # [N] into [R * L]
        "response_row": torch.as_tensor(response_row, dtype=torch.long),  # [N]
        "response_targets": torch.as_tensor(response_targets, dtype=torch.long),  # [N]
    }


@dataclass
class PairSample:
    """One step of a preference pair: chosen and rejected sequences sharing one prompt."""

    kind: str  # "box" (focus step) | "answer" (answer step)
    chosen: Sample
    rejected: Sample
    pair: Pair
    index: int = 0  # position in the run's sample list (keys precomputed reference log-probs)


def dpo_samples(pair: Pair, tokenizer, image_processor, stage: int, crop_rule: str = "vcot",
                rejected_crop: str = "chosen") -> list[PairSample]:
    """Stage 1: the box pair for [image] + question. Stage 2 adds the answer pair for
    [image, crop] + question, both answers on the chosen box's crop (upstream) or each on its own."""
    r = pair.record
    size = (r.width, r.height)

    def side(messages, sizes, response, images, kind):
        return Sample(*encode(tokenizer, image_processor, messages, sizes, response), r, images, kind)

    focus = focus_messages(r.question)
    box = PairSample("box", side(focus, [size], pair.chosen_box, [None], "box"),
                     side(focus, [size], pair.rejected_box, [None], "box"), pair)
    if stage == 1:
        return _distinct([box])
    resized = model_view_size(r.width, r.height, image_processor) if pair.box_form == "pixel" else None

    def window(key):
        pixel_box = text_to_box(getattr(pair, key), r.width, r.height, form=pair.box_form, resized=resized)
        if pixel_box is None:
            raise DataError(f"{r.source}: field '{key}': box {getattr(pair, key)[:60]!r} does not parse "
                            f"as a {pair.box_form} box inside the {r.width}x{r.height} image (stage 2 crops it)")
        return crop_window(pixel_box, r.width, r.height, rule=crop_rule)

    chosen_window = window("chosen_box")
    rejected_window = chosen_window if rejected_crop == "chosen" else window("rejected_box")
    sizes = [(w[2] - w[0], w[3] - w[1]) for w in (chosen_window, rejected_window)]
    messages = answer_messages(r.question)
    answer = PairSample("answer", side(messages, [size, sizes[0]], pair.chosen_answer, [None, chosen_window], "answer"),
                        side(messages, [size, sizes[1]], pair.rejected_answer, [None, rejected_window], "answer"),
                        pair)
    return _distinct([box, answer])


def _distinct(samples: list[PairSample]) -> list[PairSample]:
    """The samples whose chosen and rejected sequences differ: an identical one has loss ln 2 and zero gradient
    (a stage-2 pair with one box for both answers keeps its answer step). None left is a DataError."""
    kept = [s for s in samples if s.chosen.input_ids != s.rejected.input_ids or s.chosen.images != s.rejected.images]
    if not kept:
        what = samples[-1].kind
        raise DataError(f"{samples[0].pair.record.source}: field 'rejected_{what}': the same as 'chosen_{what}' "
                        f"({getattr(samples[0].pair, 'chosen_' + what)[:40]!r}): the pair teaches nothing")
    return kept

# -----------------------------------------------------------------------------
# entry points: an expected error is one line a user can act on; an --out never destroys an input or a run

@dataclass
class RunConfig:
    """What every pipeline stage (sft, generate, dpo, eval) is told: the model, the data, where its run goes."""

    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl` (built on first use)
    adapter: str | None = None  # a trained adapter, merged into the base first (with its parent chain)
    data: str = "synth"  # records: Visual-CoT .jsonl/.json or ours, a directory with <split>.jsonl, or `synth`
    image_root: str | None = None  # image paths are relative to this (default: the data file's directory)
    out: str = "runs/out"  # the run's directory (each command has its own default)
    limit: int | None = None  # the first N records only
    seed: int = 0
    skip_bad_records: bool = False  # skip (and report) malformed records instead of stopping
    # replace the run in --out (only this command's files); without it generate and eval resume a rerun with the
    # same settings, sft and dpo refuse one unless --resume
    overwrite: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


def cli(parse, run) -> None:
    """Run an entry point: run(parse()). An expected error (UserError) prints `error: <message>` once (rank 0
    under torchrun) and exits 2; anything else is a bug and keeps its traceback. `--debug` anywhere on the
    command line, or VISRL_DEBUG=1, prints the traceback of expected errors too."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("VISRL_DEBUG", "0") not in ("", "0")
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--debug"]
    try:
        run(parse())
    except UserError as e:
        if debug:
            traceback.print_exc()
        if int(os.environ.get("RANK", "0")) == 0 or debug:  # every rank meets the same check: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents

def check_out(out, run_files, *, inputs=(), data_files=(), resume=False, overwrite=False,
              resumable=True) -> list[Path]:
    """Refuse an --out that would destroy what this invocation did not create; returns the files of an earlier
    run that --overwrite replaces (delete them with `clear_run` once every input has been checked).

    inputs: directories read (model, adapter and its parents): --out may not equal, contain or lie inside one.
    data_files: files read: --out may not hold one. run_files: the names this command writes into --out;
    if any exists, --out holds a run: --resume continues it, --overwrite replaces it, else an error."""
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    resolved = out_path.resolve()
    for name, path in inputs:
        if path is not None and _overlaps(resolved, Path(path).resolve()):
            raise UserError(f"--out {out} overlaps the {name} {path}: choose a directory outside it")
    for name, path in data_files:
        if path is not None and resolved in Path(path).resolve().parents:
            raise UserError(f"--out {out} holds the {name} {path}: choose another directory")
    found = [resolved / f for f in run_files if (resolved / f).exists()]
    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if found and not resume and not overwrite:
        ways = "pass --resume to continue it or --overwrite to replace it" if resumable else "pass --overwrite to replace it"
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise UserError(f"--out {out} already holds a run ({names}); {ways} (or choose another --out)")
    return found if overwrite else []

def check_settings(out, command: str, settings: dict, keys, how: str) -> None:
    """Refuse to go on with the run in --out when its config.json was written by another command, or by this one
    with other values of `keys` (what a rerun must keep); `how` says how this command goes on with a run."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); pass --overwrite to replace the run, or choose another --out")
    if not isinstance(old, dict):
        raise UserError(f"{path}: not a run's config; pass --overwrite to replace the run, or choose another --out")
    if old.get("command", command) != command:
        raise UserError(f"--out {out} holds a `{old['command']}` run, not a `{command}` one; choose another --out")
    changed = [k for k in keys if old.get(k, settings[k]) != settings[k]]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {settings[k]!r}" for k in changed)
        raise UserError(f"--out {out} holds a run made with other settings ({detail}); {how} with the same "
                        "settings, pass --overwrite to replace it, or choose another --out")

def write_config(out, command: str, settings: dict) -> None:
    """<out>/config.json: the command and its settings, written whole (a kill leaves the old one or the new)."""
    path = Path(out) / "config.json"
    tmp = path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps({"command": command, **settings}, indent=2), encoding="utf-8")
    os.replace(tmp, path)

def clear_run(paths: list[Path]) -> None:
    """Delete an earlier run's files (what check_out returned for --overwrite)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
