"""Model side of visrl: loading Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5, hand-written LoRA, generation, processes
and sharding.

`--model tiny` is built on first use by shapes.build_tiny (random weights: everything runs offline). LoRA wraps
the language model's `nn.Linear`s in place, keeping the base parameter names: weights keep their Hugging Face names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (AutoProcessor, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                          Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLProcessor)
from transformers.utils import logging as hf_logging

import chat
import data
import runs
import shapes

hf_logging.disable_progress_bar()  # per-shard bars on a tiny checkpoint are noise; our own tqdm shows progress

# --------------------------------------------------------------------------------------------
# Image-only processors (the stock video processor needs torchvision), registered so AutoProcessor loads them back.

class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)

class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)

class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """Qwen3-VL / Qwen3.5 processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)

AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageProcessor, exist_ok=True)
AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageProcessor, exist_ok=True)
AutoProcessor.register(Qwen3VLConfig, Qwen3VLImageProcessor, exist_ok=True)
AutoProcessor.register(Qwen3_5Config, Qwen3VLImageProcessor, exist_ok=True)

# model_type in config.json -> (config class, model class, processor class)
ARCHS = {"qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageProcessor),
         "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor),
         "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLImageProcessor),
         "qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLImageProcessor)}
# model_type -> how chat.render_chat writes its prompts (the checkpoint's chat template, without tools)
CHAT_FORM_OF = {"qwen2_5_vl": "qwen2", "qwen2_vl": "qwen2", "qwen3_vl": "qwen3-vl", "qwen3_5": "qwen3.5"}

def make_tiny(out_dir: str | Path, cfg: shapes.TinyConfig = shapes.TinyConfig()) -> Path:
    """Write the tiny checkpoint directory (shapes.build_tiny with this module's classes for its arch)."""
    _, model_cls, processor_cls = ARCHS[shapes.TINY_ARCHS[cfg.arch]]
    return shapes.build_tiny(out_dir, cfg, model_cls, processor_cls)

def make_shape(out_dir: str | Path, shape: str, layers: int = 0, vision_depth: int = 0,
               dtype: torch.dtype = torch.bfloat16, seed: int = 0, config_only: bool = False) -> Path:
    """Write a random checkpoint of a real model's shape (shapes.build_shape with this module's classes)."""
    _, model_cls, processor_cls = ARCHS[shapes.TINY_ARCHS[shapes.REAL_SHAPES[shape][0]]]
    return shapes.build_shape(out_dir, shape, model_cls, processor_cls, layers, vision_depth, dtype, seed, config_only)

# the built-in model's names for --model -> its arch
TINY_NAMES = {"tiny": "qwen2.5-vl", "tiny-qwen2.5-vl": "qwen2.5-vl", "tiny-qwen2-vl": "qwen2-vl",
              "tiny-qwen3-vl": "qwen3-vl", "tiny-qwen3.5": "qwen3.5"}

def resolve_model_path(model: str) -> Path:
    """A TINY_NAMES name -> the cached tiny checkpoint (built on first use); else the path."""
    if model in TINY_NAMES:
        arch = TINY_NAMES[model]
        cfg = shapes.TinyConfig(arch=arch)
        path = data.cache_dir() / f"tiny-{arch}-{shapes.tiny_cache_key(cfg)}"
        if not (path / "config.json").exists():
            print(f"building the tiny {arch} checkpoint into {path} (once)", file=sys.stderr)
            make_tiny(path, cfg)
        return path
    path = Path(model)
    if not (path / "config.json").is_file():
        raise data.UserError(f"--model {path}: not a checkpoint directory (no config.json); "
                             f"pass a checkpoint directory or one of {', '.join(TINY_NAMES)}")
    return path

@dataclass
class TinyArgs:
    """Write the built-in tiny checkpoint, or a random one with a real model's published shape, into a directory."""

    out: str = "tiny-model"  # the directory to write (absent or empty)
    arch: Literal["qwen2.5-vl", "qwen2-vl", "qwen3-vl", "qwen3.5"] = "qwen2.5-vl"  # the tiny checkpoint's architecture
    # a real model's published config, random weights, the tiny tokenizer (the 72B: --config-only or --layers)
    shape: Literal["tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-7b", "qwen2.5-vl-72b", "qwen3-vl-8b",
                   "qwen3.5-9b"] = "tiny"
    layers: int = 0  # decoder layers of a real shape (0: all of them)
    vision_depth: int = 0  # vision blocks of a real shape (0: all of them)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # a real shape's weights (the tiny one is always float32)
    config_only: bool = False  # a real shape's config, tokenizer and processor, no weights (bench/memory_plan.py)
    seed: int = 0  # its random weights

def tiny_command(args: TinyArgs) -> Path:
    """`visrl.py tiny`: the tiny checkpoint (the cache keeps its own copy) or a real shape, in a new directory."""
    data.check_new_dir(args.out)
    if args.shape == "tiny":
        path = make_tiny(args.out, shapes.TinyConfig(arch=args.arch, seed=args.seed))
        print(f"tiny {args.arch} checkpoint written to {path}")
        return path
    if args.shape.endswith("72b") and not (args.config_only or args.layers):
        raise data.UserError("--shape qwen2.5-vl-72b: its weights are 147 GB; pass --config-only, or --layers N")
    path = make_shape(args.out, args.shape, args.layers, args.vision_depth, getattr(torch, args.dtype), args.seed,
                      args.config_only)
    about = json.loads((path / "visrl_shape.json").read_text())
    print(f"{args.shape} ({about['layers']} layers, vision depth {about['vision_depth']}, {about['dtype']}"
          f"{', config only' if args.config_only else ''}) written to {path}")
    return path

# what a corrupt or mismatched checkpoint makes transformers / safetensors raise
CHECKPOINT_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)

