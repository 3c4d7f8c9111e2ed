"""What the model reads and writes: the prompt table, boxes as text (parse, IoU), answers against their references,
crop windows, the two-step inference, the Qwen chat format, tokens with labels, and batches: record -> prompt ->
tokens/pixels -> batch, in one place. Cheap to import: stdlib and pillow only (torch inside the batching functions)."""

import json
import math
import random
import re
import string
from dataclasses import dataclass
from itertools import islice

from data import BOX_FORMS, NUMBER, Box, DataError, Pair, Record, load_image

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

PROMPT_SETS = ("upstream", "visrl")
# upstream: each stage's own instruction (LLaMA-Factory data): the focus one for SFT's box step and inference, VisRL's
# for the box step of generation and both DPO stages (`rl=True`), and the newline after the image placeholder.
# visrl: the focus instruction for every box step, no newline (so a box prompt never changes between SFT and DPO).

def _lead(prompts: str) -> str:
    """Text between the first image and the question: LLaMA-Factory keeps the newline after `<image>`."""
    if prompts not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompts!r}, expected one of {PROMPT_SETS}")
    return "\n" if prompts == "upstream" else ""

def focus_messages(question: str, prompts: str = "upstream", rl: bool = False, official: bool = False) -> list[dict]:
    """Step 1 prompt: [image] + question + box instruction; the model replies with a box. rl: the box step of
    generation and DPO (upstream asks it with VisRL's instruction, SFT and inference with the focus one)."""
    if official:  # the Visual-CoT benchmark's test-time text: lower-cased, plus a stray '.'
        text = question.lower() + ". " + FOCUS_INSTRUCTION
    else:
        instruction = VISRL_INSTRUCTION if rl and prompts == "upstream" else FOCUS_INSTRUCTION
        text = _lead(prompts) + question + " " + instruction
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

def rec_messages(expression: str) -> list[dict]:
    """Referring-expression prompt: [image] + Visual-CoT's locate instruction; the model replies with a box."""
    text = REC_PROMPT.format(expression.lower())
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

def answer_messages(question: str, prompts: str = "upstream") -> list[dict]:
    """Step 2 prompt: [image] + question + VisRL's instruction + newline + [crop]; the model replies with the answer
    (upstream's SFT round 2, `preprocess/sft_format_round2.py`, and its generation and stage 2)."""
    text = _lead(prompts) + question + " " + VISRL_INSTRUCTION + "\n"
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}, {"type": "image"}]}]

