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

The path of data in `sft`: record -> two samples (data.sft_samples) -> tokens + pixels
(data.encode / data.sample_pixels) -> batch (data.collate) -> forward to the last hidden states
-> logits at supervised positions only -> cross-entropy summed over the optimizer step's tokens.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import data
import demo
import dpo
import evaluate
import export
import generate
import model as modeling
import serve
import synth
import train

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
    # also train the bare question on the ground-truth crop alone: what generate.py's rule scorer asks
    # (the answer from the crop alone) when the RL phases' questions carry no box annotation
    crop_alone_samples: bool = False
    # keep every processed image (page view and crop) in memory after its first use: each is decoded once
    # instead of once per sample and epoch (~0.6 MB per record: for small sets such as the demo's)
    cache_pixels: bool = False
    # a curriculum: the first N optimizer steps draw focus (box) samples only, then all kinds mixed (the
    # random tiny model needs it to learn boxes; measurements in BENCHMARKS.md)
    focus_first_steps: int = 0
    max_len: int = 2048  # longer samples are dropped whole (never cut through image tokens)
    error_on_long: bool = False  # raise instead of dropping over-long samples
    skip_bad_records: bool = False  # skip (and report) malformed records instead of stopping
    grad_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end or on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    resume: bool = False  # continue the run in --out from its newest complete checkpoint
    overwrite: bool = False  # replace the run in --out (its adapter, checkpoints, config and metrics)
    fsdp: bool = True  # under torchrun: shard with FSDP2 (--no-fsdp: replicate, all-reduce gradients)


class SFTDataset(torch.utils.data.Dataset):
    """Samples with text already tokenised; images decoded and processed per item (once, with cache_pixels)."""

    def __init__(self, samples: list[data.Sample], image_processor, cache_pixels: bool = False):
        self.samples, self.image_processor = samples, image_processor
        self.pixel_cache = {} if cache_pixels else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        pixels = data.sample_pixels(sample, self.image_processor, self.pixel_cache)
        return {"input_ids": sample.input_ids, "labels": sample.labels, **pixels}


def build_sft_samples(cfg: SFTConfig, records: list[data.Record], processor, world: modeling.Dist) -> list[data.Sample]:
    """Every record's focus and answer (and crop-alone) samples, over-long ones dropped (or an error) with a count."""
    samples, no_box, too_long = [], 0, []
    for record in records:
        pair = data.sft_samples(record, processor.tokenizer, processor.image_processor, cfg.box_form, cfg.crop,
                                cfg.crop_alone_samples)
        no_box += not pair
        for sample in pair:
            (too_long if len(sample.input_ids) > cfg.max_len else samples).append(sample)
    if too_long and cfg.error_on_long:
        first = too_long[0]
        raise data.UserError(f"{first.record.source}: {first.kind} sample has {len(first.input_ids)} tokens "
                             f"> --max-len {cfg.max_len} ({len(too_long)} such samples)")
    if world.is_main and (too_long or no_box):
        print(f"sft: dropped {len(too_long)} samples longer than {cfg.max_len} tokens and "
              f"{no_box} records without a box", file=sys.stderr)
    if not samples:
        raise data.UserError("sft: no trainable samples (every record lacks a box or is too long)")
    return samples


def sft_index_stream(cfg: SFTConfig, samples: list[data.Sample], world: modeling.Dist, start_step: int):
    """This rank's micro-batches of sample indices from optimizer step start_step on: focus samples only
    for the first cfg.focus_first_steps steps, then every sample (each part resumes at its own position)."""
    focus = [i for i, sample in enumerate(samples) if sample.kind == "focus"]
    first, done = cfg.focus_first_steps * cfg.grad_accum, start_step * cfg.grad_accum  # in micro-batches
    if done < first:
        focus_batches = train.batch_stream(len(focus), cfg.batch_size, world, cfg.seed, start=done)
        for _ in range(first - done):
            yield [focus[i] for i in next(focus_batches)]
    yield from train.batch_stream(len(samples), cfg.batch_size, world, cfg.seed, start=max(0, done - first))


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