def _checkpoint(model: str) -> tuple[Path, type, type]:
    """(directory, model class, processor class) of a checkpoint directory or `tiny`."""
    path = resolve_model_path(model)
    model_type = runs.read_json(path / "config.json", "checkpoint config").get("model_type")
    if model_type not in ARCHS:
        raise data.UserError(f"{path}/config.json: model_type {model_type!r} is not one of {sorted(ARCHS)}")
    return path, ARCHS[model_type][1], ARCHS[model_type][2]

def load_processor(model: str, max_pixels: int = runs.UPSTREAM_MAX_PIXELS):
    """The checkpoint's processor (tokenizer, image processor); images capped at max_pixels first (0: no cap)."""
    path, _, processor_cls = _checkpoint(model)
    try:
        processor = processor_cls.from_pretrained(path)
    except CHECKPOINT_ERRORS as e:
        raise data.UserError(f"{path}: unusable checkpoint ({type(e).__name__}: {str(e)[:300]})") from e
    processor.image_processor.visrl_max_pixels = max_pixels  # read by chat.fit_image and chat.image_grid
    model_type = runs.read_json(path / "config.json", "checkpoint config").get("model_type")
    processor.tokenizer.visrl_chat_form = CHAT_FORM_OF[model_type]  # read by chat.encode
    return processor

def load_model(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               max_pixels: int = runs.UPSTREAM_MAX_PIXELS):
    """(model, processor) of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 checkpoint directory or a tiny one
    (load_processor)."""
    path, model_cls, _ = _checkpoint(model)
    processor = load_processor(model, max_pixels)
    try:
        net = model_cls.from_pretrained(path, dtype=dtype)
    except torch.OutOfMemoryError:
        raise  # not the checkpoint's fault
    except CHECKPOINT_ERRORS as e:
        raise data.UserError(f"{path}: unusable checkpoint ({type(e).__name__}: {str(e)[:300]})") from e
    net.name_or_path = str(path)
    return net.to(device), processor

