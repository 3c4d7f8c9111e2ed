"""Preference optimisation: everything that scores a VisRL pair, top to bottom.

One DPO step, file by file:
  data.read_pairs / chat.dpo_samples      pair record -> 1 (stage 1) or 2 (stage 2: box, answer) samples
  dpo.build_dpo_samples                   every pair's samples checked once, before training
  dpo.precompute_reference                the reference's log-probs, once before training (cached in --out)
  dpo.collate_pairs -> chat.collate       chosen rows then rejected rows; each distinct image processed once;
                      -> pack_pairs       each pair as one row: shared prefix | chosen | rejected
  dpo.DPOObjective.forward                (the FSDP2 root)
    encode_images                         vision features once per image, shared by policy and reference
    sequence_logps -> token_logps         the packed rows (packed_hidden) -> hidden states at response positions only
                                          -> fused chunked logsumexp + gather (linear_logprobs) -> summed log-probs [2B]
    reference_logps                       the precomputed table, or the same pass with adapters off
    step_loss -> preference_loss          one loss call for every pair; stage 2 weighs the box and
                                          answer means by --lambdas (box, answer); + the NLL anchor
  dpo.build                               visrl.train's stage: samples, reference, held-out pairs, objective
  visrl.train                             backward, optimizer step, metrics, checkpoint
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

import chat
import data
import model
import runs

# --------------------------------------------------------------------------------------------
# Losses. h = (logp_w - ref_w) - (logp_l - ref_l): the policy's log-ratio margin of the chosen (w) over the rejected
# (l) response, log-probs summed over response tokens.

def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float | torch.Tensor, kind: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards beta * (logp - ref) of chosen and rejected [B]; beta is
    one number or one per pair [B]. The log-probs come summed over each response (IPO's: averaged, see step_loss)."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if kind == "sigmoid":  # DPO (Rafailov et al. 2023, eq. 7), with cDPO's label smoothing e (TRL's, upstream's):
        # L = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h); e = 0: DPO
        e = label_smoothing
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif kind == "ipo":  # IPO (Azar et al. 2023, eq. 17): L = (h - 1 / (2 beta))^2
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":  # SLiC-HF hinge (Zhao et al. 2023): L = max(0, 1 - beta * h)
        losses = torch.relu(1 - beta * h)
    elif kind == "robust":  # Robust DPO (Chowdhury et al. 2024), labels flipped with prob. e = label_smoothing:
        # L = ((1 - e) * -log sigmoid(beta h) + e * log sigmoid(-beta h)) / (1 - 2e)
        if not 0 <= label_smoothing < 0.5:
            raise data.UserError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        e = label_smoothing
        losses = ((1 - e) * -F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown loss {kind!r}: expected sigmoid, ipo, hinge or robust")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()

# --------------------------------------------------------------------------------------------
# Fused log-probs: log softmax(h W^T)[target] for N response positions, in chunks of rows, never holding [N, V] logits
# for backward (each chunk's logits are recomputed there).

class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        # hidden [N, H], weight [V, H], targets [N] -> logps [N] (fp32)
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end] @ weight.T).float()  # [c, V], freed after this chunk
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, targets[start:end, None])[:, 0] - lse[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            g = grad_logps[start:end, None].float()  # [c, 1]
            logits = (hidden[start:end] @ weight.T).float()  # [c, V], recomputed
            # d logp / d logits = onehot(target) - softmax(logits)
            grad_logits = torch.exp(logits - lse[start:end, None]).mul_(-g)
            grad_logits.scatter_add_(1, targets[start:end, None], g)
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ hidden[start:end].float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None

LOGP_CHUNK = 1024  # response tokens per chunk: [1024, vocab] fp32 logits at a time (0.6 GB for Qwen's 152k vocab)

def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int = LOGP_CHUNK) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[targets] per row, [N]; memory O(chunk_size x V), not O(N x V)."""
    return _LinearLogProbs.apply(hidden, weight, targets, chunk_size)

# --------------------------------------------------------------------------------------------
# Batching pairs (chat.collate): chosen rows then rejected rows, each distinct image processed once.

