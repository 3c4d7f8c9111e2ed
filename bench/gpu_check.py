"""The GPU check: every CLI stage on CUDA, then DPO steps of the full Qwen2.5-VL-7B shape, in one markdown table.

    python bench/gpu_check.py                      # one H100/H200: < 8 minutes, no network
    python bench/gpu_check.py --device cpu         # a dry run at toy sizes (the tiny model): the code paths only

1. Smoke: `visrl.py sft`, `generate.py`, `visrl.py dpo --stage 1` and `--stage 2`, `evaluate.py`, `visrl.py export`,
   `visrl.py infer` on the tiny model and a small synthetic set, each a subprocess on the device; exit code and time.
2. A DPO stage-2 step (upstream's: 3 pairs a micro-batch, LoRA r8 on every linear) of a random checkpoint with
   Qwen2.5-VL-7B's published shape, all 28 layers, bf16 weights, sdpa, FSDP2 at world size 1, built on the device
   (nothing written to disk): without and with gradient checkpointing, torch.cuda.max_memory_allocated over the
   timed steps, the median step time, MFU from bench/memory_plan.py's FLOPs, and the plan's prediction beside each.
   The step is visrl's own: dpo.build (samples, the precomputed reference), model.shard, visrl.train_step.
3. TRL: when `.venv-trl` exists (bench/dpo_vs_trl.py says how to make it), that benchmark's `mid` comparison on
   this device, one round.
Writes the table to stdout and to --out (default gpu_check.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first: bench/generate.py must not stand for the project's generate.py
import data  # noqa: E402
import dpo  # noqa: E402
import memory_plan  # noqa: E402
import model  # noqa: E402
import synth  # noqa: E402
import visrl  # noqa: E402

GIB = 2 ** 30

def smoke(work: Path, device: str) -> list[str]:
    """Each CLI stage once on the tiny model; a table row each (a failed stage's last stderr line in it)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    d = work / "synth"
    synth.make_synth(d, n_train=16, n_val=6, n_test=4, seed=0)
    run = work / "runs"
    stages = [
        ("sft", ["visrl.py", "sft", "--data", str(d), "--out", f"{run}/sft", "--limit", "8", "--max-steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--val-fraction", "0"]),
        ("generate", ["generate.py", "--adapter", f"{run}/sft/adapter", "--data", str(d), "--split", "val",
                      "--out", f"{run}/generate", "--max-new-tokens", "16"]),
        ("dpo stage 1", ["visrl.py", "dpo", "--stage", "1", "--data", str(d / "pairs.jsonl"), "--out",
                         f"{run}/dpo1", "--init-adapter", f"{run}/sft/adapter", "--max-steps", "2", "--batch-size",
                         "2", "--grad-accum", "1", "--val-fraction", "0"]),
        ("dpo stage 2", ["visrl.py", "dpo", "--stage", "2", "--data", str(d / "pairs.jsonl"), "--out",
                         f"{run}/dpo2", "--init-adapter", f"{run}/dpo1/adapter", "--max-steps", "2", "--batch-size",
                         "2", "--grad-accum", "1", "--val-fraction", "0"]),
        ("eval", ["evaluate.py", "--adapter", f"{run}/dpo2/adapter", "--data", str(d), "--out", f"{run}/eval",
                  "--max-new-tokens", "16"]),
        ("export", ["visrl.py", "export", "--adapter", f"{run}/dpo2/adapter", "--out", f"{run}/merged"]),
        ("infer", ["visrl.py", "infer", "--adapter", f"{run}/dpo2/adapter", "--image",
                   str(sorted((d / "images").iterdir())[0]), "--question", "What pattern is inside the red frame?",
                   "--out", f"{run}/infer.png", "--max-new-tokens", "16"]),
    ]
    rows = []
    for name, cmd in stages:
        if name == "dpo stage 1":  # the generated pairs, or hand-made ones if the tiny random model kept none
            generated = run / "generate" / "pairs.jsonl"
            pairs = generated if generated.exists() and generated.read_text().strip() else \
                memory_plan.write_pairs(data.read_records(d / "train.jsonl")[:8], d / "made-pairs.jsonl")
            (d / "pairs.jsonl").write_text(pairs.read_text())
        start = time.time()
        result = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        said = (result.stderr.strip().splitlines() or [""])[-1][:100].replace("|", "/")
        if result.returncode == 0:
            verdict = "ok"
        elif name == "generate" and "no preference pair kept" in said:  # ran; a 2-step random model keeps none
            verdict = "ok (no pair kept from a 2-step tiny model: hand-made pairs for dpo)"
        else:
            verdict = f"FAILED: {said}"
        rows.append(f"| smoke: {name} | {verdict} | {time.time() - start:.1f} s |")
    return rows

def dpo_step(work: Path, device: torch.device, config_dir: Path, grad_checkpointing: bool, steps: int) -> dict:
    """Timed DPO stage-2 steps of random weights for the checkpoint config in config_dir, built on the device, FSDP2
    at world size 1."""
    processor = model.load_processor(str(config_dir))
    config = model.ARCHS["qwen2_5_vl"][0].from_pretrained(config_dir)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        net = model.ARCHS["qwen2_5_vl"][1]._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    net.name_or_path = str(config_dir)
    lora = model.LoRAConfig(rank=8, alpha=16.0)
    model.add_lora(net, lora)
    if grad_checkpointing:
        net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    world = model.Dist(0, 1, device)
    pairs = memory_plan.write_pairs(data.read_records(work / "synth" / "train.jsonl")[:3 * (steps + 1)],
                                    work / "step-pairs.jsonl")
    cfg = dpo.DPOConfig(data=str(pairs), stage=2, batch_size=3, grad_accum=1, val_fraction=0.0,
                        out=str(work / "step"), dtype="bfloat16", max_steps=steps + 1)
    stage = dpo.build(cfg, net, processor, lora, world)
    objective = stage.objective
    model.shard(objective, net, mixed_precision=device.type == "cuda")
    params = model.trainable_parameters(objective)
    optimizer, scheduler = visrl.make_optimizer(params, cfg.lr, steps + 1, cfg.warmup_ratio)
    batches = [model.to_device(stage.collate(stage.items[i:i + 3]), device) for i in range(0, 3 * (steps + 1), 3)]
    visrl.train_step(objective, batches[:1], params, optimizer, scheduler, world)  # warm-up: kernels, Adam's state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for batch in batches[1:]:
        start = time.time()
        visrl.train_step(objective, [batch], params, optimizer, scheduler, world)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - start)
    measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    sizes = memory_plan.sizes_of(config)
    micro = max((memory_plan.micro_of(b) for b in batches[1:]), key=lambda m: m.rows * m.row_len)
    setup = memory_plan.Setup(world=1, fsdp=True, grad_checkpointing=grad_checkpointing,
                              adapter_inputs="bf16" if device.type == "cuda" else "fp32")
    predicted = sum(memory_plan.plan(sizes, micro, setup).values())
    flops = memory_plan.step_flops(sizes, micro, setup)
    del objective, net, optimizer, scheduler, params, batches, stage
    gc.collect()  # the next run's model must not share the card with this one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(micro=micro, measured=measured, predicted=predicted, seconds=statistics.median(times), flops=flops)