def load(model: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
         max_pixels: int = runs.UPSTREAM_MAX_PIXELS):
    """(net, processor) for inference: the checkpoint with its adapter chain merged, in eval mode."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    net, processor = load_model(model, dtype=resolve_dtype(dtype, device), device=device, max_pixels=max_pixels)
    if adapter:
        load_adapter(net, adapter)
        merge_lora(net)  # plain linears: faster inference, same outputs
    return net.eval(), processor

# --------------------------------------------------------------------------------------------
# LoRA, by hand: y = W x + (alpha / r) * B A dropout(x), with B = 0 at the start.

class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter; keeps `weight`/`bias` so base keys are unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and the LoRA paper's code
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return out
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (self.scaling * delta).to(out.dtype)

@dataclass
class TrainConfig(runs.RunConfig):
    """What SFT and DPO share besides the run: optimizer, batches, the LoRA to train, checkpoints."""

    epochs: float = 3.0  # passes over the training items (upstream SFT: 3)
    max_steps: int = -1  # optimizer steps; overrides --epochs when > 0
    lr: float = 1e-4  # peak learning rate of AdamW (upstream SFT: 1e-4)
    warmup_ratio: float = 0.1  # linear warm-up over this share of the steps, then cosine to 0 (upstream: 0.1)
    batch_size: int = 2  # items per process per micro-step (upstream SFT: 2)
    grad_accum: int = 8  # micro-steps per optimizer step (upstream: 8)
    lora_rank: int = 8  # rank of the adapter on every targeted linear (upstream: 8)
    lora_alpha: float = 16.0  # the adapter's scale is alpha / rank (upstream: 16)
    lora_targets: str = "all"  # `all` linear layers of the language model (upstream), or e.g. `q_proj,v_proj`
    max_len: int = 2048  # longer samples are dropped whole and counted, never cut through image tokens (upstream: 2048)
    grad_checkpointing: bool = False  # recompute each decoder layer's activations in backward: less memory, slower
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end or on SIGTERM/SIGINT)
    resume: bool = False  # continue the run in --out from its newest complete checkpoint
    val_fraction: float = 0.1  # held out (whole records / pairs, chosen by --seed) for the eval loss; upstream val_size
    eval_every: int = 0  # optimizer steps between eval losses in metrics.jsonl (0: once, at the end)
    # tensorboard: each metrics.jsonl row's numbers also as TensorBoard scalars in <out>/tensorboard, written as they
    # are logged (live curves; needs `pip install 'visrl[tensorboard]'`)
    report_to: Literal["none", "tensorboard"] = "none"

    # bookkeeping, and how long it runs (to extend a finished run)
    rerun_may_change = runs.RunConfig.rerun_may_change + ("resume", "save_every", "max_steps", "epochs", "eval_every",
                                                        "report_to")

    def check(self) -> None:
        """Refuse settings that contradict each other, before any work (each stage's config adds its own)."""

@dataclass
class Stage:
    """What the one training loop (visrl.train) needs from an objective, built by visrl.build_sft or dpo.build: the
    objective is an nn.Module (FSDP2's root unit) with forward(batch, counts) -> (loss, stats), where counts are
    step_counts(micro-batches) summed over ranks (the step's normaliser) and stats are summed for the log;
    item_counts(items) is the normaliser of the held-out items; log_fields(stats, counts, loss) the row's fields."""

    name: str  # in the progress bar and messages: "sft", "dpo stage 2"
    items: list  # what batches draw from: SFT samples, or DPO pairs (each a list of PairSamples)
    val_items: list  # held out: their loss goes into metrics.jsonl
    collate: Callable[[list], dict]  # items -> one batch
    objective: nn.Module
    summary: str  # what was built, one line: "64 records -> 171 samples (+ 21 held out)"
    about_model: str  # the model side of the run's summary line (trainable parameters, the reference)
    # this rank's micro-batches of item indices from an optimizer step on (None: every item, shuffled per epoch)
    batches: Callable[[int], Iterator[list[int]]] | None = None
    on_start: Callable[[], None] | None = None  # run by rank 0 once --out is ready (e.g. write the reference table)

@dataclass
class LoRAConfig:
    """What an adapter is: saved as adapter_config.json beside adapter.safetensors."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all"  # "all" linear layers of the language model, or comma-separated names (q_proj,v_proj)
    base_model: str = ""
    parent_adapter: str = ""  # an adapter merged into the base before this one was trained (a resolved path)
    parent_sha256: str = ""  # the parent's content when this one was trained on it: a changed parent is an error
    parent_relative: str = ""  # the parent's path relative to this adapter's folder: found there after a move
    base_sha256: str = ""  # the base checkpoint's config and tokenizer files: another base model is an error
    convention: dict | None = None  # prompts, crop, max_pixels, box_form it was trained with (resolve_convention)

def language_model(model: nn.Module) -> nn.Module:
    """The text decoder (the part LoRA adapts; the vision tower and merger stay frozen)."""
    return model.model.language_model

def lora_target_names(model: nn.Module, targets: str = "all") -> list[str]:
    """Full module names of the nn.Linears LoRA wraps."""
    wanted = None if targets == "all" else {t.strip() for t in targets.split(",") if t.strip()}
    prefix = next(n for n, m in model.named_modules() if m is language_model(model))
    leaves = ((name, name.rsplit(".", 1)[-1], m) for name, m in language_model(model).named_modules())
    names = [f"{prefix}.{name}" for name, leaf, m in leaves  # an adapter's own lora_A / lora_B are not targets
             if isinstance(m, nn.Linear) and leaf not in ("lora_A", "lora_B") and (wanted is None or leaf in wanted)]
    if not names:
        raise data.UserError(f"LoRA targets {targets!r} match no linear layer of the language model")
    return names

def add_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze the model and wrap the target linears with fresh adapters; returns the wrapped names."""
    model.requires_grad_(False)
    names = lora_target_names(model, cfg.targets)
    for name in names:
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has an adapter; merge it first")
        model.set_submodule(name, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))
    return names