def collate_pairs(samples: list[chat.PairSample], image_processor, pad_id: int, image_token_id: int,
                  shared_prefix: bool = True) -> dict:
    """One DPO batch of B pair samples: 2B rows (chat.collate), each sample's kind and index; with shared_prefix
    also each pair packed into one row `prefix | chosen suffix | rejected suffix` (pack_pairs)."""
    batch = chat.collate([s.chosen for s in samples] + [s.rejected for s in samples], image_processor, pad_id,
                         image_token_id)
    batch["kind"] = torch.as_tensor([s.kind == "answer" for s in samples], dtype=torch.long)  # [B] 0 box, 1 answer
    batch["sample_index"] = torch.as_tensor([s.index for s in samples], dtype=torch.long)  # [B]
    if shared_prefix:
        batch.update(pack_pairs(samples, batch, pad_id, image_token_id))
    return batch

def shared_prefix_length(chosen: chat.Sample, rejected: chat.Sample, image_token_id: int) -> int:
    """Tokens before the first place chosen and rejected differ; never inside an image, and never past an image
    whose pixels or size differ (two crops of one size have equal tokens)."""
    a, b = chosen.input_ids, rejected.input_ids
    shared = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    spans_a, spans_b = _image_spans(a, image_token_id), _image_spans(b, image_token_id)
    for k, (begin, end) in enumerate(spans_a):
        same = k < len(spans_b) and spans_b[k] == (begin, end) and chosen.images[k] == rejected.images[k]
        if begin < shared and (not same or shared < end):
            return begin
    return shared

