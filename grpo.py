"""Online grouped RL (GRPO) on VisRL's two-step rollout: `python visrl.py grpo` (issue 31, its first part: one
process). The same loop as sft and dpo (visrl.train) runs it; what differs is where the data comes from: each
micro-batch of questions is answered by the current policy, G times, and scored, before the forward.

The path of a micro-batch, top to bottom:
  records (questions; their boxes are never read unless --use-annotated-boxes)
  rollouts           G two-step rollouts each (chat.two_step: box -> crop -> answer), sampled, seeded by the micro-step
  rewards            box: the crop alone answers right (generate.py's rule probe; with --use-annotated-boxes: IoU > 0.5
                     with the record's box); answer: generate.rule_answer_score of the answer
  group_advantages   (r - mean of the group) / (std of the group + eps), per step kind
  rollout_samples    each rollout's box sample and answer sample (chat.encode), with its advantage
  dpo.pack_groups    a question's G box rows as one row (prefix | G suffixes), its G answer rows as another
  GRPOObjective      policy and reference token log-probs (dpo.token_logps; reference: adapters off) -> grpo_loss
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import tyro

import chat
import data
import dpo
import generate
import model
import runs
import synth

GRPO_KINDS = ("box", "answer")  # the two steps of a rollout, index = the row's kind code
GRPO_STATS = ("loss", "reward", "kl", "clipped")  # per-kind sums in the step's log

@dataclass
class GRPOConfig(model.TrainConfig):
    """Online GRPO: per question G two-step rollouts from the current policy, rewarded by rule, group-normalised."""

    data: str = "synth"  # questions: a records file, a directory with train.jsonl, or `synth` (answers needed)
    # the previous phase's adapter (SFT): merged into the base at load, so the reference (adapters off) is that model
    adapter: Annotated[str | None, tyro.conf.arg(aliases=("--init-adapter",)),
                       runs.default("none: the base model")] = None
    out: str = "runs/grpo"  # the run's directory
    epochs: float = 1.0  # passes over the questions
    lr: float = 1e-6  # peak learning rate of AdamW (TRL's GRPO default)
    batch_size: int = 2  # questions per process per micro-step (each makes 2G rows: G box, G answer)
    grad_accum: int = 4  # micro-steps per optimizer step
    group_size: int = 4  # G: rollouts per question, their rewards normalised together
    temperature: float = 1.0  # the rollouts' sampling temperature (TRL's default)
    top_p: float = 1.0  # the rollouts' nucleus mass
    max_new_tokens: int = 64  # the longest box or answer reply, in tokens
    beta: float = 0.04  # weight of the KL to the reference (DeepSeekMath's GRPO)
    clip_eps: float = 0.2  # the surrogate's ratio clip
    # the box and the answer steps' weights, as dpo stage 2's lambdas (L = lambda_box L_box + lambda_answer L_answer)
    lambdas: tuple[float, float] = (0.5, 0.5)
    # box reward = IoU > 0.5 with the record's annotated box, where it has one (not the recipe's: it reads boxes)
    use_annotated_boxes: bool = False
    val_fraction: float = 0.0  # (no held-out loss: a policy-gradient loss on fresh rollouts says little)

    def check(self) -> None:
        if self.group_size < 2:
            raise data.UserError(f"grpo --group-size {self.group_size}: a group needs 2 rollouts or more")
        if self.val_fraction:
            raise data.UserError("grpo --val-fraction: grpo holds nothing out (its loss is on fresh rollouts)")

# --------------------------------------------------------------------------------------------
# The maths: advantages and the loss, each beside its equation.

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased as TRL's GRPOTrainer takes it; rewards [n * G]
    in group order -> [n * G]. A group whose rewards are all equal gets 0: nothing to prefer."""
    grouped = rewards.view(-1, group_size)  # [n, G]
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)