def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted linear, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}

@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model (for reference passes): every adapter off inside the block."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.adapter_enabled = True

@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += alpha/r * B A) and unwrap to plain nn.Linear."""
    for name, m in lora_modules(model).items():
        merged = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        merged.weight.copy_(m.weight.float() + m.scaling * (m.lora_B.weight.float() @ m.lora_A.weight.float()))
        if m.bias is not None:
            merged.bias.copy_(m.bias)
        model.set_submodule(name, merged.requires_grad_(False))

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, keyed `<module>.lora_A.weight` / `<module>.lora_B.weight`."""
    return {k: v.detach() for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}

def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter.safetensors and adapter_config.json (`state`: an already gathered adapter state)."""
    out_dir = Path(out_dir)
    if cfg.parent_adapter and Path(cfg.parent_adapter).resolve() == out_dir.resolve():
        raise data.UserError(f"{out_dir}: an adapter cannot be its own parent_adapter")
    if cfg.parent_adapter:  # also relative to this folder: the chain survives moving the runs folder
        cfg = replace(cfg, parent_relative=os.path.relpath(Path(cfg.parent_adapter).resolve(), out_dir.resolve()))
    out_dir.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    state = {k: v.float().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(out_dir / "adapter.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out_dir

def read_adapter_config(adapter_dir: str | Path) -> LoRAConfig:
    """The LoRAConfig saved beside an adapter."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise data.UserError(f"{path}: missing; {adapter_dir} is not an adapter directory")
    try:
        return LoRAConfig(**runs.read_json(path, "adapter config"))
    except TypeError as e:
        raise data.UserError(f"{path}: not an adapter config written by visrl ({e})") from e

BASE_FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")  # not the image processor's