def sft(cfg: SFTConfig) -> Path:
    """Supervised warm-up; writes <out>/adapter, <out>/config.json and <out>/metrics.jsonl."""
    world = modeling.setup_distributed(cfg.device)
    train.seed_everything(cfg.seed)
    out = Path(cfg.out)
    replaced = train.check_run_out(cfg, "sft")  # before any work: a refused --out costs nothing
    train.barrier(world)  # every rank has checked --out before rank 0 writes into it
    data_path = synth.resolve_data(cfg.data, "train", cfg.seed)
    lora_cfg = modeling.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    net, processor = train.prepare_model(cfg.model, cfg.adapter, lora_cfg, world, cfg.dtype, cfg.grad_checkpointing)

    records = data.read_records(data_path, image_root=cfg.image_root, skip_bad=cfg.skip_bad_records, limit=cfg.limit)
    samples = build_sft_samples(cfg, records, processor, world)
    dataset = SFTDataset(samples, processor.image_processor, cfg.cache_pixels)
    pad_id = processor.tokenizer.pad_token_id
    image_token_id = net.config.image_token_id

    steps_per_epoch = len(train.epoch_batches(len(samples), cfg.batch_size, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * steps_per_epoch)
    if steps_per_epoch == 0 or total_steps == 0:
        raise data.UserError(f"sft: {len(samples)} samples are fewer than one optimizer step of "
                             f"{cfg.batch_size} x {cfg.grad_accum} x {world.world_size}")
    n_focus = sum(sample.kind == "focus" for sample in samples)
    if cfg.focus_first_steps and not (0 < cfg.focus_first_steps < total_steps
                                      and n_focus >= cfg.batch_size * world.world_size):
        raise data.UserError(f"sft: --focus-first-steps {cfg.focus_first_steps} must be positive, fewer than the "
                             f"{total_steps} steps, with one micro-batch of focus samples per rank ({n_focus})")
    objective = train.wrap_objective(SFTObjective(net), cfg, world)
    params = modeling.trainable_parameters(objective)  # after sharding: the DTensor parameters
    optimizer, scheduler = train.make_optimizer(params, cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    global_batch = cfg.batch_size * cfg.grad_accum * world.world_size
    start_step = train.resume_point(cfg, out, objective, optimizer, scheduler, world)
    metrics = train.start_run(out, cfg, "sft", world, replaced, (
        f"sft: {len(records)} records -> {len(samples)} samples; {total_steps} steps; global batch "
        f"{global_batch} = {cfg.batch_size} x {cfg.grad_accum} accum x {world.world_size} ranks; "
        f"{sum(p.numel() for p in params):,} trainable parameters"))
    batches = (train.to_device(data.collate([dataset[i] for i in indices], pad_id, image_token_id), world.device)
               for indices in sft_index_stream(cfg, samples, world, start_step))
    progress = tqdm(range(start_step, total_steps), desc="sft", disable=not world.is_main, dynamic_ncols=True,
                    initial=start_step, total=total_steps)
    stopper = train.StopOnSignal()
    start = time.time()
    for step in progress:
        step_start = time.time()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        # One normaliser for the whole optimizer step (all micro-batches, all ranks): the loss is the
        # mean over supervised tokens of the global batch, whatever the accumulation split.
        n_tokens = sum((b["labels"][:, 1:] != data.IGNORE_INDEX).sum() for b in micro).float()
        n_tokens = train.all_reduce_sum(n_tokens, world)
        step_loss = torch.zeros((), device=world.device)
        for batch in micro:
            with train.autocast_for(world.device):
                loss = objective(batch, n_tokens)
            loss.backward()
            step_loss += loss.detach()
        grad_norm, lr = train.optimizer_step(params, optimizer, scheduler, world, cfg.grad_clip)
        step_loss = train.all_reduce_sum(step_loss, world)
        tokens = train.all_reduce_sum(sum(b["attention_mask"].sum() for b in micro).float(), world)
        if world.is_main and (step % cfg.log_every == 0 or step == total_steps - 1):
            tokens = int(tokens.item())
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                   "loss": step_loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens": tokens, "tokens_per_s": tokens / max(time.time() - step_start, 1e-9),
                   "elapsed_s": time.time() - start}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if train.end_of_step(cfg, out, step + 1, total_steps, objective, optimizer, scheduler, world, stopper):
            break
    return train.finish_run(out, objective, lora_cfg, world, metrics, stopper, "sft")


# --------------------------------------------------------------------------------------------
# Preference optimisation (DPO) on self-generated pairs.

DPO_KINDS = ("box", "answer")  # stage-2 step types; index = PairSample kind code in dpo.collate_pairs
DPO_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "nll/chosen")


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
    out: str | None = None  # default runs/dpo1 or runs/dpo2, by --stage
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
    resume: bool = False  # continue the run in --out from its newest complete checkpoint
    overwrite: bool = False  # replace the run in --out (its adapter, checkpoints, config and metrics)
    fsdp: bool = True  # under torchrun: shard with FSDP2 (--no-fsdp: replicate, all-reduce gradients)

    def __post_init__(self):
        if self.out is None:  # stages 1 and 2 never share a default --out: stage 2 reads stage 1's adapter
            self.out = f"runs/dpo{self.stage}"