def _image_spans(ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each image's run of <|image_pad|> tokens, in order."""
    spans, start = [], None
    for t, token in enumerate(ids + [None]):
        if token == image_token_id and start is None:
            start = t
        elif token != image_token_id and start is not None:
            spans, start = spans + [(start, t)], None
    return spans

def pack_pairs(samples: list[chat.PairSample], batch: dict, pad_id: int, image_token_id: int) -> dict:
    """Pack each pair into one row: shared prefix, chosen suffix, rejected suffix (pack_groups with the pair's two
    rows: the chosen rows are the batch's first B, the rejected its last B)."""
    n = len(samples)
    return pack_groups([[i, n + i] for i in range(n)], [s.chosen for s in samples] + [s.rejected for s in samples],
                       batch, pad_id, image_token_id)

def pack_groups(groups: list[list[int]], rows: list[chat.Sample], batch: dict, pad_id: int,
                image_token_id: int) -> dict:
    """Pack each group of the batch's rows (a DPO pair; GRPO's G rollouts of a question) into one row: the prefix the
    group shares, then each row's own suffix. A suffix attends to the prefix and itself, never to another suffix
    (packed_segment builds that mask), and every token keeps its unpacked row's position (packed_source picks them),
    so each response's log-probs equal the unpacked computation while the prefix (image, question: ~95% of a pair's
    tokens) runs through the decoder once, not once per row."""
    n, length = len(groups), batch["input_ids"].shape[1]
    unpacked_images, cursor = [], 0  # unique-image indices of each unpacked row's images, token order
    for row in rows:
        unpacked_images.append(batch["image_index"][cursor:cursor + len(row.images)])
        cursor += len(row.images)
    shared = [min((shared_prefix_length(rows[g[0]], rows[r], image_token_id) for r in g[1:]),
                  default=len(rows[g[0]].input_ids)) for g in groups]
    packed_length = max(sum(len(rows[r].input_ids) - p for r in g) + p for g, p in zip(groups, shared))
    source = torch.zeros((n, packed_length), dtype=torch.long)  # flat index into the unpacked [R * L]
    segment = torch.full((n, packed_length), -1, dtype=torch.long)  # 0 prefix, k + 1 the group's k-th row, -1 pad
    packed_ids = torch.full((n, packed_length), pad_id, dtype=torch.long)
    image_index, where = [], {}  # where: unpacked row -> (packed row, where its suffix starts there)
    for i, (g, p) in enumerate(zip(groups, shared)):
        first = rows[g[0]]
        packed_ids[i, :p], source[i, :p], segment[i, :p] = torch.as_tensor(first.input_ids[:p]), \
            g[0] * length + torch.arange(p), 0
        image_index += unpacked_images[g[0]][:sum(begin < p for begin, _ in _image_spans(first.input_ids,
                                                                                          image_token_id))]
        start = p
        for k, r in enumerate(g):
            ids = rows[r].input_ids
            end = start + len(ids) - p
            packed_ids[i, start:end] = torch.as_tensor(ids[p:])
            source[i, start:end] = r * length + torch.arange(p, len(ids))
            segment[i, start:end] = k + 1
            image_index += unpacked_images[r][sum(begin < p for begin, _ in _image_spans(ids, image_token_id)):]
            where[r] = (i, start)
            start = end
    # each response token's predicting hidden state, moved from its unpacked row to the packed one
    response_index = []
    for row, position in zip(batch["response_row"].tolist(), (batch["response_index"] % length).tolist()):
        i, start = where[row]
        p = shared[i]
        response_index.append(i * packed_length + (position if position < p else start + position - p))
    grid = batch["image_grid_thw"]
    return {
        "packed_ids": packed_ids,  # [G, Lp]
        "packed_source": source,  # [G, Lp] into the unpacked [R * L]: ids and positions come from there
        "packed_segment": segment,  # [G, Lp]
        "packed_image_index": image_index,  # host list: unique image of each packed image, token order
        "packed_grid_thw": grid[torch.as_tensor(image_index, dtype=torch.long)],  # [packed images, 3]
        "packed_response_index": torch.as_tensor(response_index, dtype=torch.long),  # [N] into [G * Lp]
    }

def encode_images(net, batch: dict) -> list:
    """Vision features of each unique image, [tokens_i, H] each; Qwen3-VL's are (those, its DeepStack features: one
    [tokens_i, H] per listed vision block, added to the same-numbered decoder layers). The tower is frozen: no grad."""
    with torch.no_grad():
        out = net.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    deepstack = getattr(out, "deepstack_features", None)
    if not deepstack:
        return list(out.pooler_output)
    return [(pooled, tuple(layer[i] for layer in deepstack)) for i, pooled in enumerate(out.pooler_output)]

def image_outputs(features: list, index) -> dict:
    """The forward's mm_encoder_outputs: features[i] for i in index, the images in token order."""
    picked = [features[i] for i in index]
    if not picked or not isinstance(picked[0], tuple):
        return {"image": BaseModelOutputWithPooling(pooler_output=picked)}
    return {"image": BaseModelOutputWithDeepstackFeatures(  # per DeepStack block: its features of each image
        pooler_output=[pooled for pooled, _ in picked],
        deepstack_features=[[stack[k] for _, stack in picked] for k in range(len(picked[0][1]))])}

def recurrent_layers(net) -> bool:
    """True for a model whose decoder has linear-attention (recurrent-state) layers: Qwen3.5's gated delta nets."""
    return "linear_attention" in (getattr(net.config.get_text_config(), "layer_types", None) or ())

def packable(net) -> bool:
    """Whether packing is exact: the attention implementation takes the packed rows' custom 4D mask (sdpa, eager) and
    no layer carries a recurrent state, through which a later suffix would read an earlier one."""
    return net.config._attn_implementation in ("sdpa", "eager") and not recurrent_layers(net)

def sharing_prefix(cfg: "DPOConfig", net) -> bool:
    """--reuse where packing is exact (build says once when it is not)."""
    return cfg.reuse and packable(net)

def packed_hidden(net, batch: dict, features: list[torch.Tensor]) -> torch.Tensor:
    """Last hidden states of the packed rows [B, Lp, H]: each token at its unpacked row's (M-RoPE) position,
    each suffix masked from the others (a pair's rejected from its chosen)."""
    positions, _ = net.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                            image_grid_thw=batch["row_grid_thw"],
                                            attention_mask=batch["attention_mask"])  # [3, 2B, L]
    positions = positions.reshape(3, -1)[:, batch["packed_source"]]  # [3, B, Lp]
    segment = batch["packed_segment"]  # [B, Lp]
    order = torch.arange(segment.shape[1], device=segment.device)
    allowed = ((order[None, :, None] >= order[None, None, :])  # causal, and a key in the prefix or the query's row
               & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
               & (segment >= 0)[:, None, :])  # [B, Lp query, Lp key]
    allowed |= torch.eye(segment.shape[1], dtype=torch.bool, device=segment.device)  # padding sees itself
    ids = batch["packed_ids"]
    if net.config._attn_implementation == "sdpa":
        mask = allowed[:, None]  # [B, 1, Lp, Lp], True = attend
    else:  # eager adds the mask to the scores
        dtype = net.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return net.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, image_grid_thw=batch["packed_grid_thw"],
        mm_token_type_ids=(ids == net.config.image_token_id).int(),
        mm_encoder_outputs=image_outputs(features, batch["packed_image_index"]),
    ).last_hidden_state

