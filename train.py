"""Training plumbing shared by the `sft` and `dpo` loops: the process group, model preparation and
FSDP2 wrapping, the optimizer and schedule, batches per rank, checkpoints that survive a kill,
resume, and stopping on a signal. The loops themselves, readable top to bottom, are in visrl.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

import data
import model as modeling
import synth

# --------------------------------------------------------------------------------------------
# Shared plumbing: process group, device, dtype, data resolution, metrics.


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(step: int, total: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio * total steps, then cosine to 0."""
    warmup = int(math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def all_reduce_sum(value: torch.Tensor, world: modeling.Dist) -> torch.Tensor:
    if world.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def prepare_model(model_path: str, adapter: str | None, lora: modeling.LoRAConfig, world: modeling.Dist,
                  dtype_name: str, grad_checkpointing: bool):
    """Load the base, merge a previous phase's adapter into it, add a fresh adapter to train.

    With adapters off, the returned model is exactly the start of this phase: the reference.
    """
    net, processor = modeling.load_model(model_path, dtype=modeling.resolve_dtype(dtype_name, world.device),
                                         device=world.device)
    if adapter:
        modeling.load_adapter(net, adapter)
        modeling.merge_lora(net)
    lora.base_model = str(Path(net.name_or_path).resolve())  # resolved: the adapter loads from any directory
    lora.base_sha256 = modeling.base_fingerprint(net.name_or_path)
    if adapter:
        lora.parent_adapter, lora.parent_sha256 = str(Path(adapter).resolve()), modeling.adapter_fingerprint(adapter)
    modeling.add_lora(net, lora)
    if grad_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    return net, processor


def make_optimizer(params, lr: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW on the trainable parameters with the cosine schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_schedule(step, total_steps, warmup_ratio))
    return optimizer, scheduler


def reduce_gradients(params, world: modeling.Dist) -> None:
    """Sum gradients over ranks: losses are normalised by global counts, so the sum is the gradient
    of the global-batch objective, exactly as one process would compute it."""
    if world.world_size > 1:
        for p in params:
            if p.grad is not None and not isinstance(p.grad, DTensor):  # FSDP2 already reduce-scattered these
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def optimizer_step(params, optimizer, scheduler, world: modeling.Dist, grad_clip: float) -> tuple[torch.Tensor, float]:
    """Reduce gradients over ranks, clip, step. Returns the gradient norm (a tensor: no host sync
    here) and the learning rate this step used."""
    reduce_gradients(params, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


RUN_FILES = ("adapter", "checkpoints", "config.json", "metrics.jsonl")  # what a training run writes into --out


def check_run_out(cfg, command: str) -> list[Path]:
    """Refuse an --out that overlaps the model, the adapter chain or the data, or that holds a run unless
    --resume or --overwrite says what to do with it; returns what --overwrite will replace. Cheap: it builds
    no built-in asset (those live in the cache, never in an --out)."""
    data_files = [] if cfg.data == "synth" else [("--data", synth.resolve_data(cfg.data))]
    replaced = data.check_out(cfg.out, RUN_FILES, inputs=modeling.input_dirs(cfg.model, cfg.adapter),
                              data_files=data_files, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:  # a resumed run goes on with the settings (and the command) it was started with
        settings = dataclasses.asdict(cfg)
        data.check_settings(cfg.out, command, settings, [k for k in settings if k not in RESUMABLE_CHANGES],
                            "--resume it")
    return replaced


# what a resumed run may change: bookkeeping, and how long it runs (to extend a finished run)
RESUMABLE_CHANGES = ("resume", "overwrite", "log_every", "save_every", "keep_checkpoints", "max_steps", "epochs")


def start_run(out: Path, cfg, command: str, world: modeling.Dist, replaced: list[Path], summary: str):
    """Replace an earlier run with --overwrite (its files only), write the run's config.json and open
    metrics.jsonl (rank 0 only; None elsewhere)."""
    if not world.is_main:
        return None
    data.clear_run(replaced)
    out.mkdir(parents=True, exist_ok=True)
    data.write_config(out, command, dataclasses.asdict(cfg))
    print(summary, file=sys.stderr)
    return open(out / "metrics.jsonl", "a")


# --------------------------------------------------------------------------------------------
# Checkpoints that survive a kill: trainable weights, optimizer, scheduler, step, data position and
# RNG states, through torch.distributed.checkpoint, written to a temporary directory and renamed.
# The rename is the commit point: a kill before it leaves the previous checkpoint as the newest.

CHECKPOINT_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen base is not saved


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: true, and noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under <out>/checkpoints (temporary directories are ignored)."""
    done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "meta.json").exists())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, module, optimizer, scheduler, world: modeling.Dist, keep: int) -> Path:
    """Write <out>/checkpoints/step_<step> (collective: every rank calls it)."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier write
        tmp.mkdir(parents=True)
    barrier(world)
    state = {"model": get_model_state_dict(module, options=CHECKPOINT_OPTIONS),
             "optim": get_optimizer_state_dict(module, optimizer, options=CHECKPOINT_OPTIONS)}
    with single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp))
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
        for old in older[:max(len(older) - (keep - 1), 0)]:  # keep the newest `keep`, this one included
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def load_checkpoint(path: Path, module, optimizer, scheduler, world: modeling.Dist) -> int:
    """Restore a checkpoint into the freshly built run; returns the step it was taken after."""
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world.world_size:
        raise data.UserError(f"{path}: written by {meta['world_size']} ranks, resuming with {world.world_size}; "
                             "the data split differs, so the run would not continue exactly")
    state = {"model": get_model_state_dict(module, options=CHECKPOINT_OPTIONS),
             "optim": get_optimizer_state_dict(module, optimizer, options=CHECKPOINT_OPTIONS)}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(module, state["model"], options=CHECKPOINT_OPTIONS)
    set_optimizer_state_dict(module, optimizer, state["optim"], options=CHECKPOINT_OPTIONS)
    scheduler.load_state_dict(meta["scheduler"])
    rng = torch.load(path / f"rng_rank{world.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"]


def resume_point(cfg, out: Path, module, optimizer, scheduler, world: modeling.Dist) -> int:
    """With --resume: load the newest good checkpoint, drop metrics rows logged after it; else 0."""
    path = latest_checkpoint(out) if cfg.resume else None
    if path is None:
        if cfg.resume and world.is_main:
            print(f"resume: no checkpoint under {out / 'checkpoints'}; starting fresh", file=sys.stderr)
            (out / "metrics.jsonl").unlink(missing_ok=True)  # rows of a run killed before its first checkpoint
        return 0
    step = load_checkpoint(path, module, optimizer, scheduler, world)
    metrics = out / "metrics.jsonl"
    if world.is_main and metrics.exists():  # rows of steps after the checkpoint are redone
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if _row_step(line) is not None and _row_step(line) <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    if world.is_main:
        print(f"resume: from {path} (step {step})", file=sys.stderr)
    return step


def _row_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line torn by the kill


def barrier(world: modeling.Dist) -> None:
    if world.world_size > 1:
        dist.barrier()


class StopOnSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, world: modeling.Dist) -> bool:
        """Agreed across ranks: one rank's signal stops all of them at the same step."""
        if world.world_size == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=world.device)  # nccl reduces device tensors only
        return bool(all_reduce_sum(flag, world) > 0)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def end_of_step(cfg, out: Path, done: int, total_steps: int, objective: nn.Module, optimizer, scheduler, world: modeling.Dist,
                stopper: StopOnSignal) -> bool:
    """Checkpoint when due (every --save-every steps, at the end, on a stop signal); True = stop now."""
    stop = stopper.should_stop(world)
    if done == total_steps or stop or (cfg.save_every > 0 and done % cfg.save_every == 0):
        path = save_checkpoint(out, done, objective, optimizer, scheduler, world, cfg.keep_checkpoints)
        if stop and world.is_main:
            print(f"stopped by signal after step {done}; checkpoint {path}; rerun with --resume", file=sys.stderr)
    return stop