def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              beta: float, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GRPO objective (DeepSeekMath eq. 3), negated to a loss; all [N] over response tokens, advantages
    already spread to their tokens:
        rho = exp(logp - logp_old)
        L_t = -( min(rho A, clip(rho, 1 - eps, 1 + eps) A) - beta KL_t ),  KL_t = exp(ref - logp) - (ref - logp) - 1
    (KL_t: Schulman's k3, unbiased and >= 0). Returns (L_t, KL_t, whether the clip bit) [N] each."""
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.min(ratio * advantages, clipped_ratio * advantages)
    log_ref_ratio = ref_logps - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    return -(surrogate - beta * kl), kl, (ratio * advantages > clipped_ratio * advantages)

# --------------------------------------------------------------------------------------------
# Rollouts: the policy answers each question G times, two steps each; rule rewards.

def rollouts(net, processor, cfg: GRPOConfig, records: list[data.Record], seed: int) -> list[dict]:
    """G two-step rollouts per record (group order: record 0's G, then record 1's ...), each with its box and answer
    rewards. Sampled with model.sample's seeded generator, so a resumed run redraws the same rollouts."""
    image_processor = processor.image_processor
    images = [data.load_image(r) for r in records for _ in range(cfg.group_size)]
    group = [r for r in records for _ in range(cfg.group_size)]
    sampling = model.Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    calls = iter(range(3))

    def sample(prompts, greedy=False):  # each call its own seed: box step, answer step, crop probe
        how = model.Sampling(cfg.max_new_tokens, 0.0) if greedy else sampling
        return model.sample(net, processor, prompts, how, batch_size=len(prompts), seed=seed * 3 + next(calls))

    rows = chat.two_step(sample, images, [chat.focus_messages(r.question, cfg.prompts, rl=True) for r in group],
                         [r.question for r in group], cfg.crop, cfg.prompts, box_form=cfg.box_form,
                         image_processor=image_processor)
    probe = [i for i, row in enumerate(rows) if row["box"] is not None
             and not (cfg.use_annotated_boxes and group[i].box is not None)]
    crops = [images[i].crop(tuple(rows[i]["crop"])) for i in probe]
    probe_answers = sample([(chat.direct_messages(group[i].question, cfg.prompts), [crop])
                            for i, crop in zip(probe, crops)], greedy=True) if probe else []
    by_probe = dict(zip(probe, probe_answers))
    for i, (row, r) in enumerate(zip(rows, group)):
        row["answer_reward"] = generate.rule_answer_score(row["answer"], r.answers)
        if row["box"] is None:
            row["box_reward"] = 0.0  # no box: nothing was looked at
        elif cfg.use_annotated_boxes and r.box is not None:
            row["box_reward"] = float(chat.iou(row["box"], r.box) > 0.5)
        else:
            row["box_reward"] = generate.rule_answer_score(by_probe[i], r.answers)
        row["record"] = r
    return rows

def rollout_samples(rows: list[dict], processor, cfg: GRPOConfig) -> tuple[list, list[float], list[int], list[float]]:
    """Each rollout's box sample ([image] + question -> its box text) and answer sample ([image, crop] + question -> its
    answer), with the group-normalised advantage of its step: (samples, advantages, kinds, rewards), box rows first."""
    box_adv = group_advantages(torch.tensor([row["box_reward"] for row in rows]), cfg.group_size).tolist()
    answer_adv = group_advantages(torch.tensor([row["answer_reward"] for row in rows]), cfg.group_size).tolist()
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    samples, advantages, kinds, rewards = [], [], [], []
    for kind, advantage in ((0, box_adv), (1, answer_adv)):
        for row, a in zip(rows, advantage):
            r = row["record"]
            window = tuple(row["crop"])
            if kind == 0:
                messages, images = chat.focus_messages(r.question, cfg.prompts, rl=True), [None]
                sizes, response = [(r.width, r.height)], row["box_text"]
            else:
                messages, images = chat.answer_messages(r.question, cfg.prompts), [None, window]
                sizes, response = [(r.width, r.height), (window[2] - window[0], window[3] - window[1])], row["answer"]
            ids, labels = chat.encode(tokenizer, image_processor, messages, sizes, response)
            samples.append(chat.Sample(ids, labels, r, images, GRPO_KINDS[kind]))
            advantages.append(a)
            kinds.append(kind)
            rewards.append(row["box_reward"] if kind == 0 else row["answer_reward"])
    return samples, advantages, kinds, rewards

# --------------------------------------------------------------------------------------------
# The objective and the stage for visrl.train.

class GRPOObjective(nn.Module):
    """One GRPO micro-batch as a module: features once, policy and reference token log-probs, the loss."""

    def __init__(self, net, cfg: GRPOConfig):
        super().__init__()
        self.net, self.cfg = net, cfg

    def forward(self, batch: dict, kind_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = dpo.encode_images(self.net, batch)
        logps = dpo.token_logps(self.net, batch, features)  # [N]
        with torch.no_grad(), model.adapters_disabled(self.net):
            ref_logps = dpo.token_logps(self.net, batch, features)
        row = batch["response_row"]  # [N] the row of each response token
        per_token, kl, clipped = grpo_loss(logps, logps.detach(), ref_logps, batch["advantage"][row],
                                           self.cfg.beta, self.cfg.clip_eps)
        rows = batch["input_ids"].shape[0]
        lengths = torch.bincount(row, minlength=rows).clamp(min=1).float()  # [R]
        row_loss = torch.zeros(rows, dtype=per_token.dtype, device=per_token.device).index_add_(0, row, per_token)
        row_loss = row_loss / lengths  # [R] each sequence's token mean
        kind = batch["kind"]  # [R]
        lambdas = torch.tensor(self.cfg.lambdas, device=row_loss.device)
        loss = (lambdas[kind] / kind_counts.clamp(min=1)[kind] * row_loss).sum()
        row_kl = torch.zeros_like(row_loss).index_add_(0, row, kl.detach()) / lengths
        row_clipped = torch.zeros_like(row_loss).index_add_(0, row, clipped.float()) / lengths
        values = torch.stack([row_loss.detach(), batch["reward"], row_kl, row_clipped], dim=1)  # [R, 4]
        one_hot = nn.functional.one_hot(kind, num_classes=2).to(values.dtype)  # [R, 2]
        return loss, one_hot.T @ values  # [2, 4] per-kind sums

    def item_counts(self, records: list) -> torch.Tensor:
        return torch.tensor([1.0, 1.0]) * len(records) * self.cfg.group_size

    def step_counts(self, micro: list[dict]) -> torch.Tensor:
        """This rank's rows of each kind in the optimizer step [2] (the loop sums them over ranks)."""
        return sum(torch.bincount(b["kind"], minlength=2) for b in micro).float()

    def log_fields(self, stats: torch.Tensor, kind_counts: torch.Tensor, loss: float) -> dict:
        means = (stats / kind_counts.clamp(min=1)[:, None]).tolist()
        return {f"{kind}/{name}": means[k][j] for k, kind in enumerate(GRPO_KINDS) for j, name in enumerate(GRPO_STATS)}

def build(cfg: GRPOConfig, net, processor, lora: model.LoRAConfig, world: model.Dist) -> model.Stage:
    """GRPO's stage for visrl.train: the questions and a collate that makes each micro-batch's rollouts."""
    if world.world_size > 1:
        raise data.UserError("grpo runs in one process for now (its rollouts are not sharded yet); use python, "
                             "not torchrun")
    if not cfg.adapter and world.is_main:
        print("warning: grpo without --init-adapter: the rollouts come from the base model", file=sys.stderr)
    records = [r for r in data.read_records(synth.resolve_data(cfg.data, "train", cfg.seed),
                                            image_root=cfg.image_root, skip_bad=cfg.skip_bad_records, limit=cfg.limit)
               if r.answers]
    if not records:
        raise data.UserError(f"grpo: no question with an answer in {cfg.data}")
    packed = dpo.packable(net)
    if not packed and world.is_main:
        print("grpo: packing is not exact on this model (dpo.packable): each rollout runs as its own rows",
              file=sys.stderr)

    def collate(chosen: list[data.Record]) -> dict:
        # seeded by the questions (and --seed): the same micro-step after --resume redraws the same rollouts from
        # the same restored policy; a later epoch's same questions meet another policy, hence other rollouts
        seed = random.Random(f"{cfg.seed}:" + "|".join(f"{r.id}:{r.question}" for r in chosen)).randrange(2 ** 31)
        rows = rollouts(net, processor, cfg, chosen, seed)
        samples, advantages, kinds, rewards = rollout_samples(rows, processor, cfg)
        batch = chat.collate(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                             net.config.image_token_id)
        if packed:  # each question's G box rows as one row, its G answer rows as another: the prefix once
            n = len(samples) // cfg.group_size  # groups: box rows first, then answer rows, G each
            groups = [list(range(q * cfg.group_size, (q + 1) * cfg.group_size)) for q in range(n)]
            batch.update(dpo.pack_groups(groups, samples, batch, processor.tokenizer.pad_token_id,
                                         net.config.image_token_id))
        batch.update(advantage=torch.tensor(advantages), kind=torch.tensor(kinds), reward=torch.tensor(rewards))
        return batch

    return model.Stage("grpo", records, [], collate, GRPOObjective(net, cfg),
                       f"{len(records)} questions x {cfg.group_size} rollouts",
                       f"reference = {cfg.adapter or cfg.model} (adapters off, per step)")