def token_logps(net, batch: dict, features: list[torch.Tensor], chunk_size: int = LOGP_CHUNK) -> torch.Tensor:
    """Log-probs of every response token [N] (batch["response_targets"]), reusing precomputed image features: hidden
    states at response positions only (of the packed rows if the batch has them) -> fused chunked logsumexp + gather."""
    if "packed_ids" in batch:
        hidden, index = packed_hidden(net, batch, features), batch["packed_response_index"]  # [B, Lp, H]
    else:
        hidden = net.model(  # each row's images: the same feature tensors, referenced again
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["row_grid_thw"],
            mm_encoder_outputs=image_outputs(features, batch["image_index"]),
        ).last_hidden_state  # [R, L, H]
        index = batch["response_index"]
    response_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # [N, H]
    return linear_logprobs(response_hidden, net.lm_head.weight, batch["response_targets"], chunk_size)

def sequence_logps(net, batch: dict, features: list[torch.Tensor], chunk_size: int = LOGP_CHUNK) -> torch.Tensor:
    """Summed response log-probs of every row, [R] (R = 2B in a DPO batch: chosen rows, then rejected)."""
    logps = token_logps(net, batch, features, chunk_size)
    rows = batch["input_ids"].shape[0]
    return torch.zeros(rows, dtype=logps.dtype, device=logps.device).index_add_(0, batch["response_row"], logps)

def response_lengths(batch: dict) -> torch.Tensor:
    """Response tokens per row, end token included, [2B] (IPO's averages, the length-normalised NLL term)."""
    return torch.bincount(batch["response_row"], minlength=batch["input_ids"].shape[0])

# --------------------------------------------------------------------------------------------
# The objective of a DPO run: its settings, its samples, the reference, the step loss, the module.

DPO_KINDS = ("box", "answer")  # stage-2 step types; index = PairSample kind code in collate_pairs
DPO_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "nll/chosen")

@dataclass
class DPOConfig(model.TrainConfig):
    """DPO stage 1 (focus: box pairs) or stage 2 (step-level: box pairs + answer pairs on the crop)."""

    data: str = field(kw_only=True)  # pair records (.jsonl written by generate.py; format in docs/guide.md)
    # The previous phase's adapter (SFT for stage 1, stage 1 for stage 2): merged into the base at
    # load, so the reference (adapters off) is exactly the model at the start of this stage.
    adapter: Annotated[str | None, tyro.conf.arg(aliases=("--init-adapter",)),
                       runs.default("none: the base model")] = None
    out: Annotated[str | None, runs.default("runs/dpo1 or runs/dpo2, by --stage")] = None  # the run's directory
    stage: Literal[1, 2] = 1  # 1: the box pairs; 2: the box and the answer pairs, weighted by the lambdas
    epochs: float = 5.0  # passes over the pairs (upstream: 5)
    lr: float = 5e-6  # peak learning rate of AdamW (upstream: 5e-6)
    batch_size: int = 3  # pairs per process per micro-step, upstream's (a stage-2 pair: a box and an answer sample)
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"  # the preference loss (upstream: sigmoid, DPO's)
    beta: float = 0.1  # how far the policy may move from the reference (upstream: 0.1)
    # sigmoid: cDPO's label smoothing, the share of pairs taken as flipped (upstream's dpo_label_smoothing); robust:
    # the assumed rate of flipped labels it corrects for (upstream: 0)
    label_smoothing: float = 0.0
    nll_weight: float = 0.0  # adds nll_weight x the chosen responses' length-normalised NLL (upstream: 0)
    # stage 1: each pair's chosen answer on its chosen crop joins the batch with the NLL term alone (no preference
    # term), so the box-step update leaves the answer step where the previous phase put it (not upstream's;
    # needs --nll-weight > 0)
    answer_anchor: bool = False
    # stage 2: the box and the answer pairs' weights in L = lambda_box * L_box + lambda_answer * L_answer (upstream:
    # both 0.5; `--lambdas 0 0.5` drops the box term)
    lambdas: tuple[float, float] = (0.5, 0.5)
    rejected_crop: Literal["chosen", "own"] = "chosen"  # stage 2: the crop the rejected answer sees (upstream: chosen)
    # reuse what is exact to reuse: each pair's shared prefix (image, question) through the decoder once, both
    # responses attending to it, and the reference's log-probs in one pass before training, kept in
    # <out>/reference_logps.safetensors for --resume. --no-reuse: two full rows per pair and a reference pass
    # per step, the plain computation they equal (to check them)
    reuse: bool = True

    def __post_init__(self):
        if self.out is None:  # stages 1 and 2 never share a default --out: stage 2 reads stage 1's adapter
            self.out = f"runs/dpo{self.stage}"

    def check(self) -> None:
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):  # upstream refuses it the same way
            raise data.UserError(f"dpo --label-smoothing: for --loss sigmoid (cDPO) or robust, not {self.loss}")
        if self.answer_anchor and (self.stage != 1 or self.nll_weight <= 0):
            raise data.UserError("dpo --answer-anchor: for --stage 1 with --nll-weight > 0 (it trains the chosen "
                                 f"answers' NLL alone), got --stage {self.stage} --nll-weight {self.nll_weight}")