def vcot_answer_messages(question: str, box_text: str) -> list[dict]:
    """Step 2 as Visual-CoT's evaluation asks it (llava/eval/model_cot_loader.py), three turns: [image] + question;
    the box as the assistant's reply; [crop] + its answer instruction glued to the question (no space between them,
    and a trailing space, exactly as that script's string splits leave them)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + question}]},
            {"role": "assistant", "content": box_text},
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "\n" + VCOT_ANSWER_TEXT + question + " "}]}]

def upstream_test_messages(question: str, step: str) -> list[dict]:
    """Upstream VisRL's test-time requests (extras/test_cot.py l.91, 117-123) as its server reads them: the box step as
    [image] + question + the focus instruction, no space between; the answer step as the bare question after both
    images (images sent without `<image>` placeholders go before the text there)."""
    if step == "box":
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + FOCUS_INSTRUCTION}]}]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]}]

def direct_messages(question: str, prompts: str = "upstream") -> list[dict]:
    """No-box ablation (and the rule scorer's crop-alone question): [image] + the bare question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _lead(prompts) + question}]}]

# -----------------------------------------------------------------------------
# boxes: (x1, y1, x2, y2) in pixels of the original image; text forms square / axis / pixel / rel1000

INTEGER_FORMS = ("pixel", "rel1000")  # written as whole numbers
FORM_LIMIT = {"square": 1.0, "axis": 1.0, "rel1000": 1000.0}  # the largest value inside the image (pixel: its size)

def _divisors(width, height, form, resized):
    """(dx, dy, div_x, div_y) with text value = (pixel + d) / div, and pixel = value * div - d."""
    if form == "square":  # the image centred in Visual-CoT's square of side max(w, h)
        side = max(width, height)
        return (side - width) // 2, (side - height) // 2, side, side
    if form == "axis":
        return 0, 0, width, height
    if form == "rel1000":  # Qwen3-VL's grounding: each side from 0 to 1000 (its cookbooks; round(x / w * 1000))
        return 0, 0, width / 1000, height / 1000
    if form == "pixel":
        if resized is None:
            raise ValueError("box form 'pixel' needs resized=(width, height) of the image the model sees")
        return 0, 0, width / resized[0], height / resized[1]
    raise ValueError(f"unknown box form {form!r}, expected one of {BOX_FORMS}")

def box_to_text(box: Box, width: int, height: int, form: str = "square", resized=None, exact: bool = False) -> str:
    """Box in original pixels -> the text the model writes, e.g. '[0.542, 0.686, 0.592, 0.786]'; exact: every
    digit of each value (what a scorer reads, where 3 decimals would flip a near-threshold IoU)."""
    dx, dy, div_x, div_y = _divisors(width, height, form, resized)
    x1, y1, x2, y2 = box
    # same operations as Visual-CoT's tools/convert_data_to_llava_format.py: add the pad, divide, '%.3f'
    vals = ((x1 + dx) / div_x, (y1 + dy) / div_y, (x2 + dx) / div_x, (y2 + dy) / div_y)
    if exact:
        return "[" + ", ".join(repr(float(v)) for v in vals) + "]"
    return "[" + ", ".join(str(round(v)) if form in INTEGER_FORMS else f"{v:.3f}" for v in vals) + "]"

def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """Lenient parse: the first four numbers of the first [...] group; None (never raises) if unusable."""
    if not isinstance(text, str):
        return None
    start = text.find("[")
    end = text.find("]", start + 1)
    if start < 0 or end < 0:
        return None
    # NUMBER matches nan/inf only so that a reply containing them fails instead of being skipped over
    vals = [float(m.group()) for m in islice(NUMBER.finditer(text, start + 1, end), 4)]
    if len(vals) < 4 or not all(math.isfinite(v) and v >= 0 for v in vals):
        return None
    x1, y1, x2, y2 = vals
    return (x1, y1, x2, y2) if x2 >= x1 and y2 >= y1 else None

def parse_box_reply(text: str) -> tuple[float, float, float, float] | None:
    """Strict parse, upstream generation's (data_gen/generate.py l.137-153): the whole reply is a JSON list whose first
    four entries are numbers (surrounding whitespace aside); None (never raises) otherwise, or if one is negative or
    not finite, or the box is upside down."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(value, list) or len(value) < 4 or any(type(v) not in (int, float) for v in value[:4]):
        return None  # (type, not isinstance: JSON's true/false are no coordinates)
    x1, y1, x2, y2 = vals = tuple(float(v) for v in value[:4])
    if not all(math.isfinite(v) and v >= 0 for v in vals) or x2 < x1 or y2 < y1:
        return None
    return vals

def rewrite_box_text(text: str, form: str = "square") -> str:
    """A parsed box text as upstream writes pair boxes: its four numbers with 3 decimals (pixel, rel1000: integers)."""
    vals = parse_box(text)
    if vals is None:
        raise ValueError(f"box text {text[:60]!r} does not parse")
    return "[" + ", ".join(str(round(v)) if form in INTEGER_FORMS else f"{v:.3f}" for v in vals) + "]"

def text_to_box(text: str, width: int, height: int, form: str = "square", resized=None,
                strict: bool = False) -> Box | None:
    """A model's box text -> original-image pixels, clipped; None if unusable (callers count these). strict: upstream
    generation's reading, parse_box_reply, a normalised value above 1 cut at the image's edge (its crop slices)."""
    vals = parse_box_reply(text) if strict else parse_box(text)
    if vals is None or (not strict and form != "pixel" and max(vals) > FORM_LIMIT.get(form, 1.0) * (1 + 1e-6)):
        return None  # lenient: a value past the form's limit points outside the image, a failure rather than a clip
    dx, dy, div_x, div_y = _divisors(width, height, form, resized)
    x1, x2 = (min(max(v * div_x - dx, 0.0), width) for v in vals[0::2])
    y1, y2 = (min(max(v * div_y - dy, 0.0), height) for v in vals[1::2])
    if strict and (int(x2) <= int(x1) or int(y2) <= int(y1)):
        return None  # upstream's crop, image[int(y1):int(y2), int(x1):int(x2)], is empty: its encoder raises
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None

def view_size(width: int, height: int, form: str, image_processor) -> tuple[int, int] | None:
    """What a `pixel` box counts in: (w, h) of the resized image the model sees; None for the other forms."""
    if form != "pixel":
        return None
    if image_processor is None:
        raise ValueError("box form 'pixel' needs the model's image processor (the size of the image it sees)")
    return model_view_size(width, height, image_processor)

def read_box(text: str, width: int, height: int, form: str = "square", image_processor=None,
             strict: bool = False) -> Box | None:
    """A box text in `form` -> original-image pixels, clipped; None if unusable (text_to_box)."""
    return text_to_box(text, width, height, form, view_size(width, height, form, image_processor), strict)

def write_box(box: Box, width: int, height: int, form: str = "square", image_processor=None) -> str:
    """Original-image pixels -> the box text in `form` (box_to_text)."""
    return box_to_text(box, width, height, form, view_size(width, height, form, image_processor))

def iou(a: Box, b: Box) -> float:
    """Intersection over union, plain floats, no +1 in the areas; 0.0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
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
# answers against their references (offline, no judge): exact match, ANLS, containment. A reference may be one
# string or a list of acceptable strings; the score is the best over the list.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD/VQA-style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())

def _as_list(reference: str | list[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)

def exact_match(prediction: str, reference: str | list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_list(reference)))

def containment(prediction: str, reference: str | list[str]) -> float:
    """1.0 if a normalised reference appears as whole words inside the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(r) and f" {normalize_answer(r)} " in pred for r in _as_list(reference)))

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]

def anls(prediction: str, reference: str | list[str], threshold: float = 0.5) -> float:
    """ANLS (Biten et al. 2019, DocVQA): max over references of 1 - NL if NL < threshold else 0,
    NL = edit distance / max length, on lower-cased, whitespace-stripped strings."""
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in _as_list(reference):
        ref = " ".join(ref.lower().split())
        if not pred and not ref:
            return 1.0
        nl = levenshtein(pred, ref) / max(len(pred), len(ref))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best

def answer_scores(prediction: str, reference: str | list[str]) -> dict[str, float]:
    """All offline scores of one answer: exact match, ANLS, containment."""
    return {"exact_match": exact_match(prediction, reference), "anls": anls(prediction, reference),
            "containment": containment(prediction, reference)}

# -----------------------------------------------------------------------------
# crops: the second image of the answer step

def crop_window(box: Box, width: int, height: int, rule: str = "raw", min_half: int = 112) -> tuple[int, int, int, int]:
    """Integer (left, top, right, bottom) of the crop shown to the model for a box."""
    x1, y1, x2, y2 = box
    if rule == "raw":  # VisRL's own crop: the box itself, rounded outward, at least 1 px
        left, top = min(max(math.floor(x1), 0), width - 1), min(max(math.floor(y1), 0), height - 1)
        right, bottom = min(max(math.ceil(x2), left + 1), width), min(max(math.ceil(y2), top + 1), height)
        return left, top, right, bottom
    if rule != "vcot":
        raise ValueError(f"unknown crop rule {rule!r}, expected 'vcot' or 'raw'")
    # Matches cropwithbbox() in deepcs233/Visual-CoT llava/eval/model_cot_loader.py step by step: floor division applied
    # to the coordinates as given (ints or floats), half side at least min_half, shift back inside at the top/left then
    # the bottom/right, then clip. Deviation: upstream gets here from the box text (its 'sum < 5' test picks normalised
    # vs pixels) and does not clip the far side before centring; our boxes are already original pixels, clipped by
    # text_to_box. Like upstream, a box with an odd side above 2 * min_half may lose its last pixel row/column.
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
    return int(max(0, cx - half)), int(max(0, cy - half)), int(min(width, cx + half)), int(min(height, cy + half))

# -----------------------------------------------------------------------------
# the two-step inference, written once: evaluate, infer, serve and generate call it

def two_step(generate_fn, images: list, focus_prompts: list[list[dict]], questions: list[str | None],
             crop_rule: str = "raw", prompts: str = "upstream", boxes: list[tuple[str, tuple]] | None = None,
             answer_form: str = "recipe", box_form: str = "square", image_processor=None) -> list[dict]:
    """Visual-CoT inference, one row per image: step 1 asks for a box (focus_prompts, or `boxes` given as (text, pixel
    box) per image, e.g. the ablations) -> parse -> crop (an unusable box crops the whole image, as upstream's fallback
    box [0, 0, 1, 1] does) -> step 2 answers with image and crop (a None question: no answer step, e.g. REC;
    answer_form: the recipe's prompt, `vcot` Visual-CoT's 3 turns, `upstream-test` upstream's test script's). generate_fn: [(messages, images)] -> reply texts; boxes are read in box_form
    (pixel: needs image_processor). Rows: box_text, box (pixels or None), box_parsed, crop, answer (stripped)."""
    if boxes is None:
        texts = [t.strip() for t in generate_fn([(m, [im]) for m, im in zip(focus_prompts, images)])]
        boxes = [(text, read_box(text, *im.size, box_form, image_processor)) for text, im in zip(texts, images)]
    rows, crops = [], []
    for im, (text, box) in zip(images, boxes):
        w, h = im.size
        window = crop_window(box if box is not None else (0, 0, w, h), w, h, rule=crop_rule)
        rows.append({"box_text": text, "box": None if box is None else [float(v) for v in box],
                     "box_parsed": box is not None, "crop": list(window), "answer": None})
        crops.append(im.crop(window))
    asks = [i for i, q in enumerate(questions) if q is not None]
    if asks:
        forms = {"recipe": lambda i: answer_messages(questions[i], prompts),
                 "vcot": lambda i: vcot_answer_messages(questions[i], rows[i]["box_text"]),
                 "upstream-test": lambda i: upstream_test_messages(questions[i], "answer")}
        answer_prompts = [forms[answer_form](i) for i in asks]
        replies = generate_fn([(prompt, [images[i], crops[i]]) for prompt, i in zip(answer_prompts, asks)])
        for i, reply in zip(asks, replies):
            rows[i]["answer"] = reply.strip()
    return rows

# -----------------------------------------------------------------------------
# Tokenisation: messages -> Qwen chat text -> token ids (image placeholders expanded) -> batches. Rendered here, not by
# a checkpoint's template, so train and test prompts never drift apart (tests check it byte for byte against Qwen's).

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

CHAT_FORMS = ("qwen2", "qwen3-vl", "qwen3.5")  # each family's template (model.CHAT_FORM_OF)

def render_chat(messages: list[dict], add_generation_prompt: bool = True, form: str = "qwen2") -> str:
    """The Qwen chat format of the model's family, each image as <|vision_start|><|image_pad|><|vision_end|>. qwen2
    (Qwen2-VL, Qwen2.5-VL): a default system prompt. qwen3-vl: none. qwen3.5: none, and an assistant turn after the
    last user turn opens with an empty think block (its template with thinking off: replies without reasoning, as
    VisRL's are)."""
    if form not in CHAT_FORMS:
        raise ValueError(f"unknown chat form {form!r}, expected one of {CHAT_FORMS}")
    text = ("" if form != "qwen2" or (messages and messages[0]["role"] == "system")
            else f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    think = "<think>\n\n</think>\n\n" if form == "qwen3.5" else ""
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, message in enumerate(messages):
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"] for part in content)
        opening = think if message["role"] == "assistant" and i > last_query else ""  # earlier turns drop theirs
        text += f"<|im_start|>{message['role']}\n{opening}{content}<|im_end|>\n"
    return text + (f"<|im_start|>assistant\n{think}" if add_generation_prompt else "")

def _fit_steps(width: int, height: int, max_pixels: int) -> list[tuple[int, int]]:
    """The successive NEAREST resizes of upstream's image rule (LLaMA-Factory `mm_plugin.py`: `_preprocess_image` and
    Qwen2-VL's override): over max_pixels both sides scale by sqrt(max_pixels / (w * h)), truncated; then every side at
    least 28; then an aspect ratio over 200 is cut to 180. max_pixels 0: no steps at all."""
    steps = []
    if not max_pixels:
        return steps
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        steps.append((width, height))
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
        steps.append((width, height))
    if width / height > 200:
        width = height * 180
        steps.append((width, height))
    if height / width > 200:
        height = width * 180
        steps.append((width, height))
    return steps

def fitted_size(width: int, height: int, image_processor) -> tuple[int, int]:
    """(w, h) of an image after the run's pixel cap (`image_processor.visrl_max_pixels`), before the processor."""
    steps = _fit_steps(width, height, getattr(image_processor, "visrl_max_pixels", 0))
    return steps[-1] if steps else (width, height)

def fit_image(image, image_processor):
    """The image as the processor gets it: resized step by step as upstream does (NEAREST), or unchanged."""
    return cap_image(image, getattr(image_processor, "visrl_max_pixels", 0))

def cap_image(image, max_pixels: int):
    """The image under upstream's pixel cap (_fit_steps, NEAREST); max_pixels 0: unchanged."""
    from PIL import Image

    for size in _fit_steps(image.width, image.height, max_pixels):
        image = image.resize(size, resample=Image.NEAREST)
    return image

def image_grid(width: int, height: int, image_processor) -> tuple[int, int]:
    """(grid_h, grid_w) in patches the image processor will produce for an image of this size (after the cap)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    width, height = fitted_size(width, height, image_processor)
    patch, merge = image_processor.patch_size, image_processor.merge_size
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=image_processor.size["shortest_edge"],
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
    """Token ids and labels; only the response and its <|im_end|> are supervised. image_sizes: (w, h) of each image
    in order; each image's <|image_pad|> is expanded to the tokens its grid gives, so text and pixels always agree."""
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    form = getattr(tokenizer, "visrl_chat_form", "qwen2")  # set by model.load_processor from the checkpoint's type
    prompt_ids = tokenizer(render_chat(messages, form=form), add_special_tokens=False)["input_ids"]
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
                crop_rule: str = "raw", crop_alone: bool = False, prompts: str = "upstream") -> list[Sample]:
    """The supervised samples of an annotated record: focus (box text) and answer (with the crop), or the one of them an
    upstream round file holds (record.steps); crop_alone adds the bare question on the crop (generate.py's scorer)."""
    box, size, samples = record.box, (record.width, record.height), []
    if "focus" in record.steps and (box is not None or record.box_text is not None):
        if record.box_text is not None and box_form != "square":
            raise DataError(f"{record.source}: the box reply is written square-normalised (upstream's round 1); "
                            f"--box-form {box_form} cannot train on it")
        box_text = record.box_text or write_box(box, record.width, record.height, box_form, image_processor)
        samples.append(Sample(*encode(tokenizer, image_processor, focus_messages(record.question, prompts), [size],
                                      box_text), record, [None], "focus"))
    if "answer" not in record.steps or box is None:
        return samples
    window = crop_window(box, record.width, record.height, rule=crop_rule)
    crop_size = (window[2] - window[0], window[3] - window[1])
    samples.append(Sample(*encode(tokenizer, image_processor, answer_messages(record.question, prompts),
                                  [size, crop_size], record.answer), record, [None, window], "answer"))
    if crop_alone:
        samples.append(Sample(*encode(tokenizer, image_processor, direct_messages(record.question, prompts),
                                      [crop_size], record.answer), record, [window], "crop"))
    return samples

def collate(rows: list[Sample], image_processor, pad_id: int, image_token_id: int,
            pixel_cache: dict | None = None) -> dict:
    """Right-pad rows into one batch (SFT samples, or a DPO batch's chosen then rejected rows). Each distinct image (a
    page, a crop window of it) is processed once and referenced by every row that shows it; with a pixel_cache (a dict
    the caller keeps) once per run. Response positions are listed for the fused log-probs."""
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
            # capped as upstream does, then processed one by one, as the processor does a list
            out = image_processor(images=[fit_image(image, image_processor)], return_tensors="pt")
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

def dpo_samples(pair: Pair, tokenizer, image_processor, stage: int, crop_rule: str = "raw",
                rejected_crop: str = "chosen", prompts: str = "upstream") -> list[PairSample]:
    """Stage 1: the box pair for [image] + question. Stage 2 adds the answer pair for
    [image, crop] + question, both answers on the chosen box's crop (upstream) or each on its own. A step whose
    chosen and rejected are the same stays, as upstream's trainer keeps it: loss ln 2, zero gradient, one more
    sample in its step's mean."""
    r = pair.record

    def side(messages, response, images, kind):
        sizes = [(r.width, r.height) if w is None else (w[2] - w[0], w[3] - w[1]) for w in images]
        return Sample(*encode(tokenizer, image_processor, messages, sizes, response), r, images, kind)

    focus = focus_messages(r.question, prompts, rl=True)
    box = PairSample("box", side(focus, pair.chosen_box, [None], "box"),
                     side(focus, pair.rejected_box, [None], "box"), pair)
    if stage == 1:
        return [box]

    def window(key):
        pixel_box = read_box(getattr(pair, key), r.width, r.height, pair.box_form, image_processor)
        if pixel_box is None:
            raise DataError(f"{r.source}: field '{key}': box {getattr(pair, key)[:60]!r} does not parse "
                            f"as a {pair.box_form} box inside the {r.width}x{r.height} image (stage 2 crops it)")
        return crop_window(pixel_box, r.width, r.height, rule=crop_rule)

    chosen_window = window("chosen_box")
    rejected_window = chosen_window if rejected_crop == "chosen" else window("rejected_box")
    messages = answer_messages(r.question, prompts)
    answer = PairSample("answer", side(messages, pair.chosen_answer, [None, chosen_window], "answer"),
                        side(messages, pair.rejected_answer, [None, rejected_window], "answer"), pair)
    return [box, answer]
