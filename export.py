"""Export a trained adapter (with its whole parent chain) for stock tools: `visrl.py export`.

    python visrl.py export --adapter runs/dpo2/adapter --out exported            # merged checkpoint
    python visrl.py export --adapter runs/dpo2/adapter --out lora --format peft   # one PEFT LoRA

`merged`: a standard Hugging Face checkpoint directory (sharded safetensors, the base's config and tokenizer/processor
files) that `AutoModelForImageTextToText.from_pretrained` and vLLM load as they load the base model, without visrl.
`peft`: adapter_config.json + adapter_model.safetensors in PEFT's LoRA layout, for the raw base model. Both are written
to a temporary directory beside --out, then renamed: an interrupted export never leaves a complete-looking --out.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import data
import runs
import model

@dataclass
class ExportConfig:
    """Export a trained adapter and its parent chain: a merged checkpoint or one PEFT LoRA."""

    adapter: str  # trained adapter directory (adapter_config.json + adapter.safetensors)
    out: str = "runs/export"  # directory to write (must be absent or empty unless --overwrite)
    # the base checkpoint directory or `tiny`
    model: Annotated[str | None, runs.default("the base_model the adapter config names")] = None
    format: Literal["merged", "peft"] = "merged"  # merged weights, or a PEFT LoRA adapter for the raw base
    max_shard_size: str = "5GB"  # merged: weights are split into safetensors shards above this size
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: merged = the base config's dtype, peft = float32
    overwrite: bool = False  # replace a non-empty --out

# Files of a checkpoint directory that hold weights (written anew) rather than config/tokenizer/processor.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# Our image-only processors (model.py) -> the stock class they subclass, which stock transformers knows.
VISRL_PROCESSORS = {cls.__name__: cls.__bases__[0].__name__ for _, _, cls in model.ARCHS.values()}
PROCESSOR_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                  "merge_size", "patch_size", "temporal_patch_size", "resample", "rescale_factor", "size")

def stacked_lora(chain: list[tuple[Path, model.LoRAConfig]]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                      int]:
    """The chain as ONE LoRA with scaling 1: {module: (A_cat [R, in], B_cat [out, R])}, R = sum r_i. Adapter i was
    trained on the base with adapters 1..i-1 merged, so the final weight is W0 + sum_i s_i B_i A_i (s_i = alpha_i / r_i)
    = W0 + B_cat A_cat: the A_i stacked as rows, the s_i B_i as columns, in chain order. A module some adapter does not
    target gets zero rows/columns for it (a zero block adds exactly nothing): every module has the same rank R, and the
    config needs no rank_pattern/alpha_pattern."""
    states = [load_file(str(path / "adapter.safetensors")) for path, _ in chain]
    modules = sorted({k[: -len(".lora_A.weight")] for s in states for k in s if k.endswith(".lora_A.weight")})
    stacked = {}
    for name in modules:
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        fan_in, fan_out = next((s[a_key].shape[1], s[b_key].shape[0]) for s in states if a_key in s)
        parts = []  # (A_i, s_i B_i) per adapter
        for (path, cfg), state in zip(chain, states):
            if a_key not in state:
                parts.append((torch.zeros(cfg.rank, fan_in), torch.zeros(fan_out, cfg.rank)))
                continue
            a, b = state[a_key].float(), state[b_key].float()
            if a.shape != (cfg.rank, fan_in) or b.shape != (fan_out, cfg.rank):
                raise data.UserError(f"{path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                     f"expected rank {cfg.rank} on a {fan_out}x{fan_in} linear")
            parts.append((a, b * (cfg.alpha / cfg.rank)))  # each adapter's scaling folded into its B
        stacked[name] = (torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1))
    return stacked, sum(cfg.rank for _, cfg in chain)

def base_dtype(base: Path) -> str:
    """The dtype the base checkpoint's config names (`dtype`, or the older `torch_dtype`); float32 if none."""
    config = json.loads((base / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return name if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) else "float32"

def copy_base_files(base: Path, out: Path, dtype: str) -> list[str]:
    """Copy the base's config, tokenizer and processor files into `out` verbatim, so the export loads wherever the base
    loads; returns the files changed: config.json's dtype, and a `processor_class` naming one of our image-only classes
    (in a checkpoint visrl wrote, e.g. `tiny`), made the stock class plus a stock video processor entry, without which
    stock AutoProcessor silently returns a bare tokenizer or finds no video processor config (vLLM needs one)."""
    changed = []
    for src in sorted(base.iterdir()):
        if not src.is_file() or src.name.startswith(".") or src.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):
            continue
        shutil.copyfile(src, out / src.name)
        if src.suffix != ".json":
            continue
        content = json.loads(src.read_text())
        if src.name == "config.json":
            for section in [content] + [v for v in content.values() if isinstance(v, dict)]:
                section.update({key: dtype for key in ("dtype", "torch_dtype") if key in section})
            if "dtype" not in content and "torch_dtype" not in content:
                content["dtype"] = dtype
        elif isinstance(content, dict) and content.get("processor_class") in VISRL_PROCESSORS:
            content["processor_class"] = VISRL_PROCESSORS[content["processor_class"]]
            video_config = any((base / n).is_file() for n in ("video_preprocessor_config.json",
                                                               "preprocessor_config.json"))
            if "image_processor" in content and "video_processor" not in content and not video_config:
                image = content["image_processor"]
                content["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor",
                                              **{k: image[k] for k in PROCESSOR_KEYS if k in image}}
        if content != json.loads(src.read_text()):
            (out / src.name).write_text(json.dumps(content, indent=2) + "\n")
            changed.append(src.name)
    return changed

