"""visrl: intention-driven perception for Qwen-VL models (VisRL recipe). CLI and training loops.

    python visrl.py tiny --out DIR          write the built-in tiny checkpoint
    python visrl.py synth --out DIR         write the synthetic intention-driven VQA set
    python visrl.py sft [flags]             supervised warm-up (focus + answer samples), LoRA
    python visrl.py generate --adapter DIR --data Q.jsonl   self-generated preference pairs (= python generate.py)
    python visrl.py dpo --stage 1|2 --data pairs.jsonl --init-adapter DIR   preference optimisation
    python visrl.py eval --adapter DIR --data DIR|synth      two-step evaluation (= python evaluate.py)
    torchrun --nproc_per_node N visrl.py sft ...   the same loop, N processes
    python visrl.py export --adapter DIR --out DIR [--format merged|peft]   a checkpoint/adapter for stock tools
    python visrl.py infer --image PATH --question TEXT   two-step inference on one image, with a picture
    python visrl.py serve [--port 8000]     an OpenAI-compatible server on the in-process model
    python visrl.py demo --out DIR          the whole recipe on the tiny model, with a table and plots

The path of data in `sft`: record -> two samples (chat.sft_samples: tokens, image windows) -> batch
(chat.collate: each distinct image processed once) -> image features once (dpo.encode_images) -> hidden
states at supervised positions only -> fused log-probs (dpo.token_logps) -> negative sum over the
optimizer step's tokens. DPO takes the same path to summed log-probs per sequence (dpo.py's top).
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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import chat
import data
import runs
import demo
import dpo
import evaluate
import export
import generate
import model as modeling
import serve
import synth

# --------------------------------------------------------------------------------------------
# Supervised warm-up.


@dataclass
class SFTConfig(modeling.TrainConfig):
    """Supervised warm-up: LoRA on the language model, loss on assistant tokens only."""

    out: str = "runs/sft"  # where adapter/, config.json and metrics.jsonl go
    # also train the bare question on the ground-truth crop alone: what generate.py's rule scorer asks
    # (the answer from the crop alone) when the RL phases' questions carry no box annotation
    crop_alone_samples: bool = False
    # keep every processed image (page view and crop) in memory after its first use: each is decoded once
    # instead of once per sample and epoch (~0.6 MB per record: for small sets such as the demo's)
    cache_pixels: bool = False
    # a curriculum: the first N optimizer steps draw focus (box) samples only, then all kinds mixed
    focus_first_steps: int = 0


def build_sft_samples(cfg: SFTConfig, records: list[data.Record], processor, world: modeling.Dist) -> list[chat.Sample]:
    """Every record's focus and answer (and crop-alone) samples, over-long ones dropped (or an error) with a count."""
    cfg = modeling.resolve_convention(cfg)
    samples, no_box, too_long = [], 0, []
    for record in records:
        pair = chat.sft_samples(record, processor.tokenizer, processor.image_processor, cfg.box_form, cfg.crop,
                                cfg.crop_alone_samples, cfg.prompts)
        no_box += not pair
        for sample in pair:
            (too_long if len(sample.input_ids) > cfg.max_len else samples).append(sample)
    if too_long and cfg.error_on_long:
        first = too_long[0]
        raise data.UserError(f"{first.record.source}: {first.kind} sample has {len(first.input_ids)} tokens "
                             f"> --max-len {cfg.max_len} ({len(too_long)} such samples)")
    if world.is_main and (too_long or no_box):
        print(f"warning: sft dropped {len(too_long)} samples longer than {cfg.max_len} tokens and "
              f"{no_box} records without a box", file=sys.stderr)
    if not samples:
        raise data.UserError("sft: no trainable samples (every record lacks a box or is too long)")
    return samples


