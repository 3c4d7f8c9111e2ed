"""visrl: intention-driven perception for Qwen-VL models (VisRL recipe). CLI and the one training loop.

    python visrl.py tiny --out DIR          write the built-in tiny checkpoint
    python visrl.py synth --out DIR         write the synthetic intention-driven VQA set
    python visrl.py sft [flags]             supervised warm-up (focus + answer samples), LoRA
    python visrl.py generate --adapter DIR --data Q.jsonl   self-generated preference pairs (= python generate.py)
    python visrl.py dpo --stage 1|2 --data pairs.jsonl --init-adapter DIR   preference optimisation
    python visrl.py eval --adapter DIR --data DIR|synth      two-step evaluation (= python evaluate.py)
    torchrun --nproc_per_node N visrl.py sft ...   the same loop, N processes (FSDP2)
    python visrl.py export --adapter DIR --out DIR [--format merged|peft]   a checkpoint/adapter for stock tools
    python visrl.py infer --image PATH --question TEXT   two-step inference on one image, with a picture
    python visrl.py serve [--port 8000]     an OpenAI-compatible server on the in-process model
    python visrl.py demo --out DIR          the whole recipe on the tiny model, with a table and plots

One loop for every objective: `train` runs the stage (model.Stage) that the config's build gives (build_sft, dpo.build).
The path of data in `sft`: record -> samples (chat.sft_samples: tokens, image windows) -> batch (chat.collate: each
distinct image processed once) -> image features once (dpo.encode_images) -> hidden states at supervised positions only
-> fused log-probs (dpo.token_logps) -> negative sum over the step's tokens. DPO sums them per sequence (dpo.py's top).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import tyro
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

import chat
import data
import demo
import dpo
import evaluate
import export
import generate
import grpo
import model
import runs
import serve
import synth

# --------------------------------------------------------------------------------------------
# Supervised warm-up: its config, samples, batches, loss, and its stage for the loop.

@dataclass
class SFTConfig(model.TrainConfig):
    """Supervised warm-up: LoRA on the language model, loss on assistant tokens only."""

    out: str = "runs/sft"  # where adapter/, config.json and metrics.jsonl go
    # also train the bare question on the ground-truth crop alone: what generate.py's scorer asks of box-less questions
    crop_alone_samples: bool = False
    # keep each processed image (page view, crop) in memory: decoded once, not per sample and epoch (~0.6 MB per record)
    cache_pixels: bool = False
    focus_first_steps: int = 0  # the first N optimizer steps draw focus (box) samples only, then all kinds (0: none)

def build_sft_samples(cfg: SFTConfig, records: list[data.Record], processor, world: model.Dist) -> list[chat.Sample]:
    """Every record's focus and answer (and crop-alone) samples; over-long ones dropped with a count."""
    cfg = runs.resolve_convention(cfg)
    per_record = [chat.sft_samples(record, processor.tokenizer, processor.image_processor, cfg.box_form, cfg.crop,
                                   cfg.crop_alone_samples, cfg.prompts) for record in records]
    built = [sample for pair in per_record for sample in pair]
    samples = [sample for sample in built if len(sample.input_ids) <= cfg.max_len]
    no_box, too_long = sum(not pair for pair in per_record), len(built) - len(samples)
    if world.is_main and (too_long or no_box):
        print(f"warning: sft dropped {too_long} samples longer than {cfg.max_len} tokens and "
              f"{no_box} records without a box", file=sys.stderr)
    if not samples:
        raise data.UserError("sft: no trainable samples (every record lacks a box or is too long)")
    return samples

def sft_index_stream(cfg: SFTConfig, samples: list[chat.Sample], world: model.Dist, start_step: int):
    """This rank's micro-batches of sample indices from optimizer step start_step on: focus samples only for the
    first cfg.focus_first_steps steps, then every sample (each part resumes at its own position)."""
    focus = [i for i, sample in enumerate(samples) if sample.kind == "focus"]
    first, done = cfg.focus_first_steps * cfg.grad_accum, start_step * cfg.grad_accum  # in micro-batches
    if done < first:
        focus_batches = batch_stream(len(focus), cfg.batch_size, world, cfg.seed, start=done)
        for _ in range(first - done):
            yield [focus[i] for i in next(focus_batches)]
    yield from batch_stream(len(samples), cfg.batch_size, world, cfg.seed, start=max(0, done - first))

