"""Benchmark: TRL's DPOTrainer against visrl's `dpo`, same checkpoint, same pairs, same settings, one run.

    python3 -m venv .venv-trl && . .venv-trl/bin/activate          # TRL lives only here, never in visrl
    pip install torch==2.13.0 && pip install -r requirements.txt -r bench/requirements-trl.txt && deactivate
    . .venv/bin/activate && python bench/dpo_vs_trl.py --config mid --steps 8 --rounds 2

A random Qwen2.5-VL checkpoint of the chosen size is written once (`toy`: hidden 256, vocab 4k; `mid`:
hidden 1024, 8 layers, vocab 32k, 576 image tokens per image), with stage-1 pairs on random images (a
question with the focus instruction, a ~20-token box as chosen and as rejected). Both sides train LoRA r8
(alpha 16) on every linear layer of the language model, fp32, sigmoid loss, beta 0.1, lr 5e-6 with 10%
warm-up then cosine, `--pairs` pairs per step, for `--steps` steps; the runs alternate (TRL, visrl, TRL,
visrl ...), each in its own process: TRL's in `.venv-trl`, visrl's `python visrl.py dpo` code path
(visrl.train) with its defaults (shared prefix, reference precomputed before training).

Reported per side (medians over rounds): s/step (median over steps after the first), peak memory increase
during the steps (on CPU the kernel's resident-set high-water mark, reset when training starts, minus the
resident set then; with --device cuda, bf16, torch.cuda.max_memory_allocated minus the allocation then), tokens and completion tokens per step, images encoded per step, the final step's loss, and for
visrl the one-time reference pass. Equal work is shown by the token counts: TRL's chat template ends each
completion with one more token ("\\n" after <|im_end|>) than visrl's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from dpo_step import peak_rss_bytes, rss_bytes  # noqa: E402  (the same memory reading as the DPO step bench)

CONFIGS = {
    # name: (TinyConfig overrides, text vocab, image side in px, max_pixels)
    "toy": (dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2), 4096, 448,
            448 * 448),
    "mid": (dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4,
                 vision_hidden=256, vision_depth=2, vision_heads=4), 32768, 672, 672 * 672),
    # Qwen2.5-VL-7B's shapes (random weights), for a GPU: --device cuda (bf16). Not run yet: no GPU so far.
    "7b": (dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                vision_hidden=1280, vision_depth=32, vision_heads=16), 152064, 672, 672 * 672),
}
QUESTION = "What pattern is inside the red frame?"
CHOSEN, REJECTED = "[0.312, 0.145, 0.398, 0.231]", "[0.702, 0.655, 0.811, 0.790]"


class MemoryWindow:
    """Memory at the start of training and the peak from then on: resident set on CPU, allocated on CUDA."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS

    def increase(self) -> int:
        if self.cuda:
            import torch

            return max(torch.cuda.max_memory_allocated() - self.base, 0)
        return max(peak_rss_bytes() - self.base, 0)


# --------------------------------------------------------------------------------------------
# The shared inputs: a checkpoint directory and the pairs (written by the main venv's process).


