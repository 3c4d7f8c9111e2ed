"""visrl: intention-driven perception for Qwen-VL models (VisRL recipe). CLI and training loops.

    python visrl.py tiny --out DIR          write the built-in tiny checkpoint
    python visrl.py synth --out DIR         write the synthetic intention-driven VQA set
    python visrl.py sft [flags]             supervised warm-up (focus + answer samples), LoRA
    python visrl.py dpo --stage 1|2 --data pairs.jsonl --init-adapter DIR   preference optimisation
    torchrun --nproc_per_node N visrl.py sft ...   the same loop, N processes

The path of data in `sft`: record -> two samples (data.sft_samples) -> tokens + pixels
(data.encode / data.sample_pixels) -> batch (data.collate) -> forward to the last hidden states
-> logits at supervised positions only -> cross-entropy summed over the optimizer step's tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

import data
import dpo
import model as modeling
import synth

# --------------------------------------------------------------------------------------------
# Shared plumbing: process group, device, dtype, data resolution, metrics.


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
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, dev)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 weights on CUDA (adapters stay fp32), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def resolve_data(path: str, split: str = "train", seed: int = 0) -> Path:
    """`synth` -> the cached synthetic set (built on first use); a directory -> its `<split>.jsonl`."""
    if path == "synth":
        root = modeling.cache_dir() / f"synth-v{synth.SYNTH_VERSION}-seed{seed}"
        if not (root / "test.jsonl").exists():
            synth.make_synth(root, seed=seed)
        return root / f"{split}.jsonl"
    p = Path(path)
    return p / f"{split}.jsonl" if p.is_dir() else p


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


def all_reduce_sum(value: torch.Tensor, world: Dist) -> torch.Tensor:
    if world.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def prepare_model(model_path: str, adapter: str | None, lora: modeling.LoRAConfig, world: Dist,
                  dtype_name: str, grad_checkpointing: bool):
    """Load the base, merge a previous phase's adapter into it, add a fresh adapter to train.

    With adapters off, the returned model is exactly the start of this phase: the reference.
    """
    net, processor = modeling.load_model(model_path, dtype=resolve_dtype(dtype_name, world.device),
                                         device=world.device)
    if adapter:
        modeling.load_adapter(net, adapter)
        modeling.merge_lora(net)
    lora.base_model, lora.parent_adapter = str(net.name_or_path), str(adapter or "")
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


def reduce_gradients(params, world: Dist) -> None:
    """Sum gradients over ranks: losses are normalised by global counts, so the sum is the gradient
    of the global-batch objective, exactly as one process would compute it."""
    if world.world_size > 1:
        for p in params:
            if p.grad is not None and not isinstance(p.grad, DTensor):  # FSDP2 already reduce-scattered these
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def optimizer_step(params, optimizer, scheduler, world: Dist, grad_clip: float) -> tuple[torch.Tensor, float]:
    """Reduce gradients over ranks, clip, step. Returns the gradient norm (a tensor: no host sync
    here) and the learning rate this step used."""
    reduce_gradients(params, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def start_run(out: Path, cfg, world: Dist, summary: str):
    """Write the run's config.json and open metrics.jsonl (rank 0 only; None elsewhere)."""
    if not world.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(summary, file=sys.stderr)
    return open(out / "metrics.jsonl", "a")


# --------------------------------------------------------------------------------------------
# Checkpoints that survive a kill: trainable weights, optimizer, scheduler, step, data position and
# RNG states, through torch.distributed.checkpoint, written to a temporary directory and renamed.
# The rename is the commit point: a kill before it leaves the previous checkpoint as the newest.

CHECKPOINT_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen base is not saved


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under <out>/checkpoints (temporary directories are ignored)."""
    done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "meta.json").exists())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, module, optimizer, scheduler, world: Dist, keep: int) -> Path:
    """Write <out>/checkpoints/step_<step> (collective: every rank calls it)."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier write
        tmp.mkdir(parents=True)
    barrier(world)
    state = {"model": get_model_state_dict(module, options=CHECKPOINT_OPTIONS),
             "optim": get_optimizer_state_dict(module, optimizer, options=CHECKPOINT_OPTIONS)}
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