def base_fingerprint(checkpoint: str | Path) -> str:
    """sha256 of a checkpoint's config and tokenizer files and of each shard's size and middle MiB (cheap for 15 GB):
    an adapter records it, so loading it onto another base (a rebuilt tiny model, another fine-tune) is caught."""
    digest = hashlib.sha256()
    for name in BASE_FINGERPRINT_FILES:
        path = Path(checkpoint) / name
        digest.update(name.encode() + b"\x00" + (path.read_bytes() if path.is_file() else b"") + b"\x00")
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            f.seek(size // 2)
            digest.update(f"{shard.name}:{size}".encode() + f.read(1 << 20))
    return digest.hexdigest()

def adapter_fingerprint(adapter: str | Path) -> str:
    """sha256 of an adapter's weights and config: what a child adapter records of its parent."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter.safetensors"):
        with open(Path(adapter) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

def adapter_chain(adapter: str | Path) -> list[tuple[Path, LoRAConfig]]:
    """The adapter and its `parent_adapter`s, root first (the order `load_adapter` applies them); a parent
    whose content changed since its child was trained on it is an error naming both."""
    chain, path, child = [], Path(adapter), None
    while True:
        if not (path / "adapter_config.json").is_file() or not (path / "adapter.safetensors").is_file():
            raise data.UserError(f"{path}: not an adapter directory (needs adapter_config.json and "
                                 f"adapter.safetensors)" + (f"; it is the parent_adapter of {child}" if child else ""))
        if any(path.resolve() == p.resolve() for p, _ in chain):
            raise data.UserError(f"{path}: parent_adapter chain loops back on itself")
        if child is not None and chain[-1][1].parent_sha256 and adapter_fingerprint(path) != chain[-1][1].parent_sha256:
            raise data.UserError(f"{path}: changed since {child} was trained on it (its content hash differs): "
                                 f"restore it, or retrain {child} on the new one")
        cfg = read_adapter_config(path)
        chain.append((path, cfg))
        if not cfg.parent_adapter:
            return chain[::-1]
        child, path = path, Path(cfg.parent_adapter)  # absolute; older adapters: relative to the working directory
        if not path.exists() and cfg.parent_relative and (child / cfg.parent_relative).exists():
            path = child / cfg.parent_relative  # the runs folder moved; the content hash still vouches for it

def input_dirs(model: str | None, adapter: str | None) -> list[tuple[str, Path]]:
    """The directories a command reads weights from, for the --out checks: the checkpoint (not the built-in tiny
    one, which lives in the cache) and the adapter with every parent."""
    dirs = [] if model is None or model in TINY_NAMES else [("--model", resolve_model_path(model))]
    if adapter:
        chain = adapter_chain(adapter)[::-1]  # this adapter first
        dirs += [("--adapter" if i == 0 else "parent adapter", path) for i, (path, _) in enumerate(chain)]
    return dirs

def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Rebuild the adapter's stack on the model: each parent loaded and merged, root first, then this adapter
    added (unmerged) with its weights (every key and shape must match)."""
    chain = adapter_chain(adapter_dir)
    base = getattr(model, "name_or_path", "")
    for i, (path, cfg) in enumerate(chain):
        if cfg.base_sha256 and base and base_fingerprint(base) != cfg.base_sha256:
            raise data.UserError(f"{path}: trained on another base model ({cfg.base_model}; its config or tokenizer "
                                 f"differs from {base}'s): load it with the --model it was trained on")
        add_lora(model, cfg)
        try:
            state = load_file(str(path / "adapter.safetensors"))
        except (OSError, SafetensorError) as e:
            raise data.UserError(f"{path}/adapter.safetensors: unreadable ({e})") from e
        expected = adapter_state_dict(model)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise data.UserError(f"{path}: adapter keys do not match the model "
                                 f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise data.UserError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                     f"model wants {tuple(expected[key].shape)}")
        model.load_state_dict(state, strict=False)
        if i < len(chain) - 1:  # a parent: this adapter was trained on top of it, merged
            merge_lora(model)
    return chain[-1][1]

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad (the adapters, unless the caller unfroze more)."""
    return [p for p in model.parameters() if p.requires_grad]

# --------------------------------------------------------------------------------------------
# Generation with the in-process model: many prompts per batch, left padding, KV cache.

@dataclass
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

class Reply(str):
    """A reply's text, and beside it what an OpenAI-style server reports: prompt and completion tokens, and why it
    ended ("stop": a stop token, counted among the completion tokens; "length": the token limit)."""

    def __new__(cls, text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str):
        reply = super().__new__(cls, text)
        reply.prompt_tokens, reply.completion_tokens = prompt_tokens, completion_tokens
        reply.finish_reason = finish_reason
        return reply

def decoding(tokenizer, sampling: Sampling) -> GenerationConfig:
    """The one decoding configuration of every in-process reply (generate, evaluate, infer, serve), built fresh as
    upstream's engine builds it (LLaMA-Factory `chat/hf_engine.py` `_process_args`): nothing inherited from the
    checkpoint's generation_config.json (Qwen2-VL-7B-Instruct ships a repetition penalty of 1.05 and near-greedy
    sampling fields), repetition penalty 1, and a reply ends on the end token or any other special token."""
    stop_ids = [tokenizer.eos_token_id] + [i for i in tokenizer.extra_special_tokens_ids if i != tokenizer.eos_token_id]
    fields = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0, num_beams=1,
                  repetition_penalty=1.0, length_penalty=1.0, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                  use_cache=True)
    if sampling.temperature > 0:  # greedy leaves them unset, as upstream pops them (HF flags them otherwise)
        fields.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    return GenerationConfig(**fields)

def decoding_record(tokenizer, sampling: Sampling) -> dict:
    """decoding()'s fields as a run's config.json records them, the stop tokens by name."""
    record = decoding(tokenizer, sampling).to_diff_dict()
    record.pop("transformers_version", None)
    record["eos_token_id"] = tokenizer.convert_ids_to_tokens(record["eos_token_id"])
    return record

@torch.no_grad()
def sample(net: nn.Module, processor, prompts: list, sampling: Sampling = Sampling(),
           batch_size: int = 8, seed: int | None = None) -> list[Reply]:
    """The Reply for each (messages, images) prompt, rendered by chat.render_chat; batched, left-padded; decoded
    with decoding()'s configuration."""
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    pad_id, image_token_id = tokenizer.pad_token_id, net.config.image_token_id
    config = decoding(tokenizer, sampling)
    stop_ids = config.eos_token_id
    device = next(net.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    was_training = net.training
    net.eval()
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = [chat.encode(tokenizer, image_processor, messages, [im.size for im in images])[0]
                for messages, images in chunk]
        length = max(len(r) for r in rows)  # left padding: every prompt ends where generation starts
        input_ids = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows])  # [B, length]
        attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        images = [im for _, ims in chunk for im in ims]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "mm_token_type_ids": (input_ids == image_token_id).int()}
        if images:
            pixels = image_processor(images=[chat.fit_image(im, image_processor) for im in images], return_tensors="pt")
            inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        own, net.generation_config = net.generation_config, GenerationConfig()
        try:  # generate fills a passed config's unset fields from the model's own: a blank one meanwhile
            new = net.generate(**inputs, generation_config=config)
        finally:
            net.generation_config = own
        new = new[:, length:]  # [B, new tokens]
        for row, text, tokens in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True), new.tolist()):
            end = next((k + 1 for k, t in enumerate(tokens) if t in stop_ids), None)  # the stop token counts
            replies.append(Reply(text, len(row), end or len(tokens), "stop" if end else "length"))
    net.train(was_training)
    return replies

