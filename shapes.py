"""The built-in checkpoints: the tiny model every command runs on offline (`--model tiny`: Qwen's special tokens and
chat template, a byte-level BPE trained on the spot, random weights) and random checkpoints with the published shapes
of real Qwen-VL models (`visrl.py tiny --shape qwen2.5-vl-7b`), for sizing and checking a real run without its
weights. model.make_tiny / model.make_shape call these with the classes of the arch.
"""

import hashlib
import inspect
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3_5Config, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import chat
import synth


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

# Qwen3's added tokens that are no special tokens (a reply may hold them; decoding neither stops at nor drops them)
QWEN3_ADDED_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]

# What the Qwen3 templates share: a turn's content (images and videos as their placeholders, the text), the turn's
# end, and the generation prompt's start
_QWEN3_TURN_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n")

# Qwen3-VL-8B-Instruct's chat template (its chat_template.json), the branch without tools: no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n" + _QWEN3_TURN_CONTENT + "{% endif %}")

# Qwen3.5's chat template (chat_template.jinja), the branch without tools: Qwen3-VL's turns, and an assistant turn after
# the last user turn opens a think block (earlier ones drop theirs): empty unless thinking (`enable_thinking`, on by
# default; visrl trains and asks with it off).
QWEN3_5_CHAT_TEMPLATE = (
    "{% set ns = namespace(last_query=-1) %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' and loop.index0 > ns.last_query %}"
    "<think>\n\n</think>\n\n{% endif %}"
    + _QWEN3_TURN_CONTENT +
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n"
    "{% endif %}{% endif %}")

# each arch -> its chat template (what chat.render_chat writes for it: model.CHAT_FORM_OF)
CHAT_TEMPLATES = {"qwen2.5-vl": QWEN_VL_CHAT_TEMPLATE, "qwen2-vl": QWEN_VL_CHAT_TEMPLATE,
                  "qwen3-vl": QWEN3_VL_CHAT_TEMPLATE, "qwen3.5": QWEN3_5_CHAT_TEMPLATE}

# Qwen2's pre-tokenizer: digits split one by one, which keeps box coordinates learnable.
QWEN_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

@dataclass
class TinyConfig:
    """Sizes of the built-in tiny model (CPU-friendly; every shape a real Qwen-VL has, just small)."""

    arch: str = "qwen2.5-vl"  # qwen2.5-vl | qwen2-vl | qwen3-vl | qwen3.5
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
        question = rng.choice(synth.QUESTIONS).format(rng.choice(list(synth.SYNTH_COLORS)))
        lines.append(question + " " + rng.choice(synth.SYNTH_PATTERNS))
    lines += ["The answer is yes. No. A photo of a cat on a table. score: 1.0 {\"score\": 0.5}"] * 20
    return lines

def tiny_cache_key(cfg: "TinyConfig") -> str:
    """What determines the tiny checkpoint, hashed (its config, tokenizer corpus, building code and the versions of the
    libraries that draw its random weights), so that a fresh machine and an old one build the same model."""
    parts = [json.dumps(asdict(cfg), sort_keys=True), "\n".join(_tokenizer_corpus()), CHAT_TEMPLATES[cfg.arch],
             json.dumps(QWEN_SPECIAL_TOKENS), QWEN_PRETOKENIZE_REGEX, torch.__version__, transformers.__version__]
    if cfg.arch.startswith("qwen3"):  # (the Qwen2 checkpoints' keys stay what they were)
        parts += [json.dumps(QWEN3_ADDED_TOKENS), inspect.getsource(tiny_image_processor)]
    parts += [inspect.getsource(fn) for fn in (build_tokenizer, tiny_model_config, build_tiny)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]