def sft_loss(net, batch: dict, n_tokens: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised tokens / the step's token count, by DPO's fused log-prob path."""
    return -dpo.token_logps(net, batch, dpo.encode_images(net, batch), chunk_size).sum() / n_tokens

class SFTObjective(nn.Module):
    """sft_loss as a module: FSDP2 gathers a root unit's parameters around its forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch: dict, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (loss, this batch's tokens [1]: summed over the step and the ranks for the tokens/s the row logs)
        return sft_loss(self.net, batch, n_tokens), batch["attention_mask"].sum().float()[None]

    def item_counts(self, samples: list[chat.Sample]) -> torch.Tensor:
        """Supervised tokens of these samples [] (the held-out loss's normaliser, before collating them)."""
        return torch.tensor(float(sum(label != chat.IGNORE_INDEX for s in samples for label in s.labels[1:])))

    def step_counts(self, micro: list[dict]) -> torch.Tensor:
        """This rank's supervised tokens in the optimizer step [] (the loop sums them over ranks)."""
        return torch.tensor(float(sum(len(b["response_targets"]) for b in micro)), device=micro[0]["input_ids"].device)

    def log_fields(self, stats: torch.Tensor, n_tokens: torch.Tensor, loss: float) -> dict:
        return {"tokens": int(stats[0].item())}

def build_sft(cfg: SFTConfig, net, processor, lora: model.LoRAConfig, world: model.Dist) -> model.Stage:
    """SFT's stage: the records' samples, a tenth of the records held out (all of a record's samples together)."""
    if net.config.model_type in ("qwen3_vl", "qwen3_5") and cfg.box_form != "rel1000" and world.is_main:
        print(f"note: {net.config.model_type} grounds in integers 0-1000 of each side; --box-form rel1000 trains "
              f"boxes in its own language (this run: {cfg.box_form})", file=sys.stderr)
    records = data.read_records(synth.resolve_data(cfg.data, "train", cfg.seed), image_root=cfg.image_root,
                                skip_bad=cfg.skip_bad_records, limit=cfg.limit)
    samples = build_sft_samples(cfg, records, processor, world)
    val_records = {id(records[i]) for i in runs.held_out(len(records), cfg.val_fraction, cfg.seed)}
    items = [s for s in samples if id(s.record) not in val_records]
    val_items = [s for s in samples if id(s.record) in val_records]
    pixel_cache = {} if cfg.cache_pixels else None
    summary = (f"{len(records)} records -> {len(items)} samples"
               + (f" (+ {len(val_items)} held out)" if val_items else ""))
    if cfg.focus_first_steps:
        total_steps = count_steps(cfg, len(items), world, "sft", summary)[1]
        n_focus = sum(sample.kind == "focus" for sample in items)
        if not (0 < cfg.focus_first_steps < total_steps and n_focus >= cfg.batch_size * world.world_size):
            raise data.UserError(f"sft: --focus-first-steps {cfg.focus_first_steps} must be positive, fewer than the "
                                 f"{total_steps} steps, with one micro-batch of focus samples per rank ({n_focus})")
    return model.Stage(
        "sft", items, val_items,
        lambda rows: chat.collate(rows, processor.image_processor, processor.tokenizer.pad_token_id,
                                  net.config.image_token_id, pixel_cache),
        SFTObjective(net), summary, f"{sum(p.numel() for p in model.trainable_parameters(net)):,} trainable parameters",
        batches=lambda start_step: sft_index_stream(cfg, items, world, start_step))

# --------------------------------------------------------------------------------------------
# The run around the loop: seeds, the model to train, the optimizer, --out and its lock, metrics.

GRAD_CLIP = 1.0  # the gradient norm is clipped to this (Hugging Face's max_grad_norm, which upstream trains with)

def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)

def cosine_schedule(step: int, total: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio * total steps, then cosine to 0. As upstream's trainer (HF's
    get_cosine_schedule_with_warmup, warm-up ceil(ratio x steps)) it is 0 at step 0: the first step moves only the
    optimizer's moments."""
    warmup = int(math.ceil(warmup_ratio * total))
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

def prepare_model(model_path: str, adapter: str | None, lora: model.LoRAConfig, world: model.Dist,
                  dtype_name: str, grad_checkpointing: bool, max_pixels: int = runs.UPSTREAM_MAX_PIXELS):
    """Load the base, merge a previous phase's adapter into it, add a fresh adapter to train. With adapters off, the
    returned model is exactly the start of this phase: the reference."""
    net, processor = model.load_model(model_path, dtype=model.resolve_dtype(dtype_name, world.device),
                                      device=world.device, max_pixels=max_pixels)
    lora.base_model = str(Path(net.name_or_path).resolve())  # resolved: the adapter loads from any directory
    lora.base_sha256 = model.base_fingerprint(net.name_or_path)
    if adapter:
        model.load_adapter(net, adapter)
        model.merge_lora(net)
        lora.parent_adapter, lora.parent_sha256 = str(Path(adapter).resolve()), model.adapter_fingerprint(adapter)
    model.add_lora(net, lora)
    if grad_checkpointing:
        net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return net.train(), processor