def build_dpo_samples(cfg: DPOConfig, pairs: list[data.Pair], processor, world: modeling.Dist) -> list[list[data.PairSample]]:
    """Each pair's samples (1 in stage 1, 2 in stage 2), checked before training; bad pairs reported."""
    grouped, errors, too_long, same_box = [], [], 0, 0
    for pair in pairs:
        try:
            samples = data.dpo_samples(pair, processor.tokenizer, processor.image_processor, cfg.stage,
                                       cfg.crop, cfg.rejected_crop)
        except data.DataError as e:
            errors.append(str(e))
            continue
        same_box += cfg.stage == 2 and samples[0].kind != "box"  # its box step was dropped
        longest = max(max(len(s.chosen_ids), len(s.rejected_ids)) for s in samples)
        if longest > cfg.max_len:
            if cfg.error_on_long:
                raise data.UserError(f"{pair.record.source}: a sequence of {longest} tokens > --max-len {cfg.max_len}")
            too_long += 1
            continue
        grouped.append(samples)
    data.report_bad(errors, cfg.skip_bad_records, cfg.data, len(grouped))
    if too_long and world.is_main:
        print(f"dpo: dropped {too_long} pairs longer than {cfg.max_len} tokens", file=sys.stderr)
    if same_box and world.is_main:
        print(f"dpo: {same_box} pairs have the same chosen and rejected box: only their answer step is trained "
              "(the box step's gradient is zero)", file=sys.stderr)
    if not grouped:
        raise data.UserError("dpo: no usable pairs")
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


def precompute_reference(net, grouped, processor, cfg: DPOConfig, world: modeling.Dist) -> torch.Tensor:
    """[n_samples, 2] reference log-probs (chosen, rejected) in one pass, split over ranks, summed."""
    n_samples = sum(len(g) for g in grouped)
    table = torch.zeros(n_samples, 2, dtype=torch.float32, device=world.device)
    mine = list(range(world.rank, len(grouped), world.world_size))
    was_training = net.training
    net.eval()  # no dropout in the reference
    for start in tqdm(range(0, len(mine), cfg.batch_size), desc="reference", disable=not world.is_main):
        samples = [s for i in mine[start:start + cfg.batch_size] for s in grouped[i]]
        batch = train.to_device(dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                                            net.config.image_token_id), world.device)
        with train.autocast_for(world.device):
            logps = reference_logps(net, batch, dpo.encode_images(net, batch), cfg, None)
        n = len(samples)
        table[batch["sample_index"]] = torch.stack([logps[:n], logps[n:]], dim=1).float()
    net.train(was_training)
    return train.all_reduce_sum(table, world)