def build_dpo_samples(cfg: DPOConfig, pairs: list[data.Pair], processor,
                      world: model.Dist) -> list[list[chat.PairSample]]:
    """Each pair's samples (1 in stage 1, 2 in stage 2 or with --answer-anchor), checked (bad pairs reported)."""
    cfg = runs.resolve_convention(cfg)
    sample_stage = 2 if cfg.answer_anchor else cfg.stage  # the anchor: stage 2's answer samples, preference weight 0
    grouped, errors, too_long, same = [], [], 0, 0
    for pair in pairs:
        if pair.box_form != cfg.box_form and not cfg.mix_conventions:
            errors.append(f"{pair.record.source}: field 'box_form': {pair.box_form}, but this chain writes boxes "
                          f"as {cfg.box_form} (--box-form; --mix-conventions to train on it anyway)")
            continue
        try:
            samples = chat.dpo_samples(pair, processor.tokenizer, processor.image_processor, sample_stage,
                                       cfg.crop, cfg.rejected_crop, cfg.prompts)
        except data.DataError as e:
            errors.append(str(e))
            continue
        same += any(s.chosen.input_ids == s.rejected.input_ids and s.chosen.images == s.rejected.images
                    for s in samples)
        if max(max(len(s.chosen.input_ids), len(s.rejected.input_ids)) for s in samples) > cfg.max_len:
            too_long += 1
            continue
        grouped.append(samples)
    data.report_bad(errors, cfg.skip_bad_records, cfg.data, len(grouped))
    if too_long and world.is_main:
        print(f"warning: dpo dropped {too_long} pairs longer than {cfg.max_len} tokens", file=sys.stderr)
    if same and world.is_main:  # upstream keeps them too (its trainer has no such filter)
        print(f"dpo: {same} pairs have a step (box or answer) whose chosen and rejected are the same: kept as upstream "
              "keeps them, at loss ln 2 with zero gradient, counted in their step's mean", file=sys.stderr)
    if not grouped:
        raise data.UserError("dpo: no usable pairs")
    for index, sample in enumerate(s for samples in grouped for s in samples):
        sample.index = index
    return grouped

def reference_logps(net, batch: dict, features, cfg: DPOConfig, ref_table: torch.Tensor | None) -> torch.Tensor:
    """Reference log-probs of every row, [2B]: from the precomputed table, or the same weights with
    adapters off (the model at the start of the stage) under no_grad, on the same image features."""
    if ref_table is not None:
        rows = ref_table[batch["sample_index"]]  # [B, 2] (chosen, rejected)
        return torch.cat([rows[:, 0], rows[:, 1]])
    with torch.no_grad(), model.adapters_disabled(net):
        return sequence_logps(net, batch, features)

