"""Data for visrl, the one reading and I/O layer: records (ours, Visual-CoT's) and pairs (ours, upstream VisRL's)
checked field by field with `file:line: field` errors; images; JSONL files with a torn last line; paths kept inside
their root. Model texts are in chat.py, shared flags and errors in runs.py. Only stdlib and pillow at import time."""

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# -----------------------------------------------------------------------------
# boxes: (x1, y1, x2, y2) in pixels of the original image (their text forms: chat.py)

Box = tuple[float, float, float, float]
BOX_FORMS = ("square", "axis", "pixel", "rel1000")  # how a box is written as text: chat.box_to_text
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?i:\bnan\b|\binf(?:inity)?\b)")

def union_box(boxes: list[Box]) -> Box:
    """Several ground-truth boxes merge into their union (as Visual-CoT's data conversion does)."""
    if not boxes:
        raise ValueError("union_box of no boxes")
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)

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
    dataset: str = ""        # Visual-CoT's subset name, where the file gives it (upstream's question pool)
    steps: tuple[str, ...] = ("focus", "answer")  # the SFT steps it teaches: upstream's round files hold one each
    box_text: str | None = None  # the box step's reply as the file writes it (upstream's round 1 has no pixel box)

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
    """An image path that is malformed or leaves its root (after resolving symlinks and '..'). The message names only
    the path as given, never the root: servers pass it on to clients."""
    def __init__(self, message: str, outside: bool = False):
        super().__init__(message)
        self.outside = outside

NAME_MAX = 255  # bytes in one path component (Linux's NAME_MAX)

def path_inside(root, rel: str) -> Path:
    """root / rel with symlinks and '..' resolved; PathError unless it lies in root's resolved tree. What is checked is
    what is opened: a link in the root pointing outside is refused; a root that is (or holds) links within it works."""
    if not isinstance(rel, str) or not rel:
        raise PathError("empty image path")
    if "\x00" in rel:
        raise PathError(f"{rel[:60]!r}: NUL byte in the image path")
    try:
        if len(rel.encode()) > 4096 or any(len(part.encode()) > NAME_MAX for part in Path(rel).parts):
            raise PathError(f"{rel[:60]!r}...: image path or one of its names too long")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800") names no file
        raise PathError(f"{rel[:60]!r}: the image path is not valid text") from None
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
    """A list of [x1, y1, x2, y2]: right length, finite, not inverted unless inverted_ok (benchmark ground truth)."""
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
# where a box-step prompt's question ends: Visual-CoT's two instructions, and VisRL's (its pair files)
FOCUS_CUTS = (BOX_CUT, " Please think step by step and provide the bounding box",
              " Please first provide the bounding box")

def _question(prompt: str) -> str:
    """The question of a box-step prompt: the <image> tag and the focus instruction cut off."""
    question = prompt.replace("<image>\n", "").replace("<image>", "")
    for cut in FOCUS_CUTS:
        question = question.split(cut)[0]
    return question.strip()

def _from_vcot_meta(obj, name):
    """Visual-CoT metadata/*.jsonl: question, answer, image, width, height, bboxs (+ dataset, split)."""
    rel, dataset = field(obj, "image", str, "an image path"), obj.get("dataset")
    # the release keeps images under cot/<dataset>/, textcap's under textvqa
    sub = "textvqa" if dataset == "textcap" else dataset
    extra = (os.path.join("cot", sub, rel), os.path.join(sub, rel)) if isinstance(dataset, str) else ()
    return dict(id=str(obj.get("question_id", name)), image=rel, extra=extra,
                question=field(obj, "question", str, "a string"), answers=_answers(obj, "answer"),
                boxes=boxes_field(field(obj, "bboxs", list, "a list of [x1, y1, x2, y2]"), "bboxs"), box_key="bboxs",
                width=field(obj, "width", int, "an integer"), height=field(obj, "height", int, "an integer"),
                dataset=dataset if isinstance(dataset, str) else "")

CROP_NAME = re.compile(r"_(\d+)_(\d+)_(\d+)_(\d+)\.[A-Za-z0-9]+$")  # sft_format_round2.py: <name>_x1_y1_x2_y2.jpg