def finish_run(out: Path, objective: nn.Module, lora_cfg: modeling.LoRAConfig, world: modeling.Dist, metrics,
               stopper: StopOnSignal, name: str) -> Path:
    """Close the log and, unless a signal stopped the run early, write the final adapter: a full
    (unsharded) state gathered from every rank, saved by rank 0."""
    stopper.restore()
    if world.is_main:
        metrics.close()
    if not stopper.requested:
        full = get_model_state_dict(objective, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if world.is_main:
            adapter = {k.removeprefix("net."): v for k, v in full.items() if ".lora_A." in k or ".lora_B." in k}
            modeling.save_adapter(objective.net, out / "adapter", lora_cfg, state=adapter)
            print(f"{name}: adapter saved to {out / 'adapter'}", file=sys.stderr)
    barrier(world)
    return out / "adapter"


def batch_stream(n_items: int, batch_size: int, world: modeling.Dist, seed: int, start: int):
    """This rank's batches of item indices over endless epochs, from micro-batch `start` on (resume
    skips to its data position without loading anything)."""
    per_epoch = len(epoch_batches(n_items, batch_size, world, seed, 0))
    epoch, offset = divmod(start, per_epoch)
    while True:
        yield from epoch_batches(n_items, batch_size, world, seed, epoch)[offset:]
        epoch, offset = epoch + 1, 0


def wrap_objective(objective: nn.Module, cfg, world: modeling.Dist) -> nn.Module:
    """Under torchrun (and unless --no-fsdp), shard with FSDP2, the objective as the root unit."""
    if world.world_size > 1 and cfg.fsdp:
        modeling.shard(objective, objective.net, mixed_precision=world.device.type == "cuda")
    return objective



def epoch_batches(n_samples: int, batch_size: int, world: modeling.Dist, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch: one shared shuffle, split without overlap."""
    order = list(range(n_samples))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    per_step = batch_size * world.world_size
    usable = n_samples // per_step * per_step  # every rank gets the same number of full batches
    mine = order[:usable][world.rank::world.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