def precompute_reference(net, grouped, processor, cfg: DPOConfig, world: model.Dist) -> torch.Tensor:
    """[n_samples, 2] reference log-probs (chosen, rejected) in one pass, split over ranks, summed."""
    table = torch.zeros(sum(len(g) for g in grouped), 2, dtype=torch.float32, device=world.device)
    mine = list(range(world.rank, len(grouped), world.world_size))
    was_training = net.training
    net.eval()  # no dropout in the reference
    for start in tqdm(range(0, len(mine), cfg.batch_size), desc="reference", disable=not world.is_main):
        samples = [s for i in mine[start:start + cfg.batch_size] for s in grouped[i]]
        batch = model.to_device(collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                                                 net.config.image_token_id, sharing_prefix(cfg, net)), world.device)
        with model.autocast_for(world.device):
            logps = reference_logps(net, batch, encode_images(net, batch), cfg, None)
        n = len(samples)
        table[batch["sample_index"]] = torch.stack([logps[:n], logps[n:]], dim=1).float()
    net.train(was_training)
    return model.all_reduce_sum(table, world)

REFERENCE_FILE = "reference_logps.safetensors"  # the precomputed table, beside the run it belongs to

def reference_key(grouped, lora: model.LoRAConfig, dtype: str) -> str:
    """A reference table's key: the hash of each sample's tokens and images, the base and parent adapter's content, the
    dtype, the convention (its pixel cap changes pixels, not tokens); --resume reuses only a table of an equal key."""
    digest = hashlib.sha256(json.dumps([lora.base_sha256, lora.parent_sha256, dtype, lora.convention],
                                       sort_keys=True).encode())
    for sample in (s for g in grouped for s in g):
        for side in (sample.chosen, sample.rejected):
            digest.update(json.dumps([side.input_ids, side.labels, side.images, side.record.image]).encode())
    return digest.hexdigest()

