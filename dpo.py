"""Preference optimisation: the losses, fused log-prob gathering, and the DPO forward pass.

The path of a DPO step: pair samples (data.dpo_samples) -> one batch of chosen rows then rejected
rows, every distinct image processed once (collate_pairs) -> vision features once (encode_images)
-> policy hidden states -> hidden states at response positions only -> fused chunked
logsumexp + gather (linear_logprobs) -> per-sequence log-probs -> the same with adapters off for
the reference (or precomputed) -> preference_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

import data

# --------------------------------------------------------------------------------------------
# Losses. h = (logp_w - ref_w) - (logp_l - ref_l): the policy's log-ratio margin of the chosen (w)
# over the rejected (l) response, log-probs summed over response tokens.


def sigmoid_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): L = -log sigmoid(beta * h)."""
    return -F.logsigmoid(beta * h)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): L = (h - 1 / (2 beta))^2, with h over summed log-probs."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF hinge (Zhao et al. 2023): L = max(0, 1 - beta * h)."""
    return torch.relu(1 - beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), labels flipped with prob. e:
    L = ((1 - e) * -log sigmoid(beta h) + e * log sigmoid(-beta h)) / (1 - 2e)."""
    e = label_smoothing
    return ((1 - e) * -F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards beta * (logp - ref) of chosen and rejected [B]."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if kind == "sigmoid":
        losses = sigmoid_loss(h, beta)
    elif kind == "ipo":
        losses = ipo_loss(h, beta)
    elif kind == "hinge":
        losses = hinge_loss(h, beta)
    elif kind == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise data.UserError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = robust_loss(h, beta, label_smoothing)
    else:
        raise ValueError(f"unknown loss {kind!r}: expected sigmoid, ipo, hinge or robust")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# --------------------------------------------------------------------------------------------
# Fused log-probs: log softmax(h W^T)[target] for N response positions, in chunks of rows, never
# holding [N, V] logits for backward (each chunk's logits are recomputed there).


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


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[targets] per row, [N]; memory O(chunk_size x V), not O(N x V)."""
    return _LinearLogProbs.apply(hidden, weight, targets, chunk_size)


# --------------------------------------------------------------------------------------------
# Batching pairs: rows = chosen sequences then rejected sequences; each distinct image (the full
# image, a crop window of it) is processed once and referenced by every row that shows it.


def collate_pairs(samples: list[data.PairSample], image_processor, pad_id: int, image_token_id: int) -> dict:
    """One DPO batch of B pair samples: 2B rows, unique images, response positions precomputed."""
    rows = [(s.chosen_ids, s.chosen_labels, s.chosen_images, s) for s in samples] + \
           [(s.rejected_ids, s.rejected_labels, s.rejected_images, s) for s in samples]
    length = max(len(ids) for ids, *_ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    unique: dict[tuple, int] = {}  # (image path, crop window or None) -> index into the unique images
    images, image_index, response_index, response_row, response_targets = [], [], [], [], []
    for r, (ids, labels, windows, sample) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.as_tensor(ids)
        attention_mask[r, :len(ids)] = 1
        for window in windows:
            key = (sample.pair.record.image, window)
            if key not in unique:
                unique[key] = len(unique)
                images.append((sample.pair.record, window))
            image_index.append(unique[key])
        for t in range(1, len(ids)):  # hidden state at t - 1 predicts token t
            if labels[t] != data.IGNORE_INDEX:
                response_index.append(r * length + t - 1)
                response_row.append(r)
                response_targets.append(labels[t])
    loaded = {}
    pil_images = []
    for record, window in images:  # decode each file once, crop as needed
        if record.image not in loaded:
            loaded[record.image] = data.load_image(record)
        full = loaded[record.image]
        pil_images.append(full if window is None else full.crop(window))
    pixels = image_processor(images=pil_images, return_tensors="pt")
    grid = pixels["image_grid_thw"]  # [U, 3]
    return {
        "input_ids": input_ids,  # [2B, L]
        "attention_mask": attention_mask,  # [2B, L]
        "mm_token_type_ids": (input_ids == image_token_id).int(),  # [2B, L], drives mrope positions
        "pixel_values": pixels["pixel_values"],  # [patches of the U unique images, C*T*P*P]
        "image_grid_thw": grid,  # [U, 3]
        "image_index": image_index,  # host list: unique image of each row image, in token order
        "row_grid_thw": grid[torch.as_tensor(image_index, dtype=torch.long)],  # [row images, 3]
        "response_index": torch.as_tensor(response_index, dtype=torch.long),  # [N] into [2B * L]
        "response_row": torch.as_tensor(response_row, dtype=torch.long),  # [N]
        "response_targets": torch.as_tensor(response_targets, dtype=torch.long),  # [N]
        "kind": torch.as_tensor([s.kind == "answer" for s in samples], dtype=torch.long),  # [B] 0 box, 1 answer
        "sample_index": torch.as_tensor([s.index for s in samples], dtype=torch.long),  # [B]
    }


def encode_images(net, batch: dict) -> list[torch.Tensor]:
    """Vision features of each unique image, [tokens_i, H] each; the tower is frozen, so no grad."""
    with torch.no_grad():
        features = net.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    return list(features)


def sequence_logps(net, batch: dict, features: list[torch.Tensor], chunk_size: int = 1024) -> torch.Tensor:
    """Summed response log-probs of every row, [2B], reusing precomputed image features."""
    row_features = [features[i] for i in batch["image_index"]]  # the same tensors, referenced again
    hidden = net.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["row_grid_thw"],
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=row_features)},
    ).last_hidden_state  # [2B, L, H]
    response_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["response_index"])  # [N, H]
    token_logps = linear_logprobs(response_hidden, net.lm_head.weight, batch["response_targets"], chunk_size)
    rows = batch["input_ids"].shape[0]
    return torch.zeros(rows, dtype=token_logps.dtype, device=token_logps.device).index_add_(
        0, batch["response_row"], token_logps)


def response_lengths(batch: dict) -> torch.Tensor:
    """Response tokens per row, [2B] (for the length-normalised NLL term)."""
    rows = batch["input_ids"].shape[0]
    return torch.bincount(batch["response_row"], minlength=rows)
