"""Preference losses, fused log-probs, the DPO forward and the `dpo` command, on the tiny model."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat
import data
import dpo
import model
import visrl
from conftest import plain_token_logps

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# fused log-probs against the naive full-logits computation


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_fused_logprobs_match_full_log_softmax(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_(True)
    targets = torch.randint(0, 50, (11,), generator=g)
    upstream = torch.randn(11, generator=g)  # an arbitrary gradient flowing back

    naive = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None])[:, 0]
    naive_grads = torch.autograd.grad((naive * upstream).sum(), (hidden, weight))
    fused = dpo.linear_logprobs(hidden, weight, targets, chunk_size=chunk)
    fused_grads = torch.autograd.grad((fused * upstream).sum(), (hidden, weight))
    # fp32 throughout; differences are summation order only
    torch.testing.assert_close(fused, naive, rtol=0, atol=1e-5)
    for a, b in zip(fused_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fused_logprobs_skip_the_frozen_weight_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen lm_head
    out = dpo.linear_logprobs(hidden, weight, torch.tensor([1, 2, 3, 4]))
    out.sum().backward()
    assert hidden.grad is not None and weight.grad is None


# ---------------------------------------------------------------------------------------------
# losses against their formulas, computed independently with math on floats

H_VALUES = [-3.0, -0.4, 0.0, 0.7, 5.0]


def _sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("kind,beta,eps,formula", [
    ("sigmoid", 0.1, 0.0, lambda h, b, e: -math.log(_sig(b * h))),
    ("sigmoid", 2.0, 0.0, lambda h, b, e: -math.log(_sig(b * h))),
    # cDPO, as TRL 0.9.6 (upstream's pin) writes it, dpo_trainer.py l.1107-1111
    ("sigmoid", 0.5, 0.2, lambda h, b, e: -math.log(_sig(b * h)) * (1 - e) - math.log(_sig(-b * h)) * e),
    ("ipo", 0.1, 0.0, lambda h, b, e: (h - 1 / (2 * b)) ** 2),
    ("hinge", 0.5, 0.0, lambda h, b, e: max(0.0, 1 - b * h)),
    ("robust", 0.3, 0.1, lambda h, b, e: ((1 - e) * -math.log(_sig(b * h)) + e * math.log(_sig(-b * h))) / (1 - 2 * e)),
])
def test_each_loss_matches_its_formula(kind, beta, eps, formula):
    # split h over the four log-probs in an uneven way: only the combination may matter
    pc = torch.tensor([-10.0, -3.0, -7.0, -1.0, -20.0], dtype=torch.float64)
    rc = torch.tensor([-9.0, -2.0, -6.5, -4.0, -30.0], dtype=torch.float64)
    rr = torch.tensor([-5.0, -8.0, -2.0, -3.0, -1.0], dtype=torch.float64)
    h = torch.tensor(H_VALUES, dtype=torch.float64)
    pr = (pc - rc) - h + rr  # so that (pc - rc) - (pr - rr) == h
    losses, chosen_r, rejected_r = dpo.preference_loss(pc, pr, rc, rr, beta, kind, eps)
    expected = [formula(v, beta, eps) for v in H_VALUES]
    assert losses.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert chosen_r.tolist() == pytest.approx((beta * (pc - rc)).tolist())
    assert rejected_r.tolist() == pytest.approx((beta * (pr - rr)).tolist())


def test_unknown_loss_and_bad_smoothing_are_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown loss"):
        dpo.preference_loss(x, x, x, x, 0.1, "kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.preference_loss(x, x, x, x, 0.1, "robust", 0.5)


def test_stage2_objective_is_the_weighted_sum_of_its_parts():
    cfg = dpo.DPOConfig(data="x", stage=2, beta=0.3, lambdas=(0.25, 0.75))
    g = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(8, generator=g), torch.randn(8, generator=g)
    batch = {"kind": torch.tensor([0, 1, 0, 1]), "response_row": torch.arange(8),
             "input_ids": torch.zeros(8, 3)}
    counts = torch.tensor([2.0, 2.0])
    loss, stats = dpo.step_loss(cfg, policy, reference, batch, counts)
    n = 4
    h = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    box = [-math.log(_sig(0.3 * h[i].item())) for i in (0, 2)]
    answer = [-math.log(_sig(0.3 * h[i].item())) for i in (1, 3)]
    expected = 0.25 * sum(box) / 2 + 0.75 * sum(answer) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats[0, 0].item() == pytest.approx(sum(box), rel=1e-6)  # per-kind loss sums
    assert stats[1, 0].item() == pytest.approx(sum(answer), rel=1e-6)


def test_ipo_scores_log_probs_averaged_over_each_response():
    """Upstream (src/visrl/train/dpo/trainer.py l.195-197, src/visrl_stage2/... l.197-199): `if self.loss_type in
    ["ipo", "orpo", "simpo"]: all_logps = all_logps / valid_length`, for the policy and the reference (the same
    concatenated_forward), valid_length the response's label tokens; then TRL's IPO, (logits - 1 / (2 beta)) ** 2."""
    cfg = dpo.DPOConfig(data="x", stage=1, beta=0.1, loss="ipo")
    policy = torch.tensor([-6.0, -2.0, -9.0, -4.0])  # rows: chosen 0, 1; rejected 2, 3
    reference = torch.tensor([-5.0, -3.0, -7.0, -2.0])
    lengths = [3, 1, 2, 4]
    batch = {"kind": torch.tensor([0, 0]), "input_ids": torch.zeros(4, 3),
             "response_row": torch.tensor([r for r, n in enumerate(lengths) for _ in range(n)])}
    loss, _ = dpo.step_loss(cfg, policy, reference, batch, torch.tensor([2.0, 0.0]))
    avg = lambda x, r: x[r].item() / lengths[r]  # noqa: E731
    expected = [((avg(policy, c) - avg(policy, j)) - (avg(reference, c) - avg(reference, j)) - 1 / (2 * 0.1)) ** 2
                for c, j in ((0, 2), (1, 3))]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_label_smoothing_is_for_sigmoid_and_robust_only():
    # upstream (hparams/finetuning_args.py l.413-414) refuses dpo_label_smoothing for a loss other than sigmoid
    for loss in ("ipo", "hinge"):
        with pytest.raises(data.UserError, match="--label-smoothing"):
            dpo.DPOConfig(data="x", loss=loss, label_smoothing=0.1).check()
    dpo.DPOConfig(data="x", loss="sigmoid", label_smoothing=0.1).check()


def test_answer_anchor_adds_only_the_chosen_answers_nll_to_stage_1():
    """Stage 1 with --answer-anchor: the box rows' DPO loss (mean over box rows) + nll_weight x the mean
    length-normalised NLL of every chosen row; the answer rows' rejected log-probs get no gradient."""
    cfg = dpo.DPOConfig(data="x", stage=1, beta=0.1, nll_weight=2.0, answer_anchor=True)
    g = torch.Generator().manual_seed(1)
    policy, reference = torch.randn(8, generator=g).requires_grad_(), torch.randn(8, generator=g)
    # rows 0..3 chosen, 4..7 rejected; response tokens: chosen rows 3, 1, 2, 4; rejected rows one each
    batch = {"kind": torch.tensor([0, 1, 0, 1]), "response_row": torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5, 6, 7]),
             "input_ids": torch.zeros(8, 3)}
    loss, _ = dpo.step_loss(cfg, policy, reference, batch, torch.tensor([2.0, 2.0]))
    p, r = policy.detach(), reference
    box = [-math.log(_sig(0.1 * ((p[i] - r[i]) - (p[i + 4] - r[i + 4])).item())) for i in (0, 2)]
    nll = [-p[i].item() / length for i, length in enumerate((3, 1, 2, 4))]
    assert loss.item() == pytest.approx(sum(box) / 2 + 2.0 * sum(nll) / 4, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, policy)
    assert grad[5].item() == 0.0 and grad[7].item() == 0.0  # the answer rows' rejected: no preference term
    assert grad[4].item() != 0.0 and grad[6].item() != 0.0
    assert grad[1].item() == pytest.approx(-2.0 / 4 / 1) and grad[3].item() == pytest.approx(-2.0 / 4 / 4)