def from_vcot_conversation(obj, name, inverted_ok=False):
    """Visual-CoT's conversation form, its one parser (also for viscot.py): an item of the conversation .json (image
    [path, 'path###[x1, y1, x2, y2]'], 4 turns: both steps), or of upstream VisRL's SFT round files (ShareGPT, 2 turns,
    `preprocess/`): round 1, image [path] and the box text (focus step); round 2, image [path, crop file
    <name>_x1_y1_x2_y2.jpg (sft_format_round2.py)] and the answer (answer step). inverted_ok: boxes read as they are."""
    images = field(obj, "image", list, "a list of image paths")
    turns = field(obj, "conversations", list, "a list of turns")
    if not images or not all(isinstance(s, str) for s in images):
        raise BadField("image", "expected a list of image paths")
    if len(turns) not in (2, 4) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise BadField("conversations", "expected 4 turns {from, value} (Visual-CoT: question, box, <image>, answer) "
                                        "or 2 (an upstream SFT round: prompt, reply)")
    record = dict(id=str(obj.get("question_id", name)), image=images[0], extra=(),
                  question=_question(turns[0]["value"]), answers=[turns[-1]["value"]], boxes=[], box_key="image",
                  width=None, height=None, dataset=obj.get("dataset") if isinstance(obj.get("dataset"), str) else "")
    if len(turns) == 2 and len(images) == 1:  # round 1: the box as written (square, 3 decimals)
        if "[" not in turns[1]["value"] or len(NUMBER.findall(turns[1]["value"])) < 4:
            raise BadField("conversations", f"round 1's reply {turns[1]['value'][:40]!r} is not a box")
        return {**record, "answers": [], "steps": ("focus",), "box_text": turns[1]["value"]}
    if len(images) < 2:
        raise BadField("image",
                       "expected a second image: 'path###[x1, y1, x2, y2]' or a crop file <name>_x1_y1_x2_y2.jpg")
    if "###" in images[1]:  # the pixel box after '###' (the gpt box turn is the same box, rounded to 3 decimals)
        nums = [float(m.group()) for m in NUMBER.finditer(images[1].split("###", 1)[1])]
    elif crop_name := CROP_NAME.search(images[1]):
        nums = [float(v) for v in crop_name.groups()]
    else:
        raise BadField("image", f"second image {images[1][:60]!r}: expected 'path###[x1, y1, x2, y2]' or a crop "
                                "file <name>_x1_y1_x2_y2.jpg (sft_format_round2.py)")
    steps = ("focus", "answer") if len(turns) == 4 else ("answer",)
    return {**record, "boxes": boxes_field([nums], "image", inverted_ok), "steps": steps}

def _from_ours(obj, name):
    """Our JSONL: id, image, question, answers, boxes (optional), width/height (optional)."""
    qid = field(obj, "id", (str, int), "a string or an integer", required=False)
    return dict(id=str(name if qid is None else qid), image=field(obj, "image", str, "an image path"),
                extra=(), question=field(obj, "question", str, "a string"), answers=_answers(obj, "answers"),
                boxes=boxes_field(obj.get("boxes", []), "boxes"), box_key="boxes",
                width=field(obj, "width", int, "an integer", required=False),
                height=field(obj, "height", int, "an integer", required=False))

def find_image(rel, candidates, root, key="image"):
    """The first of rel and the release's other layouts that is a file inside root; leaving the root is an error."""
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
    return Record(r["id"], path, r["question"], r["answers"], r["boxes"], w, h, source, r.get("dataset", ""),
                  r.get("steps", ("focus", "answer")), r.get("box_text"))

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