def load_checkpoint(path: Path, module, optimizer, scheduler, world: Dist) -> int:
    """Restore a checkpoint into the freshly built run; returns the step it was taken after."""
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world.world_size:
        raise ValueError(f"{path}: written by {meta['world_size']} ranks, resuming with {world.world_size}; "
                         "the data split differs, so the run would not continue exactly")
    state = {"model": get_model_state_dict(module, options=CHECKPOINT_OPTIONS),
             "optim": get_optimizer_state_dict(module, optimizer, options=CHECKPOINT_OPTIONS)}
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


def resume_point(cfg, out: Path, module, optimizer, scheduler, world: Dist) -> int:
    """With --resume: load the newest good checkpoint, drop metrics rows logged after it; else 0."""
    path = latest_checkpoint(out) if cfg.resume else None
    if path is None:
        if cfg.resume and world.is_main:
            print(f"resume: no checkpoint under {out / 'checkpoints'}; starting fresh", file=sys.stderr)
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


def barrier(world: Dist) -> None:
    if world.world_size > 1:
        dist.barrier()


class StopOnSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, world: Dist) -> bool:
        """Agreed across ranks: one rank's signal stops all of them at the same step."""
        if world.world_size == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=world.device)  # nccl reduces device tensors only
        return bool(all_reduce_sum(flag, world) > 0)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def end_of_step(cfg, out: Path, done: int, total_steps: int, objective: nn.Module, optimizer, scheduler, world: Dist,
                stopper: StopOnSignal) -> bool:
    """Checkpoint when due (every --save-every steps, at the end, on a stop signal); True = stop now."""
    stop = stopper.should_stop(world)
    if done == total_steps or stop or (cfg.save_every > 0 and done % cfg.save_every == 0):
        path = save_checkpoint(out, done, objective, optimizer, scheduler, world, cfg.keep_checkpoints)
        if stop and world.is_main:
            print(f"stopped by signal after step {done}; checkpoint {path}; rerun with --resume", file=sys.stderr)
    return stop