def make_optimizer(params, lr: float, total_steps: int, warmup_ratio: float):
    """AdamW on the trainable parameters (no weight decay, upstream's) with the cosine schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_schedule(step, total_steps, warmup_ratio))
    return optimizer, scheduler

# what a run writes (--overwrite replaces these, and only these)
RUN_FILES = ("adapter", "checkpoints", "config.json", "metrics.jsonl", "tensorboard", dpo.REFERENCE_FILE)

def check_run_out(cfg, command: str) -> list[Path]:
    """Refuse an --out that overlaps the model, the adapter chain or the data, or holds a run without --resume or
    --overwrite; returns what --overwrite will replace. Cheap: it builds no built-in asset (those live in the cache)."""
    data_files = [] if cfg.data == "synth" else [("--data", synth.resolve_data(cfg.data))]
    replaced = runs.check_out(cfg.out, RUN_FILES, inputs=model.input_dirs(cfg.model, cfg.adapter),
                              data_files=data_files, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:  # a resumed run goes on with the settings (and the command) it was started with
        runs.check_rerun(cfg.out, command, cfg, "--resume it")
    return replaced

def take_lock(lock: runs.RunLock, world: model.Dist, create: bool) -> None:
    """Rank 0 takes --out's lock (runs.RunLock.take); if it cannot, every rank stops (rank 0 says why). Also
    the barrier after which rank 0 may write: every rank has checked --out by then."""
    error = None
    if world.is_main:
        try:
            lock.take(create)
        except data.UserError as e:
            error = e
    if model.all_reduce_sum(torch.tensor(float(error is not None), device=world.device), world) > 0:
        raise error or data.UserError(f"--out {lock.path.parent}: rank 0 could not lock it")

def summary_writer(report_to: str):
    """torch's SummaryWriter for --report-to tensorboard (imported only then), else None; without the package, a
    one-line error before any work."""
    if report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # its message on one line: a broken install is told apart from a missing one
        raise data.UserError(f"--report-to tensorboard: cannot import tensorboard ({' '.join(str(e).split())}); "
                             "pip install 'visrl[tensorboard]' (or pip install tensorboard)") from e
    return SummaryWriter

class MetricsLog:
    """metrics.jsonl and, with a SummaryWriter class, every row's numbers as TensorBoard scalars at the row's step in
    <out>/tensorboard; each row flushed as it is logged, so both show a run while it goes on."""

    def __init__(self, out: Path, writer_class, start_step: int):
        self.file = open(out / "metrics.jsonl", "a")
        # a resumed run redoes the steps after its checkpoint: purge_step hides what an earlier process logged for
        # them (TensorBoard's reader drops events from that step on), as resume_point drops their rows
        self.events = writer_class(str(out / "tensorboard"), purge_step=start_step + 1) if writer_class else None

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.events:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.events.add_scalar(key, value, row["step"])
            self.events.flush()

    def close(self) -> None:
        self.file.close()
        if self.events:
            self.events.close()

def start_run(out: Path, cfg, command: str, world: model.Dist, replaced: list[Path], stage: model.Stage,
              total_steps: int, writer_class, start_step: int) -> MetricsLog | None:
    """Replace an earlier run with --overwrite (its files only), write the run's config.json, say what runs, and
    open the metrics log (rank 0 only; None elsewhere)."""
    if not world.is_main:
        return None
    runs.clear_run(replaced)
    out.mkdir(parents=True, exist_ok=True)
    runs.write_config(out, command, cfg)
    print(f"{stage.name}: {stage.summary}; {total_steps} steps; global batch "
          f"{cfg.batch_size * cfg.grad_accum * world.world_size} = {cfg.batch_size} x {cfg.grad_accum} accum x "
          f"{world.world_size} ranks; {stage.about_model}", file=sys.stderr)
    if stage.on_start:
        stage.on_start()
    return MetricsLog(out, writer_class, start_step)

# --------------------------------------------------------------------------------------------
# Checkpoints that survive a kill: trainable weights, optimizer, scheduler, step (the data position) and RNG states,
# through DCP into a temporary directory whose rename is the commit point: a kill before it leaves the previous one.

CHECKPOINT_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen base is not saved
KEEP_CHECKPOINTS = 2  # a kill during a write still leaves the one before

def _dcp(save_or_load, path: Path, module, optimizer) -> dict:
    """The trainable weights' and optimizer's state (DCP's form), after dcp.save or dcp.load of it at `path`."""
    state = {"model": get_model_state_dict(module, options=CHECKPOINT_OPTIONS),
             "optim": get_optimizer_state_dict(module, optimizer, options=CHECKPOINT_OPTIONS)}
    with warnings.catch_warnings():  # DCP warns on every call without a process group that it assumes one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save_or_load(state, checkpoint_id=str(path))
    return state

def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under <out>/checkpoints (temporary directories are ignored)."""
    return max((p for p in (out / "checkpoints").glob("step_*") if (p / "meta.json").exists()), default=None)

def save_checkpoint(out: Path, step: int, module, optimizer, scheduler, world: model.Dist) -> Path:
    """Write <out>/checkpoints/step_<step> (collective: every rank calls it); the newest KEEP_CHECKPOINTS stay."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier write
        tmp.mkdir(parents=True)
    barrier(world)
    _dcp(dcp.save, tmp, module, optimizer)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{world.rank}.pt")
    barrier(world)
    if world.is_main:
        meta = {"step": step, "world_size": world.world_size, "scheduler": scheduler.state_dict()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, final)
        older = sorted(p for p in root.glob("step_*") if p != final)
        for old in older[:max(len(older) - (KEEP_CHECKPOINTS - 1), 0)]:  # this one included
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final

def load_checkpoint(path: Path, module, optimizer, scheduler, world: model.Dist) -> int:
    """Restore a checkpoint into the freshly built run; returns the step it was taken after."""
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world.world_size:
        raise data.UserError(f"{path}: written by {meta['world_size']} ranks, resuming with {world.world_size}; "
                             "the data split differs, so the run would not continue exactly")
    state = _dcp(dcp.load, path, module, optimizer)
    set_model_state_dict(module, state["model"], options=CHECKPOINT_OPTIONS)
    set_optimizer_state_dict(module, optimizer, state["optim"], options=CHECKPOINT_OPTIONS)
    scheduler.load_state_dict(meta["scheduler"])
    rng = torch.load(path / f"rng_rank{world.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"]

def resume_point(cfg, out: Path, module, optimizer, scheduler, world: model.Dist) -> int:
    """With --resume: load the newest good checkpoint, drop metrics rows logged after it; else 0."""
    path = latest_checkpoint(out) if cfg.resume else None
    if path is None:
        if cfg.resume and world.is_main:
            print(f"resume: no checkpoint under {out / 'checkpoints'}; starting fresh", file=sys.stderr)
            (out / "metrics.jsonl").unlink(missing_ok=True)  # rows of a run killed before its first checkpoint
        return 0
    step = load_checkpoint(path, module, optimizer, scheduler, world)
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)  # this run's schedule: a longer --max-steps goes on with
        # its own cosine from here, not from the last lr of the run it extends (saved with the optimizer)
    metrics = out / "metrics.jsonl"
    if world.is_main and metrics.exists():  # rows of steps after the checkpoint are redone; torn or blank ones dropped
        kept = [line for line in metrics.read_text().splitlines() if (s := _row_step(line)) is not None and s <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    if world.is_main:
        print(f"resume: from {path} (step {step})", file=sys.stderr)
    return step

def _row_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line torn by the kill

def barrier(world: model.Dist) -> None:
    if world.world_size > 1:
        dist.barrier()

class StopOnSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, world: model.Dist) -> bool:
        """Agreed across ranks: one rank's signal stops all of them at the same step."""
        flag = torch.tensor(float(self.requested), device=world.device)  # nccl reduces device tensors only
        return bool(model.all_reduce_sum(flag, world) > 0)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