def write_inputs(config: str, n_pairs: int, root: Path) -> tuple[Path, Path]:
    """A random checkpoint of the config's size and n_pairs stage-1 pairs (pairs.jsonl + PNGs)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import data
    import model
    import shapes

    overrides, vocab, side, max_pixels = CONFIGS[config]
    _, processor = model.load_model("tiny")
    tiny = shapes.TinyConfig(**overrides)
    model_config = shapes.tiny_model_config(tiny, processor.tokenizer)
    model_config.text_config.vocab_size = vocab
    _, model_cls, processor_cls = model.ARCHS["qwen2_5_vl"]
    torch.manual_seed(0)
    net = model_cls(model_config)
    torch.nn.init.normal_(net.lm_head.weight, std=tiny.lm_head_std)
    checkpoint = root / "checkpoint"
    net.save_pretrained(checkpoint)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    processor_cls(image_processor=image_processor, tokenizer=processor.tokenizer,
                  chat_template=shapes.QWEN_VL_CHAT_TEMPLATE).save_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_pairs):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        record = data.Record(str(i), str(path), QUESTION, ["dotted"], [], side, side, f"bench:{i}")
        lines.append(json.dumps(data.pair_json(data.Pair(record, CHOSEN, REJECTED, "dotted", "grid"), root)))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return checkpoint, root / "pairs.jsonl"


# --------------------------------------------------------------------------------------------
# The two workers, each run in its own process.


def run_trl(checkpoint: Path, pairs: Path, n_pairs: int, steps: int, device: str) -> dict:
    """TRL's DPOTrainer with a PEFT LoRA (the reference = adapters off), conversational vision examples."""
    import datasets
    import peft
    import torch
    import trl
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

    import chat
    import model  # noqa: F401  (registers the image-only processor class with AutoProcessor)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    net = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype)
    processor = AutoProcessor.from_pretrained(checkpoint)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    examples = [{"images": [Image.open(pairs.parent / r["image"]).convert("RGB")],
                 "prompt": [{"role": "user", "content": [
                     {"type": "image"}, {"type": "text", "text": r["question"] + " " + chat.FOCUS_INSTRUCTION}]}],
                 "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen_box"]}]}],
                 "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected_box"]}]}]}
                for r in rows]
    memory, times, counts = MemoryWindow(device), [], []

    class Measure(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            memory.start()

        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=n_pairs, max_steps=steps, learning_rate=5e-6,
                             lr_scheduler_type="cosine", warmup_steps=math.ceil(0.1 * steps), beta=0.1, loss_type=["sigmoid"],
                             max_length=None, use_cpu=device == "cpu", bf16=device == "cuda", report_to="none", logging_steps=1,
                             save_strategy="no", dataloader_num_workers=0, seed=0, disable_dropout=True)
        lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
        trainer = trl.DPOTrainer(model=net, args=args, train_dataset=datasets.Dataset.from_list(examples),
                                 processing_class=processor, peft_config=lora, callbacks=[Measure()])
        collate = trainer.data_collator

        def counting(batch):
            out_batch = collate(batch)
            counts.append((int(out_batch["attention_mask"].sum()), int(out_batch["completion_mask"].sum()),
                           len(out_batch["image_grid_thw"])))
            return out_batch

        trainer.data_collator = counting
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens, completion, images = counts[0]
    return {"side": "trl", "step_s": statistics.median(times[1:]), "mem_increase": memory.increase(),
            "tokens_per_step": tokens, "completion_tokens_per_step": completion,
            # each row's images in the policy forward and again in the reference forward
            "images_encoded_per_step": 2 * images, "final_loss": losses[-1], "reference_s": 0.0,
            "version": f"trl {trl.__version__}, peft {peft.__version__}"}


def run_visrl(checkpoint: Path, pairs: Path, n_pairs: int, steps: int, device: str) -> dict:
    """visrl's dpo (visrl.train) with its defaults: shared prefix, the reference precomputed before the steps."""
    import chat
    import data
    import dpo
    import model
    import visrl

    memory, reference_s = MemoryWindow(device), []
    real_precompute, real_optimizer = dpo.precompute_reference, visrl.make_optimizer

    def timed_precompute(*args):
        start = time.perf_counter()
        table = real_precompute(*args)
        reference_s.append(time.perf_counter() - start)
        return table

    def optimizer_then_measure(*args):  # the last thing before the loop: training memory starts here
        result = real_optimizer(*args)
        memory.start()
        return result

    dpo.precompute_reference, visrl.make_optimizer = timed_precompute, optimizer_then_measure
    with tempfile.TemporaryDirectory() as out:
        cfg = dpo.DPOConfig(data=str(pairs), stage=1, model=str(checkpoint), out=out, batch_size=n_pairs, lr=5e-6,
                            beta=0.1, max_steps=steps, lora_rank=8, lora_alpha=16.0, seed=0,
                            dtype="bfloat16" if device == "cuda" else "float32")
        visrl.train(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [0.0] + [r["elapsed_s"] for r in rows]
    times = [b - a for a, b in zip(elapsed, elapsed[1:])]
    _, processor = model.load_model(str(checkpoint))
    pair = data.read_pairs(pairs)[0]
    sample = chat.dpo_samples(pair, processor.tokenizer, processor.image_processor, 1)[0]
    tokens = len(sample.chosen.input_ids) + len(sample.rejected.input_ids)
    completion = sum(t != chat.IGNORE_INDEX for t in sample.chosen.labels + sample.rejected.labels)
    return {"side": "visrl", "step_s": statistics.median(times[1:]), "mem_increase": memory.increase(),
            "tokens_per_step": n_pairs * tokens, "completion_tokens_per_step": n_pairs * completion,
            "decoder_tokens_per_step": n_pairs * (tokens - dpo.shared_prefix_length(
                sample.chosen, sample.rejected, processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))),
            "images_encoded_per_step": n_pairs,  # one page per pair, once; the reference pass is precomputed
            "final_loss": rows[-1]["loss"], "reference_s": reference_s[0] if reference_s else 0.0,
            "version": "visrl (this checkout)"}