def single_process_group(device: torch.device) -> None:
    """A process group of one (FSDP2 needs one): nccl on CUDA, gloo on the CPU, on a free local port."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)

def peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of this GPU (H100 / H200), for MFU; None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in memory_plan.BF16_PEAK_FLOPS.items() if k in name), None)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="gpu_check.md", help="where the table goes (also printed)")
    p.add_argument("--work", help="a directory for its data and runs (default: a new temporary one)")
    p.add_argument("--steps", type=int, default=3, help="timed DPO steps (after one warm-up step)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --device cpu runs the dry run", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check."))
    # a dry run on the CPU: the same code at toy sizes, the tiny model's (the 7B shape's are minutes a step there)
    if args.device == "cuda":
        shape, config_dir = "qwen2.5-vl-7b (28 layers)", work / "qwen2.5-vl-7b-config"
        if not (config_dir / "config.json").exists():
            model.make_shape(config_dir, "qwen2.5-vl-7b", config_only=True)
    else:
        shape, config_dir = "the tiny model", model.resolve_model_path("tiny")
    began = time.time()
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    lines = [f"gpu_check on {what}, torch {torch.__version__}", "", "| what | result | time |", "|---|---|---:|"]
    lines += smoke(work, args.device)
    print("\n".join(lines), flush=True)
    single_process_group(device)
    peak = peak_flops(device)
    step_rows = ["", f"DPO stage 2, {shape}, bf16, sdpa, FSDP2 at world size 1, 3 pairs a "
                 "micro-batch, LoRA r8:", "",
                 "| checkpointing | rows x tokens | peak allocated | plan | plan error | s/step | TFLOP/step | MFU |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ckpt in (False, True):
        r = dpo_step(work, device, config_dir, ckpt, args.steps)
        m = r["micro"]
        measured = f"{r['measured'] / GIB:.1f} GiB" if r["measured"] else "n/a (CPU)"
        error = f"{100 * (r['predicted'] / r['measured'] - 1):+.0f}%" if r["measured"] else "n/a"
        mfu = f"{100 * r['flops']['model'] / r['seconds'] / peak:.0f}%" if peak else "n/a"
        step_rows.append(f"| {'on' if ckpt else 'off'} | {m.rows} x {m.row_len} | {measured} | "
                         f"{r['predicted'] / GIB:.1f} GiB | {error} | {r['seconds']:.2f} | "
                         f"{r['flops']['model'] / 1e12:.1f} | {mfu} |")
        print(step_rows[-1], flush=True)
    lines += step_rows
    trl_python = ROOT / ".venv-trl" / "bin" / "python"
    if trl_python.exists():
        result = subprocess.run([sys.executable, "bench/dpo_vs_trl.py", "--config", "mid", "--steps", "4",
                                 "--rounds", "1", "--device", args.device], cwd=ROOT, capture_output=True, text=True)
        lines += ["", "TRL beside visrl (bench/dpo_vs_trl.py --config mid --steps 4 --rounds 1):", "",
                  result.stdout.strip() or f"failed: {result.stderr.strip()[-300:]}"]
    else:
        lines += ["", "TRL: not run (no .venv-trl; bench/dpo_vs_trl.py says how to make it)"]
    lines += ["", f"total {time.time() - began:.0f} s"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-3:]))
    return 0

if __name__ == "__main__":
    sys.exit(main())