def write_merged(base: Path, adapter: Path, out: Path, dtype: str, max_shard_size: str) -> dict:
    """Base + adapter chain merged in float32, cast once to `dtype`, saved as a Hugging Face checkpoint."""
    net, _ = model.load_model(str(base), dtype=torch.float32)  # not bf16: the chain's merges round once, at the end
    model.load_adapter(net, adapter)  # rebuilds base + every parent (merged) + this adapter
    model.merge_lora(net)
    assert not model.lora_modules(net)
    net.to(getattr(torch, dtype))
    net.save_pretrained(out, max_shard_size=max_shard_size)  # safetensors, the original key layout, index if sharded
    return {"files_changed": copy_base_files(base, out, dtype)}

def write_peft(base: Path, chain: list[tuple[Path, model.LoRAConfig]], out: Path, dtype: str) -> dict:
    """The chain as one PEFT LoRA (see `stacked_lora`) for the raw base: adapter_config.json + weights."""
    stacked, rank = stacked_lora(chain)
    # The base's module tree on the meta device (no weights read): every factor must fit its nn.Linear, and same-named
    # linears the adapter must not touch are excluded (PEFT matches leaf names; Qwen2.5-VL's vision MLP has them too).
    config_cls, model_cls, _ = model.ARCHS[json.loads((base / "config.json").read_text())["model_type"]]
    with torch.device("meta"):
        net = model_cls(config_cls.from_pretrained(base))
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    for name, (a, b) in stacked.items():
        if name not in linears or (linears[name].out_features, linears[name].in_features) != (b.shape[0], a.shape[1]):
            raise data.UserError(f"adapter module {name} ({b.shape[0]}x{a.shape[1]}) is not a linear of {base}")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in stacked})
    exclude = sorted(n for n in linears if n.rsplit(".", 1)[-1] in leaves and n not in stacked)
    weights = {f"base_model.model.{name}.lora_{ab}.weight": factor.to(getattr(torch, dtype)).contiguous()
               for name, factors in stacked.items() for ab, factor in zip("AB", factors)}
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {  # PEFT's LoraConfig fields; scaling = lora_alpha / r = 1 (each s_i is folded into B)
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "revision": None,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": leaves,
        "exclude_modules": exclude or None, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "lora_bias": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "auto_mapping": None, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"rank": rank, "modules": len(stacked)}

def _commit(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory to `out` (a rename: --out is either old or complete)."""
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp and some writers use private modes; a checkpoint is meant to be shared
    for f in tmp.iterdir():
        f.chmod(0o666 & ~mask)
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)  # onto the empty placeholder; the old export is deleted only once replaced
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # rename onto an absent or empty directory

def export_command(cfg: ExportConfig) -> Path:
    """Run `visrl.py export`: check the inputs, write into a temporary directory, rename it to --out."""
    chain = model.adapter_chain(cfg.adapter)
    base_name = cfg.model or chain[-1][1].base_model
    if not base_name:
        raise data.UserError(f"{cfg.adapter}/adapter_config.json records no base_model; pass --model")
    base = model.resolve_model_path(base_name).resolve()
    out = Path(cfg.out).resolve()  # a real name and parent even for `--out .`
    existing = [p.name for p in sorted(out.iterdir())] if out.is_dir() else []  # any file: --overwrite or refused
    runs.check_out(out, existing, inputs=[("input", base)] + [("input", path) for path, _ in chain],
                   overwrite=cfg.overwrite, resumable=False)
    dtype = (base_dtype(base) if cfg.format == "merged" else "float32") if cfg.dtype == "auto" else cfg.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # same filesystem: rename is atomic
    try:
        details = (write_merged(base, Path(cfg.adapter), tmp, dtype, cfg.max_shard_size) if cfg.format == "merged"
                   else write_peft(base, chain, tmp, dtype))
        provenance = {"format": cfg.format, "dtype": dtype, "base_model": str(base), **details,
                      "adapters": [{"path": str(path.resolve()), **asdict(c)} for path, c in chain]}
        (tmp / "visrl_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if chain[-1][1].convention:  # prompts, crop, pixel cap, box form: evaluate/serve on the export keep them
            (tmp / runs.CONVENTION_FILE).write_text(json.dumps(chain[-1][1].convention, indent=2) + "\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{cfg.format} export of {cfg.adapter} ({len(chain)} adapter(s) on {base}, {dtype}) written to {out}")
    return out