def load_reference(out: Path, key: str, device) -> torch.Tensor | None:
    """The run's cached reference table, if its key matches; else None (it is then computed again)."""
    try:
        with safe_open(str(Path(out) / REFERENCE_FILE), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return f.get_tensor("logps").to(device)
    except (OSError, ValueError, RuntimeError, SafetensorError):  # absent or unreadable: compute it again
        pass
    return None

def save_reference(out: Path, table: torch.Tensor, key: str) -> None:
    """Write the table atomically (a kill mid-write leaves no half file to be trusted)."""
    path = Path(out) / REFERENCE_FILE
    save_file({"logps": table.detach().cpu().contiguous()}, str(path) + ".tmp", metadata={"key": key})
    os.replace(str(path) + ".tmp", path)

def step_loss(cfg: DPOConfig, policy: torch.Tensor, reference: torch.Tensor, batch: dict,
              kind_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step objective, and its per-kind sums of DPO_STATS [2, 8]. Stage 1: the mean pair
    loss. Stage 2: lambda_box * mean box loss + lambda_answer * mean answer loss (--lambdas), means over the step
    (kind_counts: samples per kind, all micro-batches, ranks). Plus nll_weight x the chosen responses' mean NLL (with
    --answer-anchor, stage 1's answer rows add only this)."""
    kind = batch["kind"]  # [B] 0 box, 1 answer
    n = kind.shape[0]
    scored, scored_reference = policy, reference
    if cfg.loss == "ipo":  # upstream (LLaMA-Factory): IPO on log-probs averaged over each response's tokens
        lengths = response_lengths(batch).clamp(min=1)  # [2B]
        scored, scored_reference = policy / lengths, reference / lengths
    losses, chosen_rewards, rejected_rewards = preference_loss(
        scored[:n], scored[n:], scored_reference[:n], scored_reference[n:], beta=cfg.beta, kind=cfg.loss,
        label_smoothing=cfg.label_smoothing)
    # stage 1: box rows only; the anchor's answer rows have no preference term
    lambdas = torch.tensor(list(cfg.lambdas) if cfg.stage == 2 else [1.0, 0.0], device=policy.device)
    weights = lambdas[kind] / kind_counts.clamp(min=1)[kind]  # [B]
    loss = (weights * losses).sum()
    nll = -policy[:n] / response_lengths(batch)[:n].clamp(min=1)  # [B] length-normalised NLL of the chosen
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
        features = encode_images(self.net, batch)  # once per unique image: policy and reference share them
        policy = sequence_logps(self.net, batch, features)
        reference = reference_logps(self.net, batch, features, self.cfg, self.ref_table)
        return step_loss(self.cfg, policy, reference, batch, kind_counts)

    def item_counts(self, groups: list[list[chat.PairSample]]) -> torch.Tensor:
        """Samples of each kind in these pairs [2] (the held-out loss's normaliser, before collating them)."""
        return torch.bincount(torch.tensor([DPO_KINDS.index(s.kind) for g in groups for s in g] or [0]),
                              minlength=2).float() * (len(groups) > 0)

    def step_counts(self, micro: list[dict]) -> torch.Tensor:
        """This rank's pairs of each kind in the optimizer step [2] (the loop sums them over ranks)."""
        return sum(torch.bincount(b["kind"], minlength=2) for b in micro).float()

    def log_fields(self, stats: torch.Tensor, kind_counts: torch.Tensor, loss: float) -> dict:
        """The metrics row's DPO fields: per-kind means of DPO_STATS, and the loss's two terms apart."""
        means = (stats / kind_counts.clamp(min=1)[:, None]).tolist()  # the only host sync of the step
        row = {f"{kind}/{name}": means[k][j] for k, kind in enumerate(DPO_KINDS) if kind_counts[k] > 0
               for j, name in enumerate(DPO_STATS)}
        # the preference term, and nll_weight x the chosen's mean NLL
        row["nll_term"] = self.cfg.nll_weight * stats[:, -1].sum().item() / kind_counts.sum().clamp(min=1).item()
        row["dpo_term"] = loss - row["nll_term"]
        return row

def build(cfg: DPOConfig, net, processor, lora: model.LoRAConfig, world: model.Dist) -> model.Stage:
    """DPO's stage for visrl.train: the pairs' samples, the reference's log-probs (computed before the model is
    sharded, or read back on --resume), a tenth of the pairs held out, the objective."""
    if cfg.stage == 2 and not cfg.adapter and world.is_main:
        print("warning: dpo --stage 2 without --init-adapter: the policy and the reference start from the base "
              "model, not from the stage-1 model", file=sys.stderr)
    pairs = data.read_pairs(cfg.data, image_root=cfg.image_root, skip_bad=cfg.skip_bad_records, limit=cfg.limit)
    items = build_dpo_samples(cfg, pairs, processor, world)
    shared = sharing_prefix(cfg, net)
    if cfg.reuse and not shared and world.is_main:
        why = ("its linear-attention layers carry a state from the chosen response into the rejected one"
               if recurrent_layers(net) else f"attention {net.config._attn_implementation!r} takes no custom mask")
        print(f"dpo: {why}: each pair runs as two full rows (the reference is still precomputed)", file=sys.stderr)
    ref_table, ref_key, ref_new = None, reference_key(items, lora, cfg.dtype), False
    if cfg.reuse:  # a plain forward pass before training; a resumed run reads its own table back
        ref_table = load_reference(Path(cfg.out), ref_key, world.device) if cfg.resume else None
        if ref_new := ref_table is None:
            ref_table = precompute_reference(net, items, processor, cfg, world)
    val = runs.held_out(len(items), cfg.val_fraction, cfg.seed)  # after the reference pass, which keys every pair
    train = [g for i, g in enumerate(items) if i not in val]
    held = [g for i, g in enumerate(items) if i in val]
    reference = (f"reference = {cfg.adapter or cfg.model} (" + ("adapters off, per step" if not cfg.reuse else
                 "precomputed" if ref_new else f"read back from {REFERENCE_FILE}") + ")")
    return model.Stage(
        f"dpo stage {cfg.stage}", train, held,
        lambda groups: collate_pairs([s for g in groups for s in g], processor.image_processor,
                                     processor.tokenizer.pad_token_id, net.config.image_token_id, shared),
        DPOObjective(net, cfg, ref_table), f"{len(train)} pairs" + (f" (+ {len(held)} held out)" if held else ""),
        reference, on_start=(lambda: save_reference(Path(cfg.out), ref_table, ref_key)) if ref_new else None)