# ---------------------------------------------------------------------------------------------
# the DPO forward on the tiny model


@pytest.fixture(scope="module")
def tiny_lora(tiny_path):
    net, processor = model.load_model(str(tiny_path))
    model.add_lora(net, model.LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    for m in model.lora_modules(net).values():  # a policy that differs from the reference
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.02
    net.eval()
    return net, processor


def _grouped(processor, pairs_file, stage, rejected_crop="chosen", n=3):
    cfg = dpo.DPOConfig(data=str(pairs_file), stage=stage, rejected_crop=rejected_crop)
    return dpo.build_dpo_samples(cfg, data.read_pairs(pairs_file, limit=n), processor, model.Dist())


@pytest.mark.parametrize("stage,rejected_crop,shared", [(1, "chosen", True), (2, "chosen", True), (2, "own", True),
                                                        (2, "chosen", False)])
def test_sequence_logps_equal_the_model_s_own_logits(tiny_lora, pairs_file, stage, rejected_crop, shared):
    """Our path (shared features, each pair's prefix once in a packed row or two full rows, hidden states at
    response positions, fused kernel) against a plain HF forward with pixel values and full logits, row by row."""
    net, processor = tiny_lora
    samples = [s for g in _grouped(processor, pairs_file, stage=stage, rejected_crop=rejected_crop) for s in g]
    batch = dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                              net.config.image_token_id, shared_prefix=shared)
    assert ("packed_ids" in batch) == shared
    with torch.no_grad():
        ours = dpo.sequence_logps(net, batch, dpo.encode_images(net, batch), chunk_size=7)
    rows = [s.chosen for s in samples] + [s.rejected for s in samples]
    for r, row in enumerate(rows):
        with torch.no_grad():
            expected = plain_token_logps(net, processor, row).sum()
        torch.testing.assert_close(ours[r], expected, rtol=1e-5, atol=1e-4)


