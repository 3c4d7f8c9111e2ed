"""The built-in assets every command can run on offline: the synthetic intention-driven VQA set (`--data synth`)
and, at the end of this file, the tiny checkpoint (`--model tiny`). What a page shows, and why the answer needs the
crop and the crop the right box: docs/guide.md, "The built-in tiny model and synthetic set".
"""

import hashlib
import inspect
import json
import os
import random
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn as nn
import transformers
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import chat
import data

SYNTH_VERSION = 3  # bump when the generator changes: cached copies are keyed by it
SYNTH_COLORS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 60, 220),
                "yellow": (225, 185, 0), "magenta": (200, 40, 200), "cyan": (0, 175, 195)}
_QUESTIONS = ("What pattern is inside the {} frame?", "Which pattern fills the {} square?",
              "What is the pattern in the {} box?", "Name the pattern the {} frame contains.")
SYNTH_PATTERNS = ("horizontal", "vertical", "diagonal", "checkered", "dotted", "grid")
_PERIOD = 12

def _tint(col: int, row: int) -> tuple[int, int, int]:
    """The light colour of a frame's pattern, saying where its cell is: red falls along x, blue along y. Vision tokens
    carry no absolute position (Qwen's ViT and LM use rotary positions only), so the frame's pixels say it instead."""
    return (255 - 80 * col, 160, 255 - 80 * row)

def _pattern(name: str, size: int, du: int, dv: int, light=(255, 255, 255)) -> np.ndarray:
    """A black-and-`light` pattern, half dark on average: downscaled, every pattern is the same flat colour."""
    v, u = np.mgrid[0:size, 0:size]
    u, v = (u + du) % _PERIOD, (v + dv) % _PERIOD
    half = _PERIOD / 2
    dark = {"horizontal": v < half, "vertical": u < half, "diagonal": ((u + v) % _PERIOD) < half,
            "checkered": (u < half) ^ (v < half), "grid": (u < 3.5) | (v < 3.5),
            "dotted": (u - half + 0.5) ** 2 + (v - half + 0.5) ** 2 < 0.16 * _PERIOD ** 2}[name]
    return np.where(dark[..., None], np.zeros(3, np.uint8), np.array(light, np.uint8))

# The page is a grid of CELL px cells so that, in the tiny model's 1/12 scale view, a cell is one 28 px merged
# vision token; a frame sits at the centre of its cell, so the box text of a cell is always the same string.
SIDE, CELL = 1344, 336
_FRAME_SIDE, _JITTER, BORDER, _N_FRAMES = 288, 0, 28, (3, 5)
DISTRACTOR_BORDER, DISTRACTOR_LIGHT = (140, 140, 140), (200, 200, 200)