# --------------------------------------------------------------------------------------------
# Processes, devices and FSDP2 sharding for torchrun runs.

@dataclass
class Dist:
    """This process's place in the run (world size 1 for a plain `python` run)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

def setup_distributed(device: str = "auto") -> Dist:
    """Join torchrun's process group if launched by torchrun (nccl on CUDA, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        runs.die_with_parent(signal.SIGKILL)  # torchrun's ranks run in a session of their own: see there
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))

def all_reduce_sum(value: torch.Tensor, world: Dist) -> torch.Tensor:
    """value summed over ranks, in place (unchanged in a single process)."""
    if world.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value

def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors moved to device (non-tensor fields kept)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 weights on CUDA (adapters stay fp32), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]

def shard(root: nn.Module, net: nn.Module, mixed_precision: bool) -> None:
    """FSDP2 (`fully_shard`): each decoder layer, the vision tower as one unit, then `root` (the module whose forward
    computes the training objective, holding the rest: embeddings, final norm, lm_head). Frozen base and trainable
    LoRA weights share units. Gradients are summed over ranks, not averaged: losses are normalised by global counts."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    for layer in language_model(net).layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(net.model.visual, mp_policy=policy)  # own unit: called outside root's forward (generate, DPO features)
    fully_shard(root, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-scaled sum

@contextlib.contextmanager
def unsharded(root: nn.Module):
    """Gather the root unit's parameters for calls that bypass its forward (e.g. generate)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()