def test_packing_shares_the_prefix_and_keeps_the_gradients(tiny_lora, pairs_file):
    """Packed rows are about half as long as two full rows, and the LoRA gradients of a stage-2 DPO loss are
    those of the unpacked computation (policy and reference)."""
    net, processor = tiny_lora
    grouped = _grouped(processor, pairs_file, stage=2, n=3)
    samples = [s for g in grouped for s in g]
    cfg = dpo.DPOConfig(data="x", stage=2, nll_weight=0.5)
    counts = torch.bincount(torch.tensor([s.kind == "answer" for s in samples]).long(), minlength=2).float()
    params = model.trainable_parameters(net)
    results = {}
    for shared in (True, False):
        batch = dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                                  net.config.image_token_id, shared_prefix=shared)
        features = dpo.encode_images(net, batch)
        policy = dpo.sequence_logps(net, batch, features)
        reference = dpo.reference_logps(net, batch, features, cfg, None)
        loss, _ = dpo.step_loss(cfg, policy, reference, batch, counts)
        grads = torch.autograd.grad(loss, params)
        results[shared] = (policy.detach(), reference, grads, batch)
    packed, plain = results[True], results[False]
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed[1], plain[1], rtol=1e-5, atol=1e-4)
    for a, b in zip(packed[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 + 1e-4 * b.abs().max().item())
    packed_tokens = int((packed[3]["packed_segment"] >= 0).sum())
    unpacked_tokens = int(plain[3]["attention_mask"].sum())
    assert packed_tokens < 0.6 * unpacked_tokens, (packed_tokens, unpacked_tokens)


def test_packing_is_exact_on_qwen2_vl_too(tiny_qwen2_path, pairs_file):
    """Qwen2-VL computes its M-RoPE positions with its own get_rope_index: packed rows use it the same way."""
    net, processor = model.load_model(str(tiny_qwen2_path))
    model.add_lora(net, model.LoRAConfig(rank=4, alpha=8))
    for m in model.lora_modules(net).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    net.eval()
    samples = [s for g in _grouped(processor, pairs_file, stage=2, rejected_crop="own") for s in g]
    logps = []
    for shared in (True, False):
        batch = dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                                  net.config.image_token_id, shared_prefix=shared)
        with torch.no_grad():
            logps.append(dpo.sequence_logps(net, batch, dpo.encode_images(net, batch)))
    torch.testing.assert_close(logps[0], logps[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("which", ["tiny_qwen3_path", "tiny_qwen35_path"])
def test_log_probs_on_the_qwen3_families_equal_hf_s_full_logits_row_by_row(which, pairs_file, request):
    """Qwen3-VL (DeepStack features reused with the pooled ones, packed rows) and Qwen3.5 (linear-attention layers:
    two full rows per pair, never packed) against a plain HF forward with pixel values, row by row, stage 2 with each
    rejected answer on its own crop; and the LoRA gradients of the packed computation equal the unpacked ones."""
    net, processor = model.load_model(str(request.getfixturevalue(which)))
    model.add_lora(net, model.LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    for m in model.lora_modules(net).values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.02
    net.eval()
    cfg = dpo.DPOConfig(data=str(pairs_file), stage=2, rejected_crop="own")
    assert dpo.sharing_prefix(cfg, net) == (which == "tiny_qwen3_path")
    samples = [s for grp in dpo.build_dpo_samples(cfg, data.read_pairs(pairs_file, limit=2), processor, model.Dist())
               for s in grp]
    rows = [s.chosen for s in samples] + [s.rejected for s in samples]
    expected = torch.stack([plain_token_logps(net, processor, row).sum() for row in rows]).detach()
    grads = []
    for shared in (False, True) if dpo.sharing_prefix(cfg, net) else (False,):
        batch = dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                                  net.config.image_token_id, shared_prefix=shared)
        ours = dpo.sequence_logps(net, batch, dpo.encode_images(net, batch), chunk_size=7)
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-4)
        net.zero_grad()
        ours.sum().backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters(net)])
    for a, b in zip(*grads) if len(grads) == 2 else ():
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 + 1e-4 * b.abs().max().item())  # as the Qwen2.5 test