def read_objects(path, build, errors: list[str], limit: int | None = None) -> list:
    """build(obj, line, pos) for each JSON object of a JSON list or JSONL file (pos: its index among the file's items)
    until limit are built; a bad item (build raises BadField) goes to errors as 'file:line: problem'."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    items = []
    for pos, (line, obj) in enumerate(json_items(text)):
        if limit is not None and len(items) >= limit:
            break
        if isinstance(obj, str):
            errors.append(f"{path}:{line}: {obj}")
        elif not isinstance(obj, dict):
            errors.append(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        else:
            try:
                items.append(build(obj, line, pos))
            except BadField as e:
                errors.append(f"{path}:{line}: {e}")
    return items

def _read(path, image_root, skip_bad, limit, build) -> list:
    """build(obj, name, root, source) for each object of a JSON list or JSONL file; bad items go to report_bad."""
    path, errors = Path(path), []
    root = str(Path(image_root if image_root is not None else path.parent).resolve())
    items = read_objects(path, lambda obj, line, _: build(obj, f"{path.stem}-{line}", root, f"{path}:{line}"),
                         errors, limit)
    report_bad(errors, skip_bad, path, len(items))
    return items

def read_jsonl_rows(path: Path, repair: bool = False, numbered: bool = False) -> list:
    """Rows (numbered: (line, row) pairs) of a JSONL file we append to. A cut-off last line (a killed run) is dropped,
    with repair cut from the file too; a bad line elsewhere is a DataError naming file:line."""
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
    if "chosen_box" in obj or "chosen_answer" in obj or "chosen_step" in obj:
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
    if (kind := file_kind(obj)) != expected:
        raise DataError(f"{path}: this is {_KIND_HINTS[kind]}; a {expected} file is wanted here")

def read_records(path, image_root=None, skip_bad: bool = False, limit: int | None = None) -> list[Record]:
    """Read Visual-CoT metadata .jsonl, Visual-CoT conversation .json or our .jsonl; every record checked."""
    kind = []  # the format is decided once per file, by its first object

    def build(obj, name, root, source):
        if not kind:
            check_kind(obj, "records", path)
            kind.append(from_vcot_conversation if "conversations" in obj else
                        _from_ours if "answers" in obj or "boxes" in obj else _from_vcot_meta)
        return _record(kind[0](obj, name), root, source)

    return _read(path, image_root, skip_bad, limit, build)

def upstream_question_pool(records: list[Record]) -> list[Record]:
    """Upstream's generation questions (`preprocess/sample.py`): items 10000-20000 of each Visual-CoT subset (by
    `dataset`, lower-cased, in file order; subsets in order of first appearance), docvqa excluded."""
    subsets: dict[str, list[Record]] = {}
    for r in records:
        subsets.setdefault(r.dataset.lower(), []).append(r)
    return [r for name, items in subsets.items() if name != "docvqa" for r in items[10000:20000]]

def cache_dir() -> Path:
    """Where built-in assets (tiny model, synthetic data) are written: $VISRL_CACHE or ~/.cache/visrl."""
    return Path(os.environ.get("VISRL_CACHE", Path.home() / ".cache" / "visrl"))

def check_new_dir(out) -> None:
    """Commands that write a whole directory (the built-in assets) refuse one that exists and is not empty."""
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose another --out (or delete it first)")

def open_rgb(path, source: str | None = None) -> Image.Image:
    """An image file as RGB; a missing or unreadable one is a DataError naming source (file:line) or else the file."""
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
    """Write our JSONL; image paths relative to the file's folder when inside it, else absolute."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            boxes = [[int(v) if float(v).is_integer() else v for v in b] for b in r.boxes]  # 217, not 217.0
            f.write(json.dumps({"id": r.id, "image": relative_image(r.image, path.parent), "question": r.question,
                                "answers": r.answers, "boxes": boxes, "width": r.width, "height": r.height}) + "\n")

# -----------------------------------------------------------------------------
# preference pairs: what generate.py writes and `visrl.py dpo` reads. One JSON object per line: our record fields (id,
# image, question, answers, boxes?, width?, height?) plus the model's own texts and the box_form they are in.

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

UPSTREAM_PAIR_FIELDS = ("chosen_step", "rejected_step", "chosen", "rejected")  # box turns, then answer turns

def _from_upstream_pair(obj, name):
    """Upstream VisRL's pair item (ShareGPT ranking, `data/dataset_info.json`): images [path], conversations [prompt],
    chosen_step / rejected_step (square box turns), chosen / rejected (answers), each {"from": "gpt", "value": ...}."""
    images = field(obj, "images", list, "a list [path]")
    if not images or not isinstance(images[0], str):
        raise BadField("images", "expected a list [path]")
    turns = field(obj, "conversations", list, "a list of turns")
    if not turns or not isinstance(turns[0], dict) or not isinstance(turns[0].get("value"), str):
        raise BadField("conversations", 'expected [{"from": "human", "value": prompt}]')
    texts = []
    for key in UPSTREAM_PAIR_FIELDS:
        value = field(obj, key, dict, 'a turn {"from": "gpt", "value": ...}').get("value")
        if not isinstance(value, str) or not value.strip():
            raise BadField(key, "expected a non-empty string 'value'")
        texts.append(value)
    return dict(id=str(obj.get("id", name)), image=images[0], extra=(), question=_question(turns[0]["value"]),
                answers=[], boxes=[], box_key="images", width=None, height=None), texts

def _pair(obj, name, root, source):
    if "chosen_step" in obj:  # upstream's file: boxes as Visual-CoT writes them (square, 3 decimals)
        record, texts = _from_upstream_pair(obj, name)
        return Pair(_record(record, root, source), *texts, box_form="square")
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
    """Read preference pairs, ours (generate.py's JSONL) or upstream VisRL's (a JSON list with chosen_step); a missing
    or empty text is an error. Image paths are relative to image_root, else to the root each line records, else to the
    file's folder."""
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
    return {"id": r.id, "image": relative_image(r.image, base_dir), "image_root": str(Path(base_dir).resolve()),
            "question": r.question, "answers": r.answers, "boxes": [list(b) for b in r.boxes], "width": r.width,
            "height": r.height, "chosen_box": pair.chosen_box, "rejected_box": pair.rejected_box,
            "chosen_answer": pair.chosen_answer, "rejected_answer": pair.rejected_answer, "box_form": pair.box_form}
