"""Benchmark: our DPO step against a naive one, same model, same batch, one run.

    python bench/dpo_step.py --size tiny       # or: mid (hidden 1024, vocab 32k, 576 image tokens), 7b-layer (GPU)

Ours: each unique image encoded once per step and shared by chosen/rejected rows and the reference
pass; hidden states taken at response positions only; fused chunked logsumexp + gather. Three forms of
it: `rows` (chosen and rejected as two full rows, a reference pass per step), `packed` (each pair's shared
prefix once: `dpo --shared-prefix`, the default; a reference pass per step), `packed-pre` (packed, the
reference precomputed before training as `dpo` does by default: the step runs the policy only).
Naive (written here, as common DPO trainers do it): pixel values in every row's forward, so each
image is encoded for every row of the policy and again for the reference; full [rows, seq, vocab]
fp32 logits + log_softmax + gather; a separate reference forward.

Each variant runs in its own subprocess. Step memory = the peak during one step minus the memory
held before it (model and batch, the same for both): on CUDA from torch.cuda.max_memory_allocated,
on CPU from the kernel's resident-set high-water mark (VmHWM), reset just before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import model  # noqa: E402
import shapes  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

SIZES = {
    # name: (TinyConfig overrides, text vocab, image side in px, max_pixels)
    "tiny": (dict(), None, 560, 224 * 224),
    "mid": (dict(hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16, num_kv_heads=4,
                 vision_hidden=256, vision_depth=2, vision_heads=4), 32768, 672, 672 * 672),
    # one Qwen2.5-VL-7B decoder layer shape (hidden 3584, 28 heads, 4 kv heads, vocab 152k), 2 layers
    "7b-layer": (dict(hidden_size=3584, intermediate_size=18944, num_layers=2, num_heads=28, num_kv_heads=4,
                      vision_hidden=1280, vision_depth=2, vision_heads=16), 152064, 672, 672 * 672),
}


def build(size: str, device: torch.device):
    """A random model of the given size, the tiny tokenizer, and an image processor for it."""
    overrides, vocab, side, max_pixels = SIZES[size]
    tiny_path = model.resolve_model_path("tiny")
    _, processor = model.load_model(str(tiny_path))
    cfg = shapes.TinyConfig(**overrides)
    config = shapes.tiny_model_config(cfg, processor.tokenizer)
    if vocab:
        config.text_config.vocab_size = vocab
    _, model_cls, _ = model.ARCHS["qwen2_5_vl"]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net = model_cls(config).to(device=device, dtype=dtype)
    model.add_lora(net, model.LoRAConfig(rank=8, alpha=16))
    for m in model.lora_modules(net).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.01)
    processor.image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    return net, processor, side


def make_pairs(n_pairs: int, side: int, root: Path) -> list[data.Pair]:
    """Stage-2 pairs on random images: a ~20-token box text, a short answer (the recipe's shapes)."""
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n_pairs):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        record = data.Record(str(i), str(path), "What digit is inside the red frame?", ["7"], [], side, side, f"bench:{i}")
        pairs.append(data.Pair(record, "[0.312, 0.145, 0.398, 0.231]", "[0.702, 0.655, 0.811, 0.790]",
                               "The digit is 7.", "The digit is 1."))
    return pairs