def test_the_shared_prefix_stops_at_the_first_difference_and_before_a_differing_image():
    record = data.Record("1", "a.png", "q", ["a"], [], 10, 10, "f:1")
    sample = lambda ids, images: chat.Sample(ids, ids, record, images, "answer")  # noqa: E731
    image = 9
    # text differs at 3
    assert dpo.shared_prefix_length(sample([1, 2, 3, 4], []), sample([1, 2, 3, 5], []), image) == 3
    # the same image (page), then text: the prefix runs past it
    assert dpo.shared_prefix_length(sample([1, 9, 9, 2, 3], [None]), sample([1, 9, 9, 2, 4], [None]), image) == 4
    # two crops of one size: equal tokens, other pixels -> the prefix ends where the crop starts
    a = sample([1, 9, 9, 2, 9, 9, 3, 5], [None, (0, 0, 5, 5)])
    b = sample([1, 9, 9, 2, 9, 9, 3, 6], [None, (5, 5, 10, 10)])
    assert dpo.shared_prefix_length(a, b, image) == 4
    # crops of other sizes: the token runs differ inside the image -> back to its start
    c = sample([1, 9, 9, 2, 9, 9, 9, 3], [None, (0, 0, 5, 5)])
    assert dpo.shared_prefix_length(a, c, image) == 4
    # nothing after the prefix differs in one row: the shorter row is all prefix
    assert dpo.shared_prefix_length(sample([1, 2], []), sample([1, 2, 3], []), image) == 2


@pytest.mark.parametrize("rejected_crop,images_per_pair", [("chosen", 2), ("own", 3)])
def test_vision_tower_runs_once_per_unique_image_per_step(tiny_lora, pairs_file, rejected_crop, images_per_pair):
    net, processor = tiny_lora
    grouped = _grouped(processor, pairs_file, stage=2, rejected_crop=rejected_crop, n=2)
    samples = [s for g in grouped for s in g]
    batch = dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                              net.config.image_token_id)
    calls, images = [], []

    def count(module, args, kwargs, out):
        calls.append(1)
        images.append(len(kwargs["grid_thw"]))

    hook = net.model.visual.register_forward_hook(count, with_kwargs=True)
    try:
        cfg = dpo.DPOConfig(data="x", stage=2)
        net.train()
        features = dpo.encode_images(net, batch)
        policy = dpo.sequence_logps(net, batch, features)
        reference = dpo.reference_logps(net, batch, features, cfg, None)
        loss, _ = dpo.step_loss(cfg, policy, reference, batch, torch.bincount(batch["kind"], minlength=2).float())
        loss.backward()
    finally:
        hook.remove()
        net.zero_grad(set_to_none=True)
        net.eval()
    # 2 pairs x (box chosen/rejected + answer chosen/rejected) x (policy + reference) = 16 row passes
    assert len(calls) == 1
    assert images == [2 * images_per_pair]