# --------------------------------------------------------------------------------------------


def worker(side: str, args) -> dict:
    """One run of one side in its own process (TRL's in its own venv); its result line."""
    cmd = [str(args.trl_python if side == "trl" else sys.executable), __file__, "--worker", side,
           "--checkpoint", str(args.checkpoint), "--pairs-file", str(args.pairs_file), "--pairs", str(args.pairs),
           "--steps", str(args.steps), "--device", args.device]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None  # visrl takes a GPU it sees
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="toy")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="TRL, visrl alternations")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    parser.add_argument("--worker", choices=["trl", "visrl"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_trl if args.worker == "trl" else run_visrl
        print(json.dumps(run(args.checkpoint, args.pairs_file, args.pairs, args.steps, args.device)))
        return
    if not Path(args.trl_python).exists():
        sys.exit(f"no {args.trl_python}: set up .venv-trl as this file's docstring says")
    with tempfile.TemporaryDirectory() as tmp:
        # enough pairs that no run sees the same batch twice in its steps
        args.checkpoint, args.pairs_file = write_inputs(args.config, args.pairs * args.steps, Path(tmp))
        results = {"trl": [], "visrl": []}
        for round_no in range(args.rounds):
            for side in ("trl", "visrl"):
                results[side].append(worker(side, args))
                r = results[side][-1]
                print(f"round {round_no + 1} {side}: {r['step_s']:.3f} s/step, +{r['mem_increase'] / 2**20:.0f} MiB, "
                      f"final loss {r['final_loss']:.4f}", file=sys.stderr, flush=True)
    summary = {}
    for side, runs in results.items():
        summary[side] = {**runs[-1], "step_s": statistics.median(r["step_s"] for r in runs),
                         "mem_increase": statistics.median(r["mem_increase"] for r in runs),
                         "step_s_all": [round(r["step_s"], 4) for r in runs]}
    trl_side, ours = summary["trl"], summary["visrl"]
    print(json.dumps(summary, indent=2))
    print(f"\n{args.config}: {args.pairs} pairs per step, {args.steps} steps, {args.rounds} rounds; "
          f"{trl_side['version']} vs {ours['version']}\n")
    print("| side | s/step | speed-up | peak memory increase | ratio | tokens/step | completion tokens/step | "
          "images encoded/step | final loss | one-time reference pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side, r in summary.items():
        print(f"| {side} | {r['step_s']:.3f} | {trl_side['step_s'] / r['step_s']:.2f}x | "
              f"{r['mem_increase'] / 2**20:.0f} MiB | {r['mem_increase'] / max(trl_side['mem_increase'], 1):.2f}x | "
              f"{r['tokens_per_step']} | {r['completion_tokens_per_step']} | {r['images_encoded_per_step']} | "
              f"{r['final_loss']:.4f} | {r['reference_s']:.1f} s |")


if __name__ == "__main__":
    main()