def _synth_image(rng: random.Random):
    """One synthetic page and its frames [(color name, pattern, (x1, y1, x2, y2))], target first."""
    w = h = SIDE
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    base = rng.randint(228, 245)
    draw.rectangle((0, 0, w - 1, h - 1), fill=(base, base, base))
    for _ in range(rng.randint(40, 70)):  # clutter: grey lines ...
        g = rng.randint(110, 200)
        draw.line([(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)], fill=(g, g, g),
                  width=rng.choice((2, 4, 6)))
    for _ in range(rng.randint(25, 45)):  # ... and grey shapes
        g, x, y, s = rng.randint(110, 200), rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + s, y + s * rng.uniform(0.5, 1.5)), outline=(g, g, g), width=rng.choice((2, 4, 6)))
    # mild noise on the background only, so frame pixels keep their exact colour (tests rely on it);
    # in 8x8 px blocks because per-pixel noise makes PNG encoding several times slower
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, 6, (h // 8 + 1, w // 8 + 1, 1))
    noise = noise.astype(np.int16).repeat(8, 0).repeat(8, 1)[:h, :w]
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    n = rng.randint(*_N_FRAMES)
    colors = rng.sample(sorted(SYNTH_COLORS), n)
    target = rng.randrange(len(SYNTH_PATTERNS))
    # a wrong crop reads wrong: no distractor shares the target's pattern
    kinds = [target] + rng.sample([d for d in range(len(SYNTH_PATTERNS)) if d != target], n - 1)
    cells = rng.sample(range((w // CELL) * (h // CELL)), n)
    frames = []  # (colour name, pattern, box); a distractor's colour name is what it would have been
    for color, kind, cell in zip(colors, kinds, cells):
        side = _FRAME_SIDE + rng.randint(-_JITTER, _JITTER)
        row, col = divmod(cell, w // CELL)
        x = col * CELL + (CELL - side) // 2 + rng.randint(-_JITTER, _JITTER)  # centred in its cell, jittered
        y = row * CELL + (CELL - side) // 2 + rng.randint(-_JITTER, _JITTER)
        is_question = not frames  # the first frame drawn is the question's
        # PIL's rectangle includes its end pixel, so the frame covers exactly [x1, x2) x [y1, y2)
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(255, 255, 255),
                       outline=SYNTH_COLORS[color] if is_question else DISTRACTOR_BORDER, width=BORDER)
        light = _tint(col, row) if is_question else DISTRACTOR_LIGHT
        tile = _pattern(SYNTH_PATTERNS[kind], side - 2 * BORDER, rng.randrange(_PERIOD), rng.randrange(_PERIOD), light)
        img.paste(Image.fromarray(tile), (x + BORDER, y + BORDER))
        frames.append((color, SYNTH_PATTERNS[kind], (x, y, x + side, y + side)))
    return img, frames

def _synth_one(out: Path, split: str, i: int, seed: int) -> str:
    """Draw and save one synthetic image; its metadata line (JSON)."""
    rng = random.Random(f"visrl-synth/{seed}/{split}/{i}")  # per image: any subset reproduces alone
    img, frames = _synth_image(rng)
    color, pattern, box = frames[0]
    rel = f"images/{split}_{i:05d}.png"
    img.save(out / rel, compress_level=1)  # speed over size; the bytes are still deterministic
    return json.dumps({"question_id": f"synth-{split}-{i:05d}", "dataset": "synth", "split": split,
                       "image": rel, "question": rng.choice(_QUESTIONS).format(color), "answer": pattern,
                       "bboxs": [list(box)], "width": img.width, "height": img.height})

def cache_key(seed: int, n_train: int, n_val: int, n_test: int) -> str:
    """What determines a synthetic set, hashed: this module's code (SYNTH_VERSION with it), the sizes, the seed
    and the versions of the libraries that draw and encode the images. Any change gives a new cache directory."""
    parts = [Path(__file__).read_text(encoding="utf-8"), json.dumps([seed, n_train, n_val, n_test]),
             PIL.__version__, np.__version__]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]

def make_synth(out_dir, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic set (PNGs + train/val/test.jsonl in Visual-CoT's metadata format)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    # threads, not processes: PNG encoding and numpy release the GIL, and nothing is forked or re-imported
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            lines = pool.map(_synth_one, [out] * n, [split] * n, range(n), [seed] * n)
            paths[split] = out / f"{split}.jsonl"
            paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths

def resolve_data(path: str, split: str = "train", seed: int = 0) -> Path:
    """`synth` -> the cached synthetic set (built on first use); a directory -> its `<split>.jsonl`."""
    if path == "synth":
        sizes = {"n_train": 2000, "n_val": 200, "n_test": 200}
        root = data.cache_dir() / f"synth-v{SYNTH_VERSION}-seed{seed}-{cache_key(seed, **sizes)}"
        if not (root / "test.jsonl").exists():
            print(f"building the synthetic set into {root} (once; a few minutes on 2 cores)", file=sys.stderr)
            make_synth(root, seed=seed, **sizes)
        return root / f"{split}.jsonl"
    p = Path(path)
    return p / f"{split}.jsonl" if p.is_dir() else p

# --------------------------------------------------------------------------------------------
# The tiny checkpoint: Qwen's special tokens and chat template, a byte-level BPE trained on the spot,
# random weights. model.make_tiny / `--model tiny` call build_tiny with the classes of the arch.

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

# The chat template shipped with Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Qwen2's pre-tokenizer: digits split one by one, which keeps box coordinates learnable.
QWEN_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

@dataclass
class TinyConfig:
    """Sizes of the built-in tiny model (CPU-friendly; every shape a real Qwen-VL has, just small)."""

    arch: str = "qwen2.5-vl"  # qwen2.5-vl | qwen2-vl
    vocab_size: int = 1024  # BPE target; the special tokens come on top
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    min_pixels: int = 56 * 56
    # every square image over 113 px is seen at 112 x 112; at exactly 112 * 112, smart_resize's floor shrinks
    # some sides (246, 251, ..., 288, 295 px) to 84 px, so a crop's scale would jump with a pixel of its size
    max_pixels: int = 113 * 113
    # a frozen random lm_head at the usual std 0.02 caps logits near +-2.5 after the final norm: no adapter
    # could make a confident prediction (real checkpoints have far larger output norms)
    lm_head_std: float = 0.3
    seed: int = 0

def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the prompt table, the synthetic questions and answers, boxes, judge replies."""
    rng = random.Random(0)
    lines = [chat.SYSTEM_PROMPT, chat.FOCUS_INSTRUCTION, chat.VISRL_INSTRUCTION, chat.VCOT_ANSWER_TEXT]
    for _ in range(2000):
        box = sorted(round(rng.random(), 3) for _ in range(4))
        lines.append(f"[{box[0]:.3f}, {box[1]:.3f}, {box[2]:.3f}, {box[3]:.3f}]")
        lines.append(rng.choice(_QUESTIONS).format(rng.choice(list(SYNTH_COLORS))) + " " + rng.choice(SYNTH_PATTERNS))
    lines += ["The answer is yes. No. A photo of a cat on a table. score: 1.0 {\"score\": 0.5}"] * 20
    return lines

def tiny_cache_key(cfg: "TinyConfig") -> str:
    """What determines the tiny checkpoint, hashed (its config, tokenizer corpus, building code and the versions of the
    libraries that draw its random weights), so that a fresh machine and an old one build the same model."""
    parts = [json.dumps(asdict(cfg), sort_keys=True), "\n".join(_tokenizer_corpus()), QWEN_VL_CHAT_TEMPLATE,
             json.dumps(QWEN_SPECIAL_TOKENS), QWEN_PRETOKENIZE_REGEX, torch.__version__, transformers.__version__]
    parts += [inspect.getsource(fn) for fn in (build_tokenizer, tiny_model_config, build_tiny)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]

def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE holding every Qwen special token, with Qwen's pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], chat_template=QWEN_VL_CHAT_TEMPLATE, model_max_length=32768,
        clean_up_tokenization_spaces=False, split_special_tokens=False)

def tiny_model_config(cfg: TinyConfig, tokenizer) -> Qwen2_5_VLConfig | Qwen2VLConfig:
    """A Qwen-VL config with the tiny sizes and the tokenizer's special-token ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 63) // 64 * 64  # padded like real checkpoints' embedding tables
    unit = cfg.hidden_size // cfg.num_heads // 16  # mrope: head_dim/2 rotary pairs in (t, h, w), [16, 24, 24] at 128
    text = dict(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2 * unit, 3 * unit, 3 * unit]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if cfg.arch == "qwen2.5-vl":
        vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                      num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[cfg.vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if cfg.arch == "qwen2-vl":
        vision = dict(depth=cfg.vision_depth, embed_dim=cfg.vision_hidden, hidden_size=cfg.hidden_size, mlp_ratio=2,
                      num_heads=cfg.vision_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"unknown tiny arch {cfg.arch!r}; expected one of {sorted(TINY_ARCHS)}")

TINY_ARCHS = {"qwen2.5-vl": "qwen2_5_vl", "qwen2-vl": "qwen2_vl"}  # --arch -> model_type

def build_tiny(out_dir: str | Path, cfg: TinyConfig, model_cls, processor_cls) -> Path:
    """Write the tiny checkpoint directory (model, tokenizer, processor); atomic, so ranks may race."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(cfg.vocab_size)
    with torch.random.fork_rng(devices=[]):  # building on first use must not shift the caller's random stream
        torch.manual_seed(cfg.seed)
        model = model_cls(tiny_model_config(cfg, tokenizer))
        nn.init.normal_(model.lm_head.weight, std=cfg.lm_head_std)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "visrl_tiny.json").write_text(json.dumps(asdict(cfg), indent=2))
    try:
        os.replace(tmp, out_dir) if not out_dir.exists() else shutil.rmtree(tmp)
    except OSError:  # another process renamed its copy first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

@dataclass
class SynthArgs:
    """Write the synthetic intention-driven VQA set (Visual-CoT metadata format, PNG images)."""

    out: str = "synth-data"  # the directory to write (absent or empty)
    n_train: int = 2000  # records in train.jsonl
    n_val: int = 200  # records in val.jsonl
    n_test: int = 200  # records in test.jsonl
    seed: int = 0  # what the pages show

def synth_command(args: SynthArgs) -> dict:
    """`visrl.py synth`: the set in a directory of its own (`--data synth` keeps its own copy in the cache)."""
    data.check_new_dir(args.out)
    paths = make_synth(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    print(f"synthetic set written to {args.out}: " + ", ".join(str(p) for p in paths.values()))
    return paths