def finish_run(out: Path, objective: nn.Module, lora: model.LoRAConfig, world: model.Dist, metrics,
               stopper: StopOnSignal, name: str) -> Path:
    """Close the log and, unless a signal stopped the run, write the final adapter (gathered whole, saved by rank 0)."""
    stopper.restore()
    if world.is_main:
        metrics.close()
    if not stopper.requested:
        full = get_model_state_dict(objective, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if world.is_main:
            adapter = {k.removeprefix("net."): v for k, v in full.items() if ".lora_A." in k or ".lora_B." in k}
            model.save_adapter(objective.net, out / "adapter", lora, state=adapter)
            print(f"{name}: adapter saved to {out / 'adapter'}", file=sys.stderr)
    barrier(world)
    return out / "adapter"

# --------------------------------------------------------------------------------------------
# Batches per rank, steps, the held-out loss.

def epoch_batches(n_samples: int, batch_size: int, world: model.Dist, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch: one shared shuffle, split without overlap."""
    order = list(range(n_samples))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    per_step = batch_size * world.world_size
    usable = n_samples // per_step * per_step  # every rank gets the same number of full batches
    mine = order[:usable][world.rank::world.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]

def batch_stream(n_items: int, batch_size: int, world: model.Dist, seed: int, start: int):
    """This rank's batches of item indices over endless epochs, from micro-batch `start` on (resume skips there)."""
    per_epoch = len(epoch_batches(n_items, batch_size, world, seed, 0))
    epoch, offset = divmod(start, per_epoch)
    while True:
        yield from epoch_batches(n_items, batch_size, world, seed, epoch)[offset:]
        epoch, offset = epoch + 1, 0

def count_steps(cfg, n_items: int, world: model.Dist, name: str, what: str) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run: --max-steps, else --epochs); an error if not one step fits."""
    steps_per_epoch = len(epoch_batches(n_items, cfg.batch_size, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * steps_per_epoch)
    if steps_per_epoch == 0 or total_steps == 0:
        raise data.UserError(f"{name}: {what} are fewer than one optimizer step of "
                             f"{cfg.batch_size} x {cfg.grad_accum} x {world.world_size}")
    return steps_per_epoch, total_steps

@torch.no_grad()
def eval_loss(objective: nn.Module, val_items: list, collate, cfg, world: model.Dist) -> dict:
    """The loss (and its logged fields) on the held-out items, each once, normalised as one optimizer step over all of
    them. Every rank runs the same number of batches (FSDP2 gathers in each); a short rank repeats an item, weight 0."""
    mine = list(range(world.rank, len(val_items), world.world_size))
    n_batches = math.ceil(math.ceil(len(val_items) / world.world_size) / cfg.batch_size)
    counts = model.all_reduce_sum(objective.item_counts([val_items[i] for i in mine]).to(world.device), world)
    total, stats = torch.zeros((), device=world.device), 0.0
    objective.eval()
    for b in range(n_batches):
        indices = mine[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = model.to_device(collate([val_items[i] for i in indices or mine[:1] or [0]]), world.device)
        with model.autocast_for(world.device):
            loss, batch_stats = objective(batch, counts)
        weight = 1.0 if indices else 0.0
        total, stats = total + weight * loss, stats + weight * batch_stats
    objective.train()
    total, stats = model.all_reduce_sum(total, world), model.all_reduce_sum(stats, world)
    fields = objective.log_fields(stats, counts, total.item())
    return {"eval_loss": total.item(), **{f"eval_{k}": v for k, v in fields.items()}}

# --------------------------------------------------------------------------------------------
# The loop, for every objective: a step, its row, then the loop itself top to bottom.

def train_step(objective: nn.Module, micro: list[dict], params, optimizer, scheduler, world: model.Dist) -> dict:
    """One optimizer step over the micro-batches: forward and backward each, then clip and step. Returns the
    metrics row's numbers (loss, lr, grad_norm and the objective's own fields), summed over ranks."""
    # one normaliser for the whole step (all micro-batches, all ranks): the loss is the mean over the global
    # batch's supervised tokens (SFT) or over its pairs of each kind (DPO), whatever the split
    counts = model.all_reduce_sum(objective.step_counts(micro), world)
    step_loss, stats = torch.zeros((), device=world.device), 0.0
    for batch in micro:
        with model.autocast_for(world.device):
            loss, batch_stats = objective(batch, counts)
        loss.backward()
        step_loss, stats = step_loss + loss.detach(), stats + batch_stats
    # FSDP2 has reduce-scattered the gradients: summed over ranks, the gradient of the global objective
    grad_norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    lr = optimizer.param_groups[0]["lr"]  # what this step uses (resume_point may have set it)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step_loss, stats = model.all_reduce_sum(step_loss, world), model.all_reduce_sum(stats, world)
    loss = step_loss.item()
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(), **objective.log_fields(stats, counts, loss)}

def train(cfg: SFTConfig | dpo.DPOConfig | grpo.GRPOConfig) -> Path:
    """`sft` or `dpo` (stage 1 or 2), by the config's type: its build gives the stage, one loop runs it. Writes
    <out>/adapter, config.json and metrics.jsonl (and tensorboard/), holding --out's lock (rank 0) while it writes."""
    command, build = STAGES[type(cfg)]
    cfg.check()
    writer_class = summary_writer(cfg.report_to)  # a missing package stops every rank here, before any work
    world = model.setup_distributed()
    seed_everything(cfg.seed)
    cfg, out = runs.resolve_convention(cfg), Path(cfg.out)  # prompts, crop, pixels, box form: given or the adapter's
    replaced = check_run_out(cfg, command)  # before any work: a refused --out costs nothing
    with runs.RunLock(out, command) as lock:
        take_lock(lock, world, create=False)  # a process still writing --out stops this one here
        lora = model.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, targets=cfg.lora_targets,
                                convention=runs.convention_of(cfg))  # the convention every later stage follows
        net, processor = prepare_model(cfg.model, cfg.adapter, lora, world, cfg.dtype, cfg.grad_checkpointing,
                                       cfg.max_pixels)
        stage = build(cfg, net, processor, lora, world)
        steps_per_epoch, total_steps = count_steps(cfg, len(stage.items), world, stage.name, stage.summary)
        objective = stage.objective
        if world.world_size > 1:  # FSDP2, the objective as the root unit
            model.shard(objective, objective.net, mixed_precision=world.device.type == "cuda")
        params = model.trainable_parameters(objective)  # after sharding: the DTensor parameters
        optimizer, scheduler = make_optimizer(params, cfg.lr, total_steps, cfg.warmup_ratio)
        take_lock(lock, world, create=True)
        start_step = resume_point(cfg, out, objective, optimizer, scheduler, world)
        metrics = start_run(out, cfg, command, world, replaced, stage, total_steps, writer_class, start_step)
        indices = (stage.batches(start_step) if stage.batches else
                   batch_stream(len(stage.items), cfg.batch_size, world, cfg.seed, start=start_step * cfg.grad_accum))
        batches = (model.to_device(stage.collate([stage.items[i] for i in batch]), world.device) for batch in indices)
        progress = tqdm(range(start_step, total_steps), desc=stage.name, disable=not world.is_main,
                        dynamic_ncols=True, initial=start_step, total=total_steps)
        stopper, start = StopOnSignal(), time.time()
        for step in progress:
            step_start = time.time()
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), **train_step(
                objective, [next(batches) for _ in range(cfg.grad_accum)], params, optimizer, scheduler, world)}
            if stage.val_items and (step + 1 == total_steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                row.update(eval_loss(objective, stage.val_items, stage.collate, cfg, world))  # every rank runs it
            if "tokens" in row:
                row["tokens_per_s"] = row["tokens"] / max(time.time() - step_start, 1e-9)
            if world.is_main:
                metrics.write({**row, "elapsed_s": time.time() - start})
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            stop = stopper.should_stop(world)  # a checkpoint at --save-every steps, at the end and on a stop signal
            if step + 1 == total_steps or stop or (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0):
                path = save_checkpoint(out, step + 1, objective, optimizer, scheduler, world)
                if stop and world.is_main:
                    print(f"stopped by signal after step {step + 1}; checkpoint {path}; rerun with --resume",
                          file=sys.stderr)
            if stop:
                break
        return finish_run(out, objective, lora, world, metrics, stopper, command)

# config type -> (command, build)
STAGES = {SFTConfig: ("sft", build_sft), dpo.DPOConfig: ("dpo", dpo.build), grpo.GRPOConfig: ("grpo", grpo.build)}

COMMANDS = {"sft": (SFTConfig, train), "generate": (generate.GenerateConfig, generate.generate_command),
            "dpo": (dpo.DPOConfig, train), "grpo": (grpo.GRPOConfig, train),
            "eval": (evaluate.EvalConfig, evaluate.evaluate),
            "export": (export.ExportConfig, export.export_command),
            "infer": (evaluate.InferConfig, evaluate.infer_command), "serve": (serve.ServeConfig, serve.serve_command),
            "demo": (demo.DemoConfig, demo.demo), "tiny": (model.TinyArgs, model.tiny_command),
            "synth": (synth.SynthArgs, synth.synth_command)}

def main() -> None:
    runs.cli(lambda: tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}),
             lambda args: next(fn for cls, fn in COMMANDS.values() if isinstance(args, cls))(args))

if __name__ == "__main__":
    main()