def naive_logps(net, rows: list[dict], pad_id: int, image_token_id: int) -> torch.Tensor:
    """Full-logits baseline: every row's images go through the vision tower in this forward."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.tensor([row["input_ids"] + [pad_id] * (length - len(row["input_ids"])) for row in rows])
    labels = torch.tensor([row["labels"] + [chat.IGNORE_INDEX] * (length - len(row["labels"])) for row in rows])
    batch = {"input_ids": input_ids, "attention_mask": (torch.arange(length)[None] < torch.tensor(
                 [[len(row["input_ids"])] for row in rows])).long(),
             "mm_token_type_ids": (input_ids == image_token_id).int(),
             "pixel_values": torch.cat([row["pixel_values"] for row in rows]),
             "image_grid_thw": torch.cat([row["image_grid_thw"] for row in rows])}
    batch = {k: v.to(net.device) for k, v in batch.items()}
    labels = labels.to(net.device)
    logits = net(**batch).logits.float()  # [rows, L, V] fp32
    logps = torch.log_softmax(logits[:, :-1], dim=-1)  # [rows, L-1, V]
    targets = labels[:, 1:]
    mask = targets != chat.IGNORE_INDEX
    token_logps = logps.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (token_logps * mask).sum(-1)


VARIANTS = ("naive", "rows", "packed", "packed-pre")


def run_variant(size: str, variant: str, n_pairs: int, steps: int, device: torch.device,
                profile: bool = False) -> dict:
    net, processor, side = build(size, device)
    pad_id, image_token_id = processor.tokenizer.pad_token_id, net.config.image_token_id
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_pairs(n_pairs, side, Path(tmp))
        samples = [s for p in pairs for s in chat.dpo_samples(p, processor.tokenizer, processor.image_processor, 2)]
        if variant != "naive":
            batch = dpo.collate_pairs(samples, processor.image_processor, pad_id, image_token_id,
                                      shared_prefix=variant != "rows")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if variant == "packed-pre":  # the table `dpo` computes once before training
                with torch.no_grad(), model.adapters_disabled(net):
                    table = dpo.sequence_logps(net, batch, dpo.encode_images(net, batch)).detach()
        else:
            rows = []
            for side_name in ("chosen", "rejected"):
                for s in samples:
                    image = data.load_image(s.pair.record)
                    row = getattr(s, side_name)
                    pixels = processor.image_processor(
                        images=[image if w is None else image.crop(w) for w in row.images], return_tensors="pt")
                    rows.append({"input_ids": row.input_ids, "labels": row.labels, **pixels})
        n_tokens = sum(len(s.chosen.input_ids) + len(s.rejected.input_ids) for s in samples)
        image_tokens = chat.image_token_count(side, side, processor.image_processor)

        def step():
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
            with autocast:
                if variant != "naive":
                    features = dpo.encode_images(net, batch)
                    policy = dpo.sequence_logps(net, batch, features)
                    if variant == "packed-pre":
                        reference = table
                    else:
                        with torch.no_grad(), model.adapters_disabled(net):
                            reference = dpo.sequence_logps(net, batch, features)
                else:
                    policy = naive_logps(net, rows, pad_id, image_token_id)
                    with torch.no_grad(), model.adapters_disabled(net):
                        reference = naive_logps(net, rows, pad_id, image_token_id)
                n = len(samples)
                losses, _, _ = dpo.preference_loss(policy[:n], policy[n:], reference[:n], reference[n:], 0.1)
            losses.mean().backward()
            net.zero_grad(set_to_none=True)

        step()  # warm-up: one-time library and allocator set-up is not the step's memory
        # On CPU the kernel's high-water mark of resident memory is reset to the current RSS
        # (/proc/self/clear_refs), so VmHWM afterwards is this step's peak; glibc is told (by the
        # parent, through MALLOC_* variables) to hand freed memory back at once, so RSS tracks live tensors.
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        else:
            base_mem = rss_bytes()
            Path("/proc/self/clear_refs").write_text("5")
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_rss_bytes()
        step_mem = max(peak - base_mem, 0)
        if profile:  # where a step's time goes: the top operators by their own CPU time
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    decoder_tokens = n_tokens if variant in ("naive", "rows") else int((batch["packed_segment"] >= 0).sum())
    return {"size": size, "variant": variant, "step_s": float(np.median(times)), "peak_bytes": peak,
            "step_mem_bytes": step_mem, "pairs": n_pairs, "rows": 4 * n_pairs, "tokens": n_tokens,
            "decoder_tokens_per_pass": decoder_tokens,
            "image_tokens_per_full_image": image_tokens,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: the peak resident set size since start or since the last clear_refs reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_subprocess(args, variant: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--size", args.size, "--pairs", str(args.pairs), "--steps", str(args.steps),
           "--device", args.device, "--variant", variant]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode:
        sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step (each: box + answer sample)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--profile", action="store_true", help="with one --variant: its top operators (stderr)")
    args = parser.parse_args()
    if args.variant != "all":
        print(json.dumps(run_variant(args.size, args.variant, args.pairs, args.steps, torch.device(args.device),
                                     args.profile)))
        return
    results = {}
    for variant in VARIANTS:
        # Two processes per variant: timing under the default allocator; memory with glibc told to hand
        # freed memory back at once (slower, but then RSS tracks live tensors). Each peak is its own.
        timed = run_subprocess(args, variant, {})
        measured = run_subprocess(args, variant, {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
        results[variant] = {**timed, "step_mem_bytes": measured["step_mem_bytes"], "peak_bytes": measured["peak_bytes"]}
    naive = results["naive"]
    print(json.dumps(results, indent=2))
    print(f"\n{args.size}, {naive['device']}, {args.pairs} stage-2 pairs per step ({naive['rows']} sequences, "
          f"{naive['tokens']} tokens), {naive['image_tokens_per_full_image']} image tokens per full image\n")
    print("| variant | decoder tokens / pass | step | speed-up vs naive | step memory | memory vs naive |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        print(f"| {variant} | {r['decoder_tokens_per_pass']} | {r['step_s']:.3f} s | {naive['step_s'] / r['step_s']:.2f}x | "
              f"{r['step_mem_bytes'] / 2**20:.0f} MiB | {r['step_mem_bytes'] / max(naive['step_mem_bytes'], 1):.2f}x |")


if __name__ == "__main__":
    main()