def test_precomputed_reference_equals_on_the_fly(tiny_lora, pairs_file):
    net, processor = tiny_lora
    grouped = _grouped(processor, pairs_file, stage=2, n=4)
    cfg = dpo.DPOConfig(data="x", stage=2, batch_size=3)  # batches that cut across pairs
    table = dpo.precompute_reference(net, grouped, processor, cfg, model.Dist())
    samples = [s for g in grouped for s in g]
    batch = dpo.collate_pairs(samples[::-1], processor.image_processor, processor.tokenizer.pad_token_id,
                              net.config.image_token_id)
    with torch.no_grad():
        live = dpo.reference_logps(net, batch, dpo.encode_images(net, batch), cfg, None)
    stored = dpo.reference_logps(net, batch, None, cfg, table)
    torch.testing.assert_close(stored, live, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the `dpo` command


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_first_step_loss_is_ln2_and_stage2_loss_is_the_weighted_sum(pairs_file, tmp_path):
    # the reference per step (the same pass as the policy's), so the first step's equality is exact
    visrl.train(dpo.DPOConfig(grad_accum=1, data=str(pairs_file), stage=2, out=str(tmp_path / "s2"), max_steps=2,
                              lambdas=(0.3, 0.7), lr=1e-3, reuse=False))
    rows = _rows(tmp_path / "s2")
    first = rows[0]
    # zero-initialised adapter: policy == reference, so every pair loss is -log sigmoid(0) = ln 2
    assert first["box/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["answer/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["box/rewards/margins"] == 0.0 and first["answer/rewards/chosen"] == 0.0
    for row in rows:
        assert row["loss"] == pytest.approx(0.3 * row["box/loss"] + 0.7 * row["answer/loss"], rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert f"box/{key}" in first and f"answer/{key}" in first
    assert all(row["nll_term"] == 0.0 and row["dpo_term"] == row["loss"] for row in rows)  # --nll-weight 0


def test_the_nll_term_is_logged_apart_from_the_preference_term(pairs_file, tmp_path):
    visrl.train(dpo.DPOConfig(grad_accum=1, data=str(pairs_file), stage=2, out=str(tmp_path / "s2"), max_steps=1,
                                    nll_weight=2.0))
    (row,) = _rows(tmp_path / "s2")
    # at the reference: preference term 0.5 ln 2 + 0.5 ln 2; NLL term = 2 x the mean over all samples of
    # -logp(chosen) / length, here both kinds have the same count, so the mean of the two kinds' means
    assert row["dpo_term"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["nll_term"] == pytest.approx(2.0 * (row["box/nll/chosen"] + row["answer/nll/chosen"]) / 2, rel=1e-5)
    assert row["loss"] == pytest.approx(row["dpo_term"] + row["nll_term"], rel=1e-6) and row["nll_term"] > 0


def test_a_stage_1_run_with_the_answer_anchor_trains_the_box_pairs_and_the_chosen_answers_nll(pairs_file, tmp_path):
    visrl.train(dpo.DPOConfig(grad_accum=1, data=str(pairs_file), stage=1, out=str(tmp_path / "s1"), max_steps=1,
                              nll_weight=2.0, answer_anchor=True, reuse=False))
    (row,) = _rows(tmp_path / "s1")
    # at the reference the box pairs' loss is ln 2 and the answer rows add none (2 ln 2 if they did)
    assert row["box/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert row["dpo_term"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["nll_term"] == pytest.approx(2.0 * (row["box/nll/chosen"] + row["answer/nll/chosen"]) / 2, rel=1e-5)
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["answer_anchor"] is True


def test_short_run_raises_the_reward_margin(pairs_file, tmp_path):
    out = visrl.train(dpo.DPOConfig(grad_accum=1, data=str(pairs_file), stage=1, out=str(tmp_path / "s1"),
                                          max_steps=16, lr=2e-3, batch_size=4, warmup_ratio=0.0))
    # Judged independently of the training log: trained adapter vs the model with adapters off.
    net, processor = model.load_model("tiny")
    model.load_adapter(net, out)
    net.eval()
    grouped = _grouped(processor, pairs_file, stage=1, n=16)
    samples = [s for g in grouped for s in g]
    batch = dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                              net.config.image_token_id)
    with torch.no_grad():
        features = dpo.encode_images(net, batch)
        policy = dpo.sequence_logps(net, batch, features)
        with model.adapters_disabled(net):
            reference = dpo.sequence_logps(net, batch, features)
    n = len(samples)
    margins = 0.1 * ((policy[:n] - reference[:n]) - (policy[n:] - reference[n:]))
    assert margins.mean() > 0.5 and (margins > 0).float().mean() >= 0.75, margins
    rows = _rows(tmp_path / "s1")
    assert rows[0]["box/rewards/margins"] == 0.0 and rows[-1]["box/rewards/margins"] > 0.5


def test_precompute_ref_trains_the_same_and_a_resumed_run_reads_its_table(pairs_file, tmp_path, capsys, monkeypatch):
    common = dict(data=str(pairs_file), stage=2, max_steps=3, lr=1e-3, limit=8)
    visrl.train(dpo.DPOConfig(grad_accum=1, out=str(tmp_path / "live"), reuse=False, **common))
    visrl.train(dpo.DPOConfig(grad_accum=1, out=str(tmp_path / "pre"), **common))  # the default
    for live, pre in zip(_rows(tmp_path / "live"), _rows(tmp_path / "pre")):
        assert pre["loss"] == pytest.approx(live["loss"], abs=1e-5)
        assert pre["answer/rewards/margins"] == pytest.approx(live["answer/rewards/margins"], abs=1e-5)
    assert (tmp_path / "pre" / dpo.REFERENCE_FILE).exists() and not (tmp_path / "live" / dpo.REFERENCE_FILE).exists()
    first = _rows(tmp_path / "pre")
    calls = []
    real = dpo.precompute_reference
    monkeypatch.setattr(dpo, "precompute_reference", lambda *a: calls.append(1) or real(*a))
    visrl.train(dpo.DPOConfig(grad_accum=1, out=str(tmp_path / "pre"), resume=True, **{**common, "max_steps": 5}))
    assert not calls and "read back from reference_logps.safetensors" in capsys.readouterr().err
    assert _rows(tmp_path / "pre")[:3] == first  # the same run, extended: its steps before the resume untouched
    (tmp_path / "pre" / dpo.REFERENCE_FILE).write_bytes(b"torn")  # an unreadable table is computed again
    visrl.train(dpo.DPOConfig(grad_accum=1, out=str(tmp_path / "pre"), resume=True, **{**common, "max_steps": 6}))
    assert calls == [1]


def test_dpo_trains_on_upstream_visrl_pair_files(pairs_file, tmp_path):
    """Our pairs rewritten in upstream VisRL's format (a JSON list; box turns as chosen_step / rejected_step):
    `dpo` reads them and trains the same samples."""
    ours = data.read_pairs(pairs_file, limit=8)
    items = [{"images": [os.path.relpath(p.record.image, pairs_file.parent)],
              "conversations": [{"from": "human", "value": f"<image>\n{p.record.question} {chat.VISRL_INSTRUCTION}"}],
              "chosen_step": {"from": "gpt", "value": p.chosen_box}, "rejected_step": {"from": "gpt", "value": p.rejected_box},
              "chosen": {"from": "gpt", "value": p.chosen_answer}, "rejected": {"from": "gpt", "value": p.rejected_answer}}
             for p in ours]
    upstream = pairs_file.parent / "upstream_pairs.json"
    upstream.write_text(json.dumps(items, indent=4))
    theirs = data.read_pairs(upstream)
    assert [(p.record.question, p.record.image, p.chosen_box, p.rejected_answer) for p in theirs] == \
        [(p.record.question, p.record.image, p.chosen_box, p.rejected_answer) for p in ours]
    visrl.train(dpo.DPOConfig(grad_accum=1, data=str(upstream), stage=2, out=str(tmp_path / "up"), max_steps=2, lr=1e-3))
    visrl.train(dpo.DPOConfig(grad_accum=1, data=str(pairs_file), stage=2, out=str(tmp_path / "ours"), max_steps=2, lr=1e-3, limit=8))
    for a, b in zip(_rows(tmp_path / "up"), _rows(tmp_path / "ours")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_init_adapter_is_the_reference_and_the_stack_reloads(tiny_path, pairs_file, tmp_path):
    net, processor = model.load_model(str(tiny_path))
    cfg = model.LoRAConfig(rank=4, alpha=8)
    model.add_lora(net, cfg)
    for m in model.lora_modules(net).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    model.save_adapter(net, tmp_path / "sft", cfg)
    out = visrl.train(dpo.DPOConfig(grad_accum=1, data=str(pairs_file), stage=1, out=str(tmp_path / "dpo"), max_steps=1,
                                    batch_size=2, adapter=str(tmp_path / "sft"), val_fraction=0.0))  # all 16 train
    first = _rows(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start

    # The first step's batch, scored by the SFT model and by the base model.
    step_pairs = visrl.epoch_batches(16, 2, model.Dist(), seed=0, epoch=0)[0]
    grouped = _grouped(processor, pairs_file, stage=1, n=16)
    batch = dpo.collate_pairs([grouped[i][0] for i in step_pairs], processor.image_processor,
                              processor.tokenizer.pad_token_id, net.config.image_token_id)

    def chosen_mean(scorer):
        with torch.no_grad():
            return dpo.sequence_logps(scorer, batch, dpo.encode_images(scorer, batch))[:2].mean().item()

    base, _ = model.load_model(str(tiny_path))
    assert first["box/logps/chosen"] == pytest.approx(chosen_mean(net), abs=1e-3)  # the SFT model
    assert abs(first["box/logps/chosen"] - chosen_mean(base)) > 0.1  # not the base model
    assert model.read_adapter_config(out).parent_adapter == str((tmp_path / "sft").resolve())
    stacked, _ = model.load_model(str(tiny_path))
    model.load_adapter(stacked, out)  # rebuilds: base + SFT merged, then the DPO adapter
    assert len(model.lora_modules(stacked)) == len(model.lora_target_names(stacked))
    # from another working directory too: the parent is stored resolved
    moved = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import model; "
                            f"net, _ = model.load_model({str(tiny_path)!r}); model.load_adapter(net, {str(out)!r})"],
                           cwd=tmp_path.parent, capture_output=True, text=True)
    assert moved.returncode == 0, moved.stderr[-2000:]
    # the runs folder moved: the parent is found beside the child, vouched for by its content hash
    moved_root = tmp_path / "moved"
    moved_root.mkdir()
    (tmp_path / "sft").rename(moved_root / "sft")
    (tmp_path / "dpo").rename(moved_root / "dpo")
    model.load_adapter(model.load_model(str(tiny_path))[0], moved_root / "dpo" / "adapter")
    (moved_root / "sft").rename(tmp_path / "sft")
    out = (moved_root / "dpo" / "adapter")
    # a parent changed after its child was trained on it is an error naming it, not a silently other model
    for m in model.lora_modules(net).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    model.save_adapter(net, tmp_path / "sft", cfg)
    with pytest.raises(data.UserError, match=rf"{tmp_path / 'sft'}: changed since .*dpo.* was trained on it"):
        model.load_adapter(model.load_model(str(tiny_path))[0], out)


def _bad_pairs(pairs_file, tmp_path, edit):
    lines = pairs_file.read_text().splitlines()[:6]
    obj = json.loads(lines[2])
    edit(obj)
    lines[2] = json.dumps(obj)
    path = pairs_file.parent / f"bad_{tmp_path.name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("edit,stage,field", [
    (lambda o: o.pop("rejected_answer"), 1, "rejected_answer"),
    (lambda o: o.update(chosen_box="  "), 1, "chosen_box"),
    (lambda o: o.update(chosen_box="[0.9, 0.9, 0.1, 0.1]"), 2, "chosen_box"),
    (lambda o: o.update(chosen_box="somewhere on the left"), 2, "chosen_box"),
])
def test_bad_pairs_are_reported_with_file_and_line(pairs_file, tmp_path, edit, stage, field):
    path = _bad_pairs(pairs_file, tmp_path, edit)
    try:
        with pytest.raises(data.DataError, match=rf"{path.name}:3: field '{field}'"):
            visrl.train(dpo.DPOConfig(grad_accum=1, data=str(path), stage=stage, out=str(tmp_path / "x"), max_steps=1))
        out = visrl.train(dpo.DPOConfig(grad_accum=1, data=str(path), stage=stage, out=str(tmp_path / "y"), max_steps=2,
                                              skip_bad_records=True))
        assert len(_rows(tmp_path / "y")) == 2 and (out / "adapter.safetensors").exists()
    finally:
        path.unlink()


@pytest.mark.parametrize("stage", [1, 2])
def test_a_step_whose_chosen_and_rejected_are_the_same_is_kept_as_upstream_keeps_it(tiny_lora, pairs_file, tmp_path,
                                                                                   capsys, stage):
    """Upstream's stage-2 trainer (src/visrl_stage2/train/dpo/trainer.py l.289-291: `losses = 0.5 * losses_step1 +
    0.5 * losses_step2`, then the mean over the batch) and its stage-1 trainer (TRL's mean of the pair losses) filter
    nothing: a pair whose box texts are the same stays, its box loss ln 2 with zero gradient, and counts in the mean.
    Ours against that expression, each row's log-probs from a plain HF forward (policy: the LoRA; reference: off)."""
    path = _bad_pairs(pairs_file, tmp_path, lambda o: o.update(rejected_box=o["chosen_box"]))
    try:
        net, processor = tiny_lora
        cfg = dpo.DPOConfig(data=str(path), stage=stage)
        grouped = dpo.build_dpo_samples(cfg, data.read_pairs(path, image_root=pairs_file.parent), processor,
                                        model.Dist())
        assert [[s.kind for s in g] for g in grouped] == [["box", "answer"][:stage]] * 6
        assert "dpo: 1 pairs have a step (box or answer) whose chosen and rejected are the same" in capsys.readouterr().err
        samples = [s for g in grouped for s in g]
        batch = dpo.collate_pairs(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                                  net.config.image_token_id)
        counts = torch.bincount(batch["kind"], minlength=2).float()
        loss, _ = dpo.DPOObjective(net, cfg, None)(batch, counts)

        def logps(row, adapters):
            with torch.no_grad(), (contextlib.nullcontext() if adapters else model.adapters_disabled(net)):
                return plain_token_logps(net, processor, row).sum().item()

        def pair_loss(s):
            h = (logps(s.chosen, True) - logps(s.chosen, False)) - (logps(s.rejected, True) - logps(s.rejected, False))
            return -math.log(_sig(0.1 * h))

        per_pair = [sum(0.5 * pair_loss(s) for s in g) if stage == 2 else pair_loss(g[0]) for g in grouped]
        assert loss.item() == pytest.approx(sum(per_pair) / len(per_pair), rel=1e-4)
        assert pair_loss(grouped[2][0]) == pytest.approx(math.log(2), abs=1e-6)  # the same box: ln 2
        net.zero_grad()
        one = dpo.collate_pairs(grouped[2][:1], processor.image_processor, processor.tokenizer.pad_token_id,
                                net.config.image_token_id)
        dpo.DPOObjective(net, cfg, None)(one, torch.tensor([1.0, 0.0]))[0].backward()
        grads = [p.grad for p in model.trainable_parameters(net) if p.grad is not None]
        assert grads and max(g.abs().max().item() for g in grads) < 1e-6  # its gradient is zero
        net.zero_grad()
    finally:
        path.unlink()