def finish_run(out: Path, objective: nn.Module, lora_cfg: modeling.LoRAConfig, world: Dist, metrics,
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


def batch_stream(n_items: int, batch_size: int, world: Dist, seed: int, start: int):
    """This rank's batches of item indices over endless epochs, from micro-batch `start` on (resume
    skips to its data position without loading anything)."""
    per_epoch = len(epoch_batches(n_items, batch_size, world, seed, 0))
    epoch, offset = divmod(start, per_epoch)
    while True:
        yield from epoch_batches(n_items, batch_size, world, seed, epoch)[offset:]
        epoch, offset = epoch + 1, 0


def wrap_objective(objective: nn.Module, cfg, world: Dist) -> nn.Module:
    """Under torchrun (and unless --no-fsdp), shard with FSDP2, the objective as the root unit."""
    if world.world_size > 1 and cfg.fsdp:
        modeling.shard(objective, objective.net, mixed_precision=world.device.type == "cuda")
    return objective


# --------------------------------------------------------------------------------------------
# Supervised warm-up.


@dataclass
class SFTConfig:
    """Supervised warm-up: LoRA on the language model, loss on assistant tokens only."""

    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl` (built on first use)
    adapter: str | None = None  # a trained adapter to start from (merged into the base first)
    data: str = "synth"  # records file (Visual-CoT .jsonl/.json or ours), a directory with train.jsonl, or `synth`
    image_root: str | None = None  # image paths are relative to this (default: the data file's directory)
    out: str = "runs/sft"  # where adapter/, config.json and metrics.jsonl go
    limit: int | None = None  # use the first N records only
    seed: int = 0
    epochs: float = 3.0
    max_steps: int = -1  # optimizer steps; overrides epochs when > 0
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 4  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all"  # `all` linear layers of the language model, or e.g. `q_proj,v_proj`
    box_form: Literal["square", "axis", "pixel"] = "square"  # how boxes are written as text
    crop: Literal["vcot", "raw"] = "vcot"  # crop rule for the answer step's second image
    max_len: int = 2048  # longer samples are dropped whole (never cut through image tokens)
    error_on_long: bool = False  # raise instead of dropping over-long samples
    skip_bad_records: bool = False  # skip (and report) malformed records instead of stopping
    grad_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end or on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in --out
    fsdp: bool = True  # under torchrun: shard with FSDP2 (--no-fsdp: replicate, all-reduce gradients)


class SFTDataset(torch.utils.data.Dataset):
    """Samples with text already tokenised; images decoded and processed per item."""

    def __init__(self, samples: list[data.Sample], image_processor):
        self.samples, self.image_processor = samples, image_processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        pixels = data.sample_pixels(sample, self.image_processor)
        return {"input_ids": sample.input_ids, "labels": sample.labels, **pixels}


def build_sft_samples(cfg: SFTConfig, records: list[data.Record], processor, world: Dist) -> list[data.Sample]:
    """Every record's focus and answer samples, over-long ones dropped (or an error) with a count."""
    samples, no_box, too_long = [], 0, []
    for record in records:
        pair = data.sft_samples(record, processor.tokenizer, processor.image_processor, cfg.box_form, cfg.crop)
        no_box += not pair
        for sample in pair:
            (too_long if len(sample.input_ids) > cfg.max_len else samples).append(sample)
    if too_long and cfg.error_on_long:
        first = too_long[0]
        raise ValueError(f"{first.record.source}: {first.kind} sample has {len(first.input_ids)} tokens "
                         f"> --max-len {cfg.max_len} ({len(too_long)} such samples)")
    if world.is_main and (too_long or no_box):
        print(f"sft: dropped {len(too_long)} samples longer than {cfg.max_len} tokens and "
              f"{no_box} records without a box", file=sys.stderr)
    if not samples:
        raise ValueError("sft: no trainable samples (every record lacks a box or is too long)")
    return samples


def sft_loss(net, batch: dict, n_tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised tokens, divided by the step's token count.

    Logits are computed only at supervised positions ([N, V] instead of [B, L, V]).
    """
    hidden = net.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    ).last_hidden_state  # [B, L, H]
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    supervised = targets != data.IGNORE_INDEX  # [B, L-1]
    logits = net.lm_head(hidden[:, :-1][supervised]).float()  # [N, V]
    return F.cross_entropy(logits, targets[supervised], reduction="sum") / n_tokens


class SFTObjective(nn.Module):
    """sft_loss as a module: FSDP2 gathers a root unit's parameters around its forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch: dict, n_tokens: torch.Tensor) -> torch.Tensor:
        return sft_loss(self.net, batch, n_tokens)


def epoch_batches(n_samples: int, batch_size: int, world: Dist, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch: one shared shuffle, split without overlap."""
    order = list(range(n_samples))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    per_step = batch_size * world.world_size
    usable = n_samples // per_step * per_step  # every rank gets the same number of full batches
    mine = order[:usable][world.rank::world.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def sft(cfg: SFTConfig) -> Path:
    """Supervised warm-up; writes <out>/adapter, <out>/config.json and <out>/metrics.jsonl."""
    world = setup_distributed(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    lora_cfg = modeling.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    net, processor = prepare_model(cfg.model, cfg.adapter, lora_cfg, world, cfg.dtype, cfg.grad_checkpointing)

    records = data.read_records(resolve_data(cfg.data, "train", cfg.seed), image_root=cfg.image_root,
                                skip_bad=cfg.skip_bad_records, limit=cfg.limit)
    samples = build_sft_samples(cfg, records, processor, world)
    dataset = SFTDataset(samples, processor.image_processor)
    pad_id = processor.tokenizer.pad_token_id
    image_token_id = net.config.image_token_id

    steps_per_epoch = len(epoch_batches(len(samples), cfg.batch_size, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * steps_per_epoch)
    if steps_per_epoch == 0 or total_steps == 0:
        raise ValueError(f"sft: {len(samples)} samples are fewer than one optimizer step of "
                         f"{cfg.batch_size} x {cfg.grad_accum} x {world.world_size}")
    objective = wrap_objective(SFTObjective(net), cfg, world)
    params = modeling.trainable_parameters(objective)  # after sharding: the DTensor parameters
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    global_batch = cfg.batch_size * cfg.grad_accum * world.world_size
    start_step = resume_point(cfg, out, objective, optimizer, scheduler, world)
    metrics = start_run(out, cfg, world, (
        f"sft: {len(records)} records -> {len(samples)} samples; {total_steps} steps; global batch "
        f"{global_batch} = {cfg.batch_size} x {cfg.grad_accum} accum x {world.world_size} ranks; "
        f"{sum(p.numel() for p in params):,} trainable parameters"))
    batches = (to_device(data.collate([dataset[i] for i in indices], pad_id, image_token_id), world.device)
               for indices in batch_stream(len(samples), cfg.batch_size, world, cfg.seed,
                                           start=start_step * cfg.grad_accum))
    progress = tqdm(range(start_step, total_steps), desc="sft", disable=not world.is_main, dynamic_ncols=True,
                    initial=start_step, total=total_steps)
    stopper = StopOnSignal()
    start = time.time()
    for step in progress:
        step_start = time.time()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        # One normaliser for the whole optimizer step (all micro-batches, all ranks): the loss is the
        # mean over supervised tokens of the global batch, whatever the accumulation split.
        n_tokens = sum((b["labels"][:, 1:] != data.IGNORE_INDEX).sum() for b in micro).float()
        n_tokens = all_reduce_sum(n_tokens, world)
        step_loss = torch.zeros((), device=world.device)
        for batch in micro:
            with autocast_for(world.device):
                loss = objective(batch, n_tokens)
            loss.backward()
            step_loss += loss.detach()
        grad_norm, lr = optimizer_step(params, optimizer, scheduler, world, cfg.grad_clip)
        step_loss = all_reduce_sum(step_loss, world)
        tokens = all_reduce_sum(sum(b["attention_mask"].sum() for b in micro).float(), world)
        if world.is_main and (step % cfg.log_every == 0 or step == total_steps - 1):
            tokens = int(tokens.item())
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                   "loss": step_loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens": tokens, "tokens_per_s": tokens / max(time.time() - step_start, 1e-9),
                   "elapsed_s": time.time() - start}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if end_of_step(cfg, out, step + 1, total_steps, objective, optimizer, scheduler, world, stopper):
            break
    return finish_run(out, objective, lora_cfg, world, metrics, stopper, "sft")


# --------------------------------------------------------------------------------------------
# Preference optimisation (DPO) on self-generated pairs.

DPO_KINDS = ("box", "answer")  # stage-2 step types; index = PairSample kind code in dpo.collate_pairs
DPO_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")


@dataclass
class DPOConfig:
    """DPO stage 1 (focus: box pairs) or stage 2 (step-level: box pairs + answer pairs on the crop)."""

    data: str  # pair records (.jsonl written by generate.py; format in README)
    stage: Literal[1, 2] = 1
    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl`
    # The previous phase's adapter (SFT for stage 1, stage 1 for stage 2): merged into the base at
    # load, so the reference (adapters off) is exactly the model at the start of this stage.
    adapter: Annotated[str | None, tyro.conf.arg(aliases=("--init-adapter",))] = None
    image_root: str | None = None  # image paths are relative to this (default: the data file's directory)
    out: str = "runs/dpo"
    limit: int | None = None  # use the first N pairs only
    seed: int = 0
    epochs: float = 5.0
    max_steps: int = -1  # optimizer steps; overrides epochs when > 0
    lr: float = 5e-6
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 2  # pairs per process per micro-step (a stage-2 pair is a box and an answer sample)
    grad_accum: int = 1
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    beta: float = 0.1  # for the box step (stage 1 and stage 2)
    beta_answer: float | None = None  # for the answer step in stage 2 (default: --beta)
    label_smoothing: float = 0.0  # the robust loss's assumed label-flip rate
    nll_weight: float = 0.0  # adds nll_weight * length-normalised NLL of the chosen responses
    lambda_box: float = 0.5  # stage 2: L = lambda_box * L_box + lambda_answer * L_answer
    lambda_answer: float = 0.5
    rejected_crop: Literal["chosen", "own"] = "chosen"  # stage 2: crop the rejected answer sees (upstream: chosen)
    crop: Literal["vcot", "raw"] = "vcot"
    precompute_ref: bool = False  # all reference log-probs in one pass before training
    logp_chunk: int = 1024  # response tokens per chunk of the fused log-prob kernel
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all"
    max_len: int = 2048  # pairs with a longer sequence are dropped whole
    error_on_long: bool = False
    skip_bad_records: bool = False  # skip (and report) malformed pairs instead of stopping
    grad_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end or on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in --out
    fsdp: bool = True  # under torchrun: shard with FSDP2 (--no-fsdp: replicate, all-reduce gradients)


def build_dpo_samples(cfg: DPOConfig, pairs: list[data.Pair], processor, world: Dist) -> list[list[data.PairSample]]:
    """Each pair's samples (1 in stage 1, 2 in stage 2), checked before training; bad pairs reported."""
    grouped, errors, too_long = [], [], 0
    for pair in pairs:
        try:
            samples = data.dpo_samples(pair, processor.tokenizer, processor.image_processor, cfg.stage,
                                       cfg.crop, cfg.rejected_crop)
        except data.DataError as e:
            errors.append(str(e))
            continue
        longest = max(max(len(s.chosen_ids), len(s.rejected_ids)) for s in samples)
        if longest > cfg.max_len:
            if cfg.error_on_long:
                raise ValueError(f"{pair.record.source}: a sequence of {longest} tokens > --max-len {cfg.max_len}")
            too_long += 1
            continue
        grouped.append(samples)
    data.report_bad(errors, cfg.skip_bad_records, cfg.data, len(grouped))
    if too_long and world.is_main:
        print(f"dpo: dropped {too_long} pairs longer than {cfg.max_len} tokens", file=sys.stderr)
    if not grouped:
        raise ValueError("dpo: no usable pairs")
    index = 0
    for samples in grouped:
        for sample in samples:
            sample.index, index = index, index + 1
    return grouped


def reference_logps(net, batch: dict, features, cfg: DPOConfig, ref_table: torch.Tensor | None) -> torch.Tensor:
    """Reference log-probs of every row, [2B]: from the precomputed table, or the same weights with
    adapters off (the model at the start of the stage) under no_grad, on the same image features."""
    if ref_table is not None:
        rows = ref_table[batch["sample_index"]]  # [B, 2] (chosen, rejected)
        return torch.cat([rows[:, 0], rows[:, 1]])
    with torch.no_grad(), modeling.adapters_disabled(net):
        return dpo.sequence_logps(net, batch, features, cfg.logp_chunk)


def precompute_reference(net, grouped, processor, cfg: DPOConfig, world: Dist) -> torch.Tensor:
    """[n_samples, 2] reference log-probs (chosen, rejected) in one pass, split over ranks, summed."""
    n_samples = sum(len(g) for g in grouped)
    table = torch.zeros(n_samples, 2, dtype=torch.float32, device=world.device)
    mine = list(range(world.rank, len(grouped), world.world_size))
    was_training = net.training
    net.eval()  # no dropout in the reference
    for start in tqdm(range(0, len(mine), cfg.batch_size), desc="reference", disable=not world.is_main):
        samples = [s for i in mine[start:start + cfg.batch_size] for s in grouped[i]]
        batch = to_device(dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                                            net.config.image_token_id), world.device)
        with autocast_for(world.device):
            logps = reference_logps(net, batch, dpo.encode_images(net, batch), cfg, None)
        n = len(samples)
        table[batch["sample_index"]] = torch.stack([logps[:n], logps[n:]], dim=1).float()
    net.train(was_training)
    return all_reduce_sum(table, world)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def dpo_step_loss(cfg: DPOConfig, policy: torch.Tensor, reference: torch.Tensor, batch: dict,
                  kind_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step objective, and its per-kind sums of DPO_STATS [2, 7].

    Stage 1: the mean pair loss. Stage 2: lambda_box * mean box loss + lambda_answer * mean answer
    loss, means over the whole optimizer step (kind_counts: samples per kind, all micro-batches, ranks).
    """
    n = batch["kind"].shape[0]
    kind = batch["kind"]  # [B] 0 box, 1 answer
    args = (policy[:n], policy[n:], reference[:n], reference[n:])
    box_losses, chosen_rewards, rejected_rewards = dpo.preference_loss(
        *args, beta=cfg.beta, kind=cfg.loss, label_smoothing=cfg.label_smoothing)
    if cfg.stage == 2:
        beta_answer = cfg.beta if cfg.beta_answer is None else cfg.beta_answer
        answer_losses, answer_chosen, answer_rejected = dpo.preference_loss(
            *args, beta=beta_answer, kind=cfg.loss, label_smoothing=cfg.label_smoothing)
        is_answer = kind == 1
        losses = torch.where(is_answer, answer_losses, box_losses)
        chosen_rewards = torch.where(is_answer, answer_chosen, chosen_rewards)
        rejected_rewards = torch.where(is_answer, answer_rejected, rejected_rewards)
        lambdas = torch.tensor([cfg.lambda_box, cfg.lambda_answer], device=policy.device)
    else:
        losses, lambdas = box_losses, torch.ones(2, device=policy.device)
    weights = lambdas[kind] / kind_counts.clamp(min=1)[kind]  # [B]
    loss = (weights * losses).sum()
    if cfg.nll_weight > 0:  # RPO-style anchor: length-normalised NLL of the chosen responses
        lengths = dpo.response_lengths(batch)[:n].clamp(min=1)
        loss = loss + cfg.nll_weight * (-policy[:n] / lengths).sum() / kind_counts.sum()
    values = torch.stack([losses, chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                          (chosen_rewards > rejected_rewards).float(), policy[:n], policy[n:]], dim=1)  # [B, 7]
    one_hot = F.one_hot(kind, num_classes=2).to(values.dtype)  # [B, 2]
    return loss, one_hot.T @ values.detach()  # [2, 7] per-kind sums


class DPOObjective(nn.Module):
    """One DPO micro-batch as a module (the FSDP2 root): features once, policy, reference, loss."""

    def __init__(self, net, cfg: DPOConfig, ref_table: torch.Tensor | None):
        super().__init__()
        self.net, self.cfg, self.ref_table = net, cfg, ref_table

    def forward(self, batch: dict, kind_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = dpo.encode_images(self.net, batch)  # once per unique image: policy and reference share them
        policy = dpo.sequence_logps(self.net, batch, features, self.cfg.logp_chunk)
        reference = reference_logps(self.net, batch, features, self.cfg, self.ref_table)
        return dpo_step_loss(self.cfg, policy, reference, batch, kind_counts)


def dpo_train(cfg: DPOConfig) -> Path:
    """DPO stage 1 or 2; writes <out>/adapter, <out>/config.json and <out>/metrics.jsonl."""
    world = setup_distributed(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    lora_cfg = modeling.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    net, processor = prepare_model(cfg.model, cfg.adapter, lora_cfg, world, cfg.dtype, cfg.grad_checkpointing)
    pairs = data.read_pairs(cfg.data, image_root=cfg.image_root, skip_bad=cfg.skip_bad_records, limit=cfg.limit)
    grouped = build_dpo_samples(cfg, pairs, processor, world)
    pad_id, image_token_id = processor.tokenizer.pad_token_id, net.config.image_token_id

    steps_per_epoch = len(epoch_batches(len(grouped), cfg.batch_size, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * steps_per_epoch)
    if steps_per_epoch == 0 or total_steps == 0:
        raise ValueError(f"dpo: {len(grouped)} pairs are fewer than one optimizer step of "
                         f"{cfg.batch_size} x {cfg.grad_accum} x {world.world_size}")
    # reference log-probs first: a plain forward pass, before the model is sharded
    ref_table = precompute_reference(net, grouped, processor, cfg, world) if cfg.precompute_ref else None
    objective = wrap_objective(DPOObjective(net, cfg, ref_table), cfg, world)
    params = modeling.trainable_parameters(objective)  # after sharding: the DTensor parameters
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    global_batch = cfg.batch_size * cfg.grad_accum * world.world_size
    start_step = resume_point(cfg, out, objective, optimizer, scheduler, world)
    metrics = start_run(out, cfg, world, (
        f"dpo stage {cfg.stage}: {len(grouped)} pairs; {total_steps} steps; global batch {global_batch} pairs "
        f"= {cfg.batch_size} x {cfg.grad_accum} accum x {world.world_size} ranks; reference = "
        f"{cfg.adapter or cfg.model} ({'precomputed' if cfg.precompute_ref else 'adapters off, per step'})"))
    # The unit is a pair: its box and answer samples share one batch, so its images are encoded once.
    batches = (to_device(dpo.collate_pairs([s for i in indices for s in grouped[i]], processor.image_processor,
                                           pad_id, image_token_id), world.device)
               for indices in batch_stream(len(grouped), cfg.batch_size, world, cfg.seed,
                                           start=start_step * cfg.grad_accum))
    progress = tqdm(range(start_step, total_steps), desc=f"dpo stage {cfg.stage}", disable=not world.is_main,
                    dynamic_ncols=True, initial=start_step, total=total_steps)
    stopper = StopOnSignal()
    start = time.time()
    for step in progress:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        kind_counts = all_reduce_sum(sum(torch.bincount(b["kind"], minlength=2) for b in micro).float(), world)
        step_loss = torch.zeros((), device=world.device)
        stats = torch.zeros(len(DPO_KINDS), len(DPO_STATS), device=world.device)
        for batch in micro:
            with autocast_for(world.device):
                loss, batch_stats = objective(batch, kind_counts)
            loss.backward()
            step_loss += loss.detach()
            stats += batch_stats
        grad_norm, lr = optimizer_step(params, optimizer, scheduler, world, cfg.grad_clip)
        step_loss, stats = all_reduce_sum(step_loss, world), all_reduce_sum(stats, world)
        if world.is_main and (step % cfg.log_every == 0 or step == total_steps - 1):
            means = (stats / kind_counts.clamp(min=1)[:, None]).tolist()  # the only host sync of the step
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": step_loss.item(),
                   "lr": lr, "grad_norm": grad_norm.item(), "elapsed_s": time.time() - start}
            for k, kind in enumerate(DPO_KINDS):
                if kind_counts[k] > 0:
                    row.update({f"{kind}/{name}": means[k][j] for j, name in enumerate(DPO_STATS)})
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            progress.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['box/rewards/margins']:.3f}")
        if end_of_step(cfg, out, step + 1, total_steps, objective, optimizer, scheduler, world, stopper):
            break
    return finish_run(out, objective, lora_cfg, world, metrics, stopper, "dpo")


# --------------------------------------------------------------------------------------------
# Built-in assets.


@dataclass
class TinyArgs:
    """Write the built-in tiny checkpoint directory (random weights, BPE trained on the spot)."""

    out: str = "tiny-model"
    arch: Literal["qwen2.5-vl", "qwen2-vl"] = "qwen2.5-vl"
    seed: int = 0


def tiny_command(args: TinyArgs) -> Path:
    path = modeling.make_tiny(args.out, modeling.TinyConfig(arch=args.arch, seed=args.seed))
    print(f"tiny {args.arch} checkpoint written to {path}")
    return path


@dataclass
class SynthArgs:
    """Write the synthetic intention-driven VQA set (Visual-CoT metadata format, PNG images)."""

    out: str = "synth-data"
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    seed: int = 0


def synth_command(args: SynthArgs) -> dict:
    paths = synth.make_synth(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    print(f"synthetic set written to {args.out}: " + ", ".join(str(p) for p in paths.values()))
    return paths


COMMANDS = {"sft": (SFTConfig, sft), "dpo": (DPOConfig, dpo_train), "tiny": (TinyArgs, tiny_command), "synth": (SynthArgs, synth_command)}


def main() -> None:
    args = tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()})
    run = next(fn for cls, fn in COMMANDS.values() if isinstance(args, cls))
    run(args)


if __name__ == "__main__":
    main()