def build_tokenizer(vocab_size: int = 1024, arch: str = "qwen2.5-vl") -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE holding every Qwen special token (and Qwen3's added tokens for a Qwen3 arch),
    with Qwen's pre-tokenizer and the arch's chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATES[arch], model_max_length=32768,
        clean_up_tokenization_spaces=False, split_special_tokens=False)
    if arch.startswith("qwen3"):
        tokenizer.add_tokens(QWEN3_ADDED_TOKENS)  # added, not special: as in Qwen3's tokenizer.json
    return tokenizer

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
    # Qwen3-VL / Qwen3.5: 16-pixel patches, a learnt position table (a square number of cells), mrope interleaved
    vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                  num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64)
    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.arch == "qwen3-vl":  # DeepStack: each listed vision block's features added to the same-numbered LM layer
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                   "mrope_section": [6 * head_dim // 32, 5 * head_dim // 32, 5 * head_dim // 32]}
        return Qwen3VLConfig(text_config={**text, "head_dim": head_dim},
                             vision_config={**vision, "deepstack_visual_indexes": list(range(cfg.vision_depth))},
                             tie_word_embeddings=False, **tokens)
    if cfg.arch == "qwen3.5":  # 3 linear-attention (gated delta net) layers, then 1 full-attention one, repeated
        text.update(head_dim=head_dim, linear_conv_kernel_dim=4, linear_key_head_dim=head_dim // 2,
                    linear_value_head_dim=head_dim // 2, linear_num_key_heads=cfg.num_kv_heads,
                    linear_num_value_heads=cfg.num_heads,
                    layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                 for i in range(cfg.num_layers)],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                     "mrope_interleaved": True, "mrope_section": [head_dim // 16, head_dim // 32,
                                                                                  head_dim // 32]})
        return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    raise ValueError(f"unknown tiny arch {cfg.arch!r}; expected one of {sorted(TINY_ARCHS)}")

# --arch -> model_type
TINY_ARCHS = {"qwen2.5-vl": "qwen2_5_vl", "qwen2-vl": "qwen2_vl", "qwen3-vl": "qwen3_vl", "qwen3.5": "qwen3_5"}

def tiny_image_processor(cfg: TinyConfig) -> Qwen2VLImageProcessorPil:
    """The tiny model's image processor: Qwen2-VL's (14-px patches) or Qwen3's (16-px patches, mean and std 0.5, as
    Qwen3-VL's preprocessor_config.json), each seeing any square image over 113 px (129 px) at 8 x 8 patches."""
    if not cfg.arch.startswith("qwen3"):
        return Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": 64 * 64, "longest_edge": 129 * 129})

def build_tiny(out_dir: str | Path, cfg: TinyConfig, model_cls, processor_cls) -> Path:
    """Write the tiny checkpoint directory (model, tokenizer, processor); atomic, so ranks may race."""
    tokenizer = build_tokenizer(cfg.vocab_size, cfg.arch)
    with torch.random.fork_rng(devices=[]):  # building on first use must not shift the caller's random stream
        torch.manual_seed(cfg.seed)
        model = model_cls(tiny_model_config(cfg, tokenizer))
        nn.init.normal_(model.lm_head.weight, std=cfg.lm_head_std)
    processor = processor_cls(image_processor=tiny_image_processor(cfg), tokenizer=tokenizer,
                              chat_template=CHAT_TEMPLATES[cfg.arch])
    return write_checkpoint(out_dir, model, processor, "visrl_tiny.json", asdict(cfg))

def write_checkpoint(out_dir: str | Path, model, processor, about_file: str, about: dict) -> Path:
    """Save model (or a config alone), processor and what built them into out_dir, atomically: written beside it and
    renamed, so ranks building the same cached checkpoint may race. Under a process group transformers saves a model
    on rank 0 only: another rank's copy, without config.json, is dropped and that rank waits for rank 0's."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / about_file).write_text(json.dumps(about, indent=2))
    if not (tmp / "config.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        for _ in range(3000):  # 10 minutes
            if (out_dir / "config.json").exists():
                return out_dir
            time.sleep(0.2)
        raise RuntimeError(f"{out_dir}: no rank wrote the checkpoint in 10 minutes")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        shutil.rmtree(out_dir, ignore_errors=True)  # a copy without its model: an earlier race's, never complete
    try:
        os.replace(tmp, out_dir) if not out_dir.exists() or not any(out_dir.iterdir()) else shutil.rmtree(tmp)
    except OSError:  # another process renamed its copy first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

# --------------------------------------------------------------------------------------------
# Real shapes: each Instruct checkpoint's config.json on the Hugging Face hub (Qwen/<name>-Instruct), every field
# that sets a tensor's shape; with the tiny tokenizer inside (its special-token ids, a 152k-row embedding table).

_QWEN_TEXT = dict(hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, use_sliding_window=False,
                  sliding_window=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                         "mrope_section": [16, 24, 24]})
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2,
                      fullatt_block_indexes=[7, 15, 23, 31])
_QWEN2_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2)
_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
           num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
# --shape -> (arch, text config, vision config); the vision tower's output width is the text's hidden size
REAL_SHAPES = {
    "qwen2.5-vl-3b": ("qwen2.5-vl", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                         num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True), _QWEN25_VISION),
    "qwen2.5-vl-7b": ("qwen2.5-vl", _7B, _QWEN25_VISION),
    "qwen2.5-vl-72b": ("qwen2.5-vl", dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                          num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                                          tie_word_embeddings=False), {**_QWEN25_VISION, "intermediate_size": 3456}),
    "qwen2-vl-7b": ("qwen2-vl", _7B, _QWEN2_VISION),
    # Qwen/Qwen3-VL-8B-Instruct (8.77B parameters) and Qwen/Qwen3.5-9B (9.41B without its multi-token-prediction
    # layer, which transformers does not load): config.json as published (copies read, issue 30)
    "qwen3-vl-8b": ("qwen3-vl", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=262144, rope_parameters={
            "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
             temporal_patch_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
             deepstack_visual_indexes=[8, 16, 24])),
    "qwen3.5-9b": ("qwen3.5", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
        head_dim=256, vocab_size=248320, tie_word_embeddings=False, max_position_embeddings=262144,
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                                    "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                                                    "mrope_interleaved": True}),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
             temporal_patch_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh"))}
# the real image processor's limits (its preprocessor_config.json); visrl caps images at --max-pixels before it
REAL_MIN_PIXELS, REAL_MAX_PIXELS = 56 * 56, 28 * 28 * 16384

def real_image_processor(arch: str) -> Qwen2VLImageProcessorPil:
    """The published preprocessor_config.json of an arch: Qwen2(.5)-VL's, or Qwen3-VL's and Qwen3.5's (16-px patches,
    mean and std 0.5, 256^2 to 4096^2 pixels)."""
    if not arch.startswith("qwen3"):
        return Qwen2VLImageProcessorPil(min_pixels=REAL_MIN_PIXELS, max_pixels=REAL_MAX_PIXELS)
    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})

def shape_config(shape: str, tokenizer, layers: int = 0, vision_depth: int = 0):
    """The published config of `shape` with the tokenizer's special-token ids; `layers` decoder layers and a
    `vision_depth`-block vision tower when given (0: the real counts). A shortened Qwen2.5-VL tower keeps its
    full-attention blocks that still exist, or makes its last block one (every other block attends in windows)."""
    arch, text, vision = REAL_SHAPES[shape]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = {**_QWEN_TEXT, **text, "num_hidden_layers": layers or text["num_hidden_layers"],
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    vision = {**vision, "depth": vision_depth or vision["depth"]}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if arch == "qwen2.5-vl":
        full = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
        vision.update(out_hidden_size=text["hidden_size"], fullatt_block_indexes=full or [vision["depth"] - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                                **tokens)
    if arch == "qwen2-vl":
        return Qwen2VLConfig(text_config=text, vision_config={**vision, "hidden_size": text["hidden_size"]},
                             tie_word_embeddings=text["tie_word_embeddings"], **tokens)
    vision["out_hidden_size"] = text["hidden_size"]
    if arch == "qwen3-vl":  # a shortened tower keeps the DeepStack blocks that still exist, and one at least
        stack = [i for i in vision["deepstack_visual_indexes"] if i < vision["depth"]]
        vision["deepstack_visual_indexes"] = stack or [vision["depth"] - 1]
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                             **tokens)
    # Qwen3.5: 3 linear-attention layers, then a full-attention one; a shortened stack keeps one full-attention layer
    layers = text["num_hidden_layers"]
    text["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 or (i == layers - 1 and layers < 4)
                           else "linear_attention" for i in range(layers)]
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                         **tokens)

def build_shape(out_dir: str | Path, shape: str, model_cls, processor_cls, layers: int = 0, vision_depth: int = 0,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0, config_only: bool = False) -> Path:
    """Write a random checkpoint of a real shape (or, config_only, its config, tokenizer and processor alone):
    weights drawn as Hugging Face initialises them, in dtype."""
    arch = REAL_SHAPES[shape][0]
    tokenizer = build_tokenizer(arch=arch)
    config = shape_config(shape, tokenizer, layers, vision_depth)
    config.dtype = dtype
    if config_only:
        model = config
    else:
        torch.manual_seed(seed)
        model = model_cls._from_config(config, dtype=dtype)
    processor = processor_cls(image_processor=real_image_processor(arch), tokenizer=tokenizer,
                              chat_template=CHAT_TEMPLATES[arch])
    about = dict(shape=shape, layers=config.text_config.num_hidden_layers, vision_depth=config.vision_config.depth,
                 dtype=str(dtype).removeprefix("torch."), seed=seed, config_only=config_only)
    return write_checkpoint(out_dir, model, processor, "visrl_shape.json", about)