def sft_index_stream(cfg: SFTConfig, samples: list[chat.Sample], world: modeling.Dist, start_step: int):
    """This rank's micro-batches of sample indices from optimizer step start_step on: focus samples only
    for the first cfg.focus_first_steps steps, then every sample (each part resumes at its own position)."""
    focus = [i for i, sample in enumerate(samples) if sample.kind == "focus"]
    first, done = cfg.focus_first_steps * cfg.grad_accum, start_step * cfg.grad_accum  # in micro-batches
    if done < first:
        focus_batches = batch_stream(len(focus), cfg.batch_size, world, cfg.seed, start=done)
        for _ in range(first - done):
            yield [focus[i] for i in next(focus_batches)]
    yield from batch_stream(len(samples), cfg.batch_size, world, cfg.seed, start=max(0, done - first))


def sft_loss(net, batch: dict, n_tokens: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised tokens, divided by the step's token count: the negative
    log-probs of the fused path DPO uses (image features once, hidden states at response positions only)."""
    return -dpo.token_logps(net, batch, dpo.encode_images(net, batch), chunk_size).sum() / n_tokens


class SFTObjective(nn.Module):
    """sft_loss as a module: FSDP2 gathers a root unit's parameters around its forward."""

    def item_counts(self, samples: list[chat.Sample]) -> torch.Tensor:
        """Supervised tokens of these samples [] (the held-out loss's normaliser, before collating them)."""
        return torch.tensor(float(sum(label != chat.IGNORE_INDEX for s in samples for label in s.labels[1:])))

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch: dict, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (loss, this batch's tokens [1]: summed over the step and the ranks for the tokens/s the row logs)
        return sft_loss(self.net, batch, n_tokens), batch["attention_mask"].sum().float()[None]

    def step_counts(self, micro: list[dict]) -> torch.Tensor:
        """This rank's supervised tokens in the optimizer step [] (the loop sums them over ranks)."""
        return torch.tensor(float(sum(len(b["response_targets"]) for b in micro)), device=micro[0]["input_ids"].device)

    def log_fields(self, stats: torch.Tensor, n_tokens: torch.Tensor, loss: float) -> dict:
        return {"tokens": int(stats[0].item())}


# --------------------------------------------------------------------------------------------
# The run around the loop: seeds, the model to train, the optimizer, --out, metrics.


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


def prepare_model(model_path: str, adapter: str | None, lora: modeling.LoRAConfig, world: modeling.Dist,
                  dtype_name: str, grad_checkpointing: bool, max_pixels: int = chat.UPSTREAM_MAX_PIXELS):
    """Load the base, merge a previous phase's adapter into it, add a fresh adapter to train.

    With adapters off, the returned model is exactly the start of this phase: the reference.
    """
    net, processor = modeling.load_model(model_path, dtype=modeling.resolve_dtype(dtype_name, world.device),
                                         device=world.device, max_pixels=max_pixels)
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


RUN_FILES = ("adapter", "checkpoints", "config.json", "metrics.jsonl", dpo.REFERENCE_FILE)  # what a run writes


def check_run_out(cfg, command: str) -> list[Path]:
    """Refuse an --out that overlaps the model, the adapter chain or the data, or that holds a run unless
    --resume or --overwrite says what to do with it; returns what --overwrite will replace. Cheap: it builds
    no built-in asset (those live in the cache, never in an --out)."""
    data_files = [] if cfg.data == "synth" else [("--data", synth.resolve_data(cfg.data))]
    replaced = runs.check_out(cfg.out, RUN_FILES, inputs=modeling.input_dirs(cfg.model, cfg.adapter),
                              data_files=data_files, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:  # a resumed run goes on with the settings (and the command) it was started with
        settings = dataclasses.asdict(cfg)
        runs.check_settings(cfg.out, command, settings, [k for k in settings if k not in RESUMABLE_CHANGES],
                            "--resume it")
    return replaced


# what a resumed run may change: bookkeeping, and how long it runs (to extend a finished run)
RESUMABLE_CHANGES = ("resume", "overwrite", "log_every", "save_every", "keep_checkpoints", "max_steps", "epochs",
                     "eval_every", "mix_conventions")


def start_run(out: Path, cfg, command: str, world: modeling.Dist, replaced: list[Path], summary: str):
    """Replace an earlier run with --overwrite (its files only), write the run's config.json and open
    metrics.jsonl (rank 0 only; None elsewhere)."""
    if not world.is_main:
        return None
    runs.clear_run(replaced)
    out.mkdir(parents=True, exist_ok=True)
    runs.write_config(out, command, dataclasses.asdict(cfg))
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
        return bool(modeling.all_reduce_sum(flag, world) > 0)

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



def held_out(n_items: int, fraction: float, seed: int) -> set[int]:
    """Indices of the held-out items: ceil(fraction * n) of them, chosen by the seed alone."""
    if not 0 <= fraction < 1:
        raise data.UserError(f"--val-fraction {fraction}: expected at least 0 and below 1")
    return set(random.Random(f"visrl-val/{seed}").sample(range(n_items), math.ceil(fraction * n_items)))


@torch.no_grad()
def eval_loss(objective: nn.Module, val_items: list, collate, cfg, world: modeling.Dist) -> dict:
    """The loss (and its logged fields) on the held-out items, each once, normalised as one optimizer step over
    all of them. Every rank runs the same number of batches (FSDP2 gathers in each); a short rank repeats an
    item with weight 0."""
    mine = list(range(world.rank, len(val_items), world.world_size))
    n_batches = math.ceil(math.ceil(len(val_items) / world.world_size) / cfg.batch_size)
    counts = modeling.all_reduce_sum(objective.item_counts([val_items[i] for i in mine]).to(world.device), world)
    total, stats = torch.zeros((), device=world.device), 0.0
    objective.eval()
    for b in range(n_batches):
        indices = mine[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = modeling.to_device(collate([val_items[i] for i in indices or mine[:1] or [0]]), world.device)
        with modeling.autocast_for(world.device):
            loss, batch_stats = objective(batch, counts)
        weight = 1.0 if indices else 0.0
        total, stats = total + weight * loss, stats + weight * batch_stats
    objective.train()
    total, stats = modeling.all_reduce_sum(total, world), modeling.all_reduce_sum(stats, world)
    fields = objective.log_fields(stats, counts, total.item())
    return {"eval_loss": total.item(), **{f"eval_{k}": v for k, v in fields.items()}}


def epoch_batches(n_samples: int, batch_size: int, world: modeling.Dist, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch: one shared shuffle, split without overlap."""
    order = list(range(n_samples))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    per_step = batch_size * world.world_size
    usable = n_samples // per_step * per_step  # every rank gets the same number of full batches
    mine = order[:usable][world.rank::world.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


# --------------------------------------------------------------------------------------------
# The loop: SFT and DPO, top to bottom.


def train(cfg: SFTConfig | dpo.DPOConfig) -> Path:
    """`sft` or `dpo` (stage 1 or 2), by the config's type: one loop. Writes <out>/adapter, config.json, metrics.jsonl."""
    is_sft = isinstance(cfg, SFTConfig)
    command, name = ("sft", "sft") if is_sft else ("dpo", f"dpo stage {cfg.stage}")
    world = modeling.setup_distributed(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    cfg = modeling.resolve_convention(cfg)  # prompts, crop, pixel cap, box form: given, else the adapter's
    if not is_sft and cfg.answer_anchor and (cfg.stage != 1 or cfg.nll_weight <= 0):
        raise data.UserError("dpo --answer-anchor: for --stage 1 with --nll-weight > 0 (it trains the chosen answers' "
                             f"NLL alone), got --stage {cfg.stage} --nll-weight {cfg.nll_weight}")
    replaced = check_run_out(cfg, command)  # before any work: a refused --out costs nothing
    barrier(world)  # every rank has checked --out before rank 0 writes into it
    if not is_sft and cfg.stage == 2 and not cfg.adapter and world.is_main:
        print("warning: dpo --stage 2 without --init-adapter: the policy and the reference start from the base "
              "model, not from the stage-1 model", file=sys.stderr)
    lora_cfg = modeling.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                                   convention=modeling.convention_of(cfg))
    net, processor = prepare_model(cfg.model, cfg.adapter, lora_cfg, world, cfg.dtype, cfg.grad_checkpointing,
                                   cfg.max_pixels)
    pad_id, image_token_id = processor.tokenizer.pad_token_id, net.config.image_token_id

    # What the loop draws from: SFT samples (box, answer, crop-alone) or DPO pairs, whose samples (stage 2:
    # box and answer) share one batch, so that each pair's images are encoded once.
    if is_sft:
        records = data.read_records(synth.resolve_data(cfg.data, "train", cfg.seed), image_root=cfg.image_root,
                                    skip_bad=cfg.skip_bad_records, limit=cfg.limit)
        items = build_sft_samples(cfg, records, processor, world)
        val_records = {id(records[i]) for i in held_out(len(records), cfg.val_fraction, cfg.seed)}
        val_items = [s for s in items if id(s.record) in val_records]  # a record's samples stay on one side
        items = [s for s in items if id(s.record) not in val_records]
        pixel_cache = {} if cfg.cache_pixels else None
        collate = lambda rows: chat.collate(rows, processor.image_processor, pad_id, image_token_id, pixel_cache)
        objective, what = SFTObjective(net), f"{len(records)} records -> {len(items)} samples"
    else:
        pairs = data.read_pairs(cfg.data, image_root=cfg.image_root, skip_bad=cfg.skip_bad_records, limit=cfg.limit)
        items = dpo.build_dpo_samples(cfg, pairs, processor, world)
        shared = dpo.sharing_prefix(cfg, net)
        if cfg.shared_prefix and not shared and world.is_main:
            print(f"dpo: attention {net.config._attn_implementation!r} takes no custom mask: each pair runs as two "
                  "full rows, as with --no-shared-prefix", file=sys.stderr)
        collate = lambda groups: dpo.collate_pairs([s for g in groups for s in g], processor.image_processor,
                                                   pad_id, image_token_id, shared)
        # reference log-probs first: a plain forward pass, before the model is sharded; a resumed run reads its own
        ref_table, ref_key, ref_new = None, dpo.reference_key(items, lora_cfg, cfg.dtype), False
        if cfg.precompute_ref:
            ref_table = dpo.load_reference(out, ref_key, world.device) if cfg.resume else None
            if ref_new := ref_table is None:
                ref_table = dpo.precompute_reference(net, items, processor, cfg, world)
        val = held_out(len(items), cfg.val_fraction, cfg.seed)  # after the reference pass, which keys every pair
        items, val_items = [g for i, g in enumerate(items) if i not in val], [g for i, g in enumerate(items) if i in val]
        objective, what = dpo.DPOObjective(net, cfg, ref_table), f"{len(items)} pairs"
    what += f" (+ {len(val_items)} held out)" if val_items else ""

    steps_per_epoch = len(epoch_batches(len(items), cfg.batch_size, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * steps_per_epoch)
    if steps_per_epoch == 0 or total_steps == 0:
        raise data.UserError(f"{command}: {what} are fewer than one optimizer step of "
                             f"{cfg.batch_size} x {cfg.grad_accum} x {world.world_size}")
    if is_sft and cfg.focus_first_steps:
        n_focus = sum(sample.kind == "focus" for sample in items)
        if not (0 < cfg.focus_first_steps < total_steps and n_focus >= cfg.batch_size * world.world_size):
            raise data.UserError(f"sft: --focus-first-steps {cfg.focus_first_steps} must be positive, fewer than the "
                                 f"{total_steps} steps, with one micro-batch of focus samples per rank ({n_focus})")
    objective = wrap_objective(objective, cfg, world)
    params = modeling.trainable_parameters(objective)  # after sharding: the DTensor parameters
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    start_step = resume_point(cfg, out, objective, optimizer, scheduler, world)
    global_batch = f"{cfg.batch_size * cfg.grad_accum * world.world_size} = {cfg.batch_size} x {cfg.grad_accum} " \
                   f"accum x {world.world_size} ranks"
    metrics = start_run(out, cfg, command, world, replaced, (
        f"{name}: {what}; {total_steps} steps; global batch {global_batch}; "
        + (f"{sum(p.numel() for p in params):,} trainable parameters" if is_sft else
           f"reference = {cfg.adapter or cfg.model} ("
           + ("adapters off, per step" if not cfg.precompute_ref else "precomputed" if ref_new else
              f"read back from {dpo.REFERENCE_FILE}") + ")")))
    if not is_sft and ref_new and world.is_main:  # after start_run: --overwrite has cleared the old run by now
        dpo.save_reference(out, ref_table, ref_key)
    indices = (sft_index_stream(cfg, items, world, start_step) if is_sft else
               batch_stream(len(items), cfg.batch_size, world, cfg.seed, start=start_step * cfg.grad_accum))
    batches = (modeling.to_device(collate([items[i] for i in batch_indices]), world.device) for batch_indices in indices)
    progress = tqdm(range(start_step, total_steps), desc=name, disable=not world.is_main, dynamic_ncols=True,
                    initial=start_step, total=total_steps)
    stopper = StopOnSignal()
    start = time.time()
    for step in progress:
        step_start = time.time()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        # One normaliser for the whole optimizer step (all micro-batches, all ranks): the loss is the mean over
        # the global batch's supervised tokens (SFT) or over its pairs of each kind (DPO), whatever the split.
        counts = modeling.all_reduce_sum(objective.step_counts(micro), world)
        step_loss, stats = torch.zeros((), device=world.device), 0.0
        for batch in micro:
            with modeling.autocast_for(world.device):
                loss, batch_stats = objective(batch, counts)
            loss.backward()
            step_loss += loss.detach()
            stats = stats + batch_stats
        grad_norm, lr = optimizer_step(params, optimizer, scheduler, world, cfg.grad_clip)
        step_loss, stats = modeling.all_reduce_sum(step_loss, world), modeling.all_reduce_sum(stats, world)
        due = val_items and (step + 1 == total_steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0))
        held_out_fields = eval_loss(objective, val_items, collate, cfg, world) if due else {}  # every rank runs it
        if world.is_main and (step % cfg.log_every == 0 or step == total_steps - 1 or due):
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": step_loss.item(),
                   "lr": lr, "grad_norm": grad_norm.item()}
            row.update(objective.log_fields(stats, counts, row["loss"]))
            row.update(held_out_fields)
            if "tokens" in row:
                row["tokens_per_s"] = row["tokens"] / max(time.time() - step_start, 1e-9)
            row["elapsed_s"] = time.time() - start
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if end_of_step(cfg, out, step + 1, total_steps, objective, optimizer, scheduler, world, stopper):
            break
    return finish_run(out, objective, lora_cfg, world, metrics, stopper, command)


COMMANDS = {"sft": (SFTConfig, train), "generate": (generate.GenerateConfig, generate.generate_command),
            "dpo": (dpo.DPOConfig, train), "eval": (evaluate.EvalConfig, evaluate.evaluate), "export": (export.ExportConfig, export.export_command),
            "infer": (evaluate.InferConfig, evaluate.infer_command), "serve": (serve.ServeConfig, serve.serve_command),
            "demo": (demo.DemoConfig, demo.demo), "tiny": (demo.TinyArgs, demo.tiny_command), "synth": (demo.SynthArgs, demo.synth_command)}


def main() -> None:
    def run(args) -> None:
        next(fn for cls, fn in COMMANDS.values() if isinstance(args, cls))(args)

    runs.cli(lambda: tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}), run)


if __name__ == "__main__":
    main()