def dpo_step_loss(cfg: DPOConfig, policy: torch.Tensor, reference: torch.Tensor, batch: dict,
                  kind_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step objective, and its per-kind sums of DPO_STATS [2, 8].

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
    nll = -policy[:n] / dpo.response_lengths(batch)[:n].clamp(min=1)  # [B] length-normalised NLL of the chosen
    if cfg.nll_weight > 0:  # RPO-style anchor on the chosen responses
        loss = loss + cfg.nll_weight * nll.sum() / kind_counts.sum()
    values = torch.stack([losses, chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                          (chosen_rewards > rejected_rewards).float(), policy[:n], policy[n:], nll], dim=1)  # [B, 8]
    one_hot = F.one_hot(kind, num_classes=2).to(values.dtype)  # [B, 2]
    return loss, one_hot.T @ values.detach()  # [2, 8] per-kind sums


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
    world = modeling.setup_distributed(cfg.device)
    train.seed_everything(cfg.seed)
    out = Path(cfg.out)
    replaced = train.check_run_out(cfg, "dpo")
    train.barrier(world)  # every rank has checked --out before rank 0 writes into it
    if cfg.stage == 2 and not cfg.adapter and world.is_main:
        print("warning: dpo --stage 2 without --init-adapter: the policy and the reference start from the base "
              "model, not from the stage-1 model", file=sys.stderr)
    lora_cfg = modeling.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    net, processor = train.prepare_model(cfg.model, cfg.adapter, lora_cfg, world, cfg.dtype, cfg.grad_checkpointing)
    pairs = data.read_pairs(cfg.data, image_root=cfg.image_root, skip_bad=cfg.skip_bad_records, limit=cfg.limit)
    grouped = build_dpo_samples(cfg, pairs, processor, world)
    pad_id, image_token_id = processor.tokenizer.pad_token_id, net.config.image_token_id

    steps_per_epoch = len(train.epoch_batches(len(grouped), cfg.batch_size, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * steps_per_epoch)
    if steps_per_epoch == 0 or total_steps == 0:
        raise data.UserError(f"dpo: {len(grouped)} pairs are fewer than one optimizer step of "
                             f"{cfg.batch_size} x {cfg.grad_accum} x {world.world_size}")
    # reference log-probs first: a plain forward pass, before the model is sharded
    ref_table = precompute_reference(net, grouped, processor, cfg, world) if cfg.precompute_ref else None
    objective = train.wrap_objective(DPOObjective(net, cfg, ref_table), cfg, world)
    params = modeling.trainable_parameters(objective)  # after sharding: the DTensor parameters
    optimizer, scheduler = train.make_optimizer(params, cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    global_batch = cfg.batch_size * cfg.grad_accum * world.world_size
    start_step = train.resume_point(cfg, out, objective, optimizer, scheduler, world)
    metrics = train.start_run(out, cfg, "dpo", world, replaced, (
        f"dpo stage {cfg.stage}: {len(grouped)} pairs; {total_steps} steps; global batch {global_batch} pairs "
        f"= {cfg.batch_size} x {cfg.grad_accum} accum x {world.world_size} ranks; reference = "
        f"{cfg.adapter or cfg.model} ({'precomputed' if cfg.precompute_ref else 'adapters off, per step'})"))
    # The unit is a pair: its box and answer samples share one batch, so its images are encoded once.
    batches = (train.to_device(dpo.collate_pairs([s for i in indices for s in grouped[i]], processor.image_processor,
                                           pad_id, image_token_id), world.device)
               for indices in train.batch_stream(len(grouped), cfg.batch_size, world, cfg.seed,
                                           start=start_step * cfg.grad_accum))
    progress = tqdm(range(start_step, total_steps), desc=f"dpo stage {cfg.stage}", disable=not world.is_main,
                    dynamic_ncols=True, initial=start_step, total=total_steps)
    stopper = train.StopOnSignal()
    start = time.time()
    for step in progress:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        kind_counts = train.all_reduce_sum(sum(torch.bincount(b["kind"], minlength=2) for b in micro).float(), world)
        step_loss = torch.zeros((), device=world.device)
        stats = torch.zeros(len(DPO_KINDS), len(DPO_STATS), device=world.device)
        for batch in micro:
            with train.autocast_for(world.device):
                loss, batch_stats = objective(batch, kind_counts)
            loss.backward()
            step_loss += loss.detach()
            stats += batch_stats
        grad_norm, lr = train.optimizer_step(params, optimizer, scheduler, world, cfg.grad_clip)
        step_loss, stats = train.all_reduce_sum(step_loss, world), train.all_reduce_sum(stats, world)
        if world.is_main and (step % cfg.log_every == 0 or step == total_steps - 1):
            means = (stats / kind_counts.clamp(min=1)[:, None]).tolist()  # the only host sync of the step
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": step_loss.item(),
                   "lr": lr, "grad_norm": grad_norm.item(), "elapsed_s": time.time() - start}
            for k, kind in enumerate(DPO_KINDS):
                if kind_counts[k] > 0:
                    row.update({f"{kind}/{name}": means[k][j] for j, name in enumerate(DPO_STATS)})
            # the two terms of the loss apart: the preference term, and nll_weight x the chosen's mean NLL
            row["nll_term"] = cfg.nll_weight * stats[:, -1].sum().item() / kind_counts.sum().clamp(min=1).item()
            row["dpo_term"] = row["loss"] - row["nll_term"]
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            progress.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row.get('box/rewards/margins', float('nan')):.3f}")
        if train.end_of_step(cfg, out, step + 1, total_steps, objective, optimizer, scheduler, world, stopper):
            break
    return train.finish_run(out, objective, lora_cfg, world, metrics, stopper, "dpo")


# --------------------------------------------------------------------------------------------
# Built-in assets.


@dataclass
class TinyArgs:
    """Write the built-in tiny checkpoint directory (random weights, BPE trained on the spot)."""

    out: str = "tiny-model"
    arch: Literal["qwen2.5-vl", "qwen2-vl"] = "qwen2.5-vl"
    seed: int = 0


def _check_new_dir(out: str) -> None:
    """The asset commands write a whole directory: refuse one that exists and is not empty."""
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise data.UserError(f"--out {out} exists and is not empty; choose another --out (or delete it first)")


def tiny_command(args: TinyArgs) -> Path:
    _check_new_dir(args.out)
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
    _check_new_dir(args.out)
    paths = synth.make_synth(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    print(f"synthetic set written to {args.out}: " + ", ".join(str(p) for p in paths.values()))
    return paths


COMMANDS = {"sft": (SFTConfig, sft), "generate": (generate.GenerateConfig, generate.generate_command),
            "dpo": (DPOConfig, dpo_train), "eval": (evaluate.EvalConfig, evaluate.evaluate), "export": (export.ExportConfig, export.export_command),
            "infer": (serve.InferConfig, serve.infer_command), "serve": (serve.ServeConfig, serve.serve_command),
            "demo": (demo.DemoConfig, demo.demo), "tiny": (TinyArgs, tiny_command), "synth": (SynthArgs, synth_command)}


def main() -> None:
    def run(args) -> None:
        next(fn for cls, fn in COMMANDS.values() if isinstance(args, cls))(args)

    data.cli(lambda: tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}), run)


if __name__ == "__main__":
    main()
