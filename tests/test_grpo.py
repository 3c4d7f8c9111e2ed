"""GRPO: the advantages and the loss against independent computations, the objective against a plain HF forward, and
runs on the tiny model (rewards scripted where a random model would earn none) that resume exactly."""

import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file

import chat
import data
import dpo
import generate
import grpo
import model
import runs
import visrl
from conftest import plain_token_logps


def test_group_advantages_are_each_group_s_z_scores():
    rewards = [1.0, 0.0, 0.5, 0.0, 0.2, 0.2, 0.2, 0.2]  # two groups of 4; the second all equal
    got = grpo.group_advantages(torch.tensor(rewards), 4).tolist()
    first = rewards[:4]
    mean, sd = statistics.mean(first), statistics.stdev(first)  # the sample standard deviation, as TRL's
    assert got[:4] == pytest.approx([(r - mean) / (sd + 1e-4) for r in first], rel=1e-6)
    assert got[4:] == [0.0] * 4


def test_grpo_loss_is_deepseekmath_s_clipped_surrogate_with_the_k3_kl():
    """Element by element in plain floats: rho = exp(logp - old), min(rho A, clip(rho) A), KL = e^(ref-logp) -
    (ref - logp) - 1, loss = -(surrogate - beta KL); a ratio beyond the clip with a positive advantage is clipped."""
    logp = [-1.0, -0.5, -2.0, -0.1]
    old = [-1.1, -0.5, -1.0, -0.4]
    ref = [-1.1, -0.7, -2.5, -0.1]
    adv = [1.0, -0.5, 2.0, 1.5]
    loss, kl, clipped = grpo.grpo_loss(*(torch.tensor(v) for v in (logp, old, ref, adv)), beta=0.04, clip_eps=0.2)
    for t in range(4):
        rho = math.exp(logp[t] - old[t])
        surrogate = min(rho * adv[t], min(max(rho, 0.8), 1.2) * adv[t])
        k3 = math.exp(ref[t] - logp[t]) - (ref[t] - logp[t]) - 1
        assert loss[t].item() == pytest.approx(-(surrogate - 0.04 * k3), rel=1e-6)
        assert kl[t].item() == pytest.approx(k3, rel=1e-5, abs=1e-9)
    assert clipped.tolist() == [False, False, False, True]  # rho = e^0.3 > 1.2 with A > 0


def _scripted_score(answer, references):
    """A reward a random model can earn: a deterministic function of the reply's text."""
    return (len(answer) % 5) / 4


def test_the_objective_equals_the_loss_on_hf_s_own_log_probs(tiny_path, synth_dir, monkeypatch):
    """The policy's token log-probs and the reference's (adapters off) from a plain HF forward per row, the per-token
    loss averaged per sequence, each kind's mean weighted by its lambda: equal to GRPOObjective on the collated batch."""
    monkeypatch.setattr(generate, "rule_answer_score", _scripted_score)
    net, processor = model.load_model(str(tiny_path))
    model.add_lora(net, model.LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    for m in model.lora_modules(net).values():  # a policy other than the reference: a non-zero KL
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.02
    cfg = runs.resolve_convention(grpo.GRPOConfig(group_size=3, max_new_tokens=8, lambdas=(0.3, 0.7), beta=0.5))
    records = data.read_records(synth_dir / "train.jsonl")[:2]
    rows = grpo.rollouts(net, processor, cfg, records, seed=1)
    assert len(rows) == 6 and len({r["answer_reward"] for r in rows}) > 1  # scripted rewards that differ
    samples, advantages, kinds, rewards = grpo.rollout_samples(rows, processor, cfg)
    batch = chat.collate(samples, processor.image_processor, processor.tokenizer.pad_token_id,
                         net.config.image_token_id)
    batch.update(advantage=torch.tensor(advantages), kind=torch.tensor(kinds), reward=torch.tensor(rewards))
    counts = torch.tensor([6.0, 6.0])
    loss, stats = grpo.GRPOObjective(net, cfg)(batch, counts)
    expected = 0.0
    for sample, a, k in zip(samples, advantages, kinds):
        with torch.no_grad():
            logp = plain_token_logps(net, processor, sample)
            with model.adapters_disabled(net):
                ref = plain_token_logps(net, processor, sample)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        expected += cfg.lambdas[k] / 6 * (-(a - cfg.beta * kl)).mean().item()  # rho = 1: the surrogate is A
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert stats[0, 1].item() == pytest.approx(sum(r["box_reward"] for r in rows))


def test_each_group_s_prefix_runs_once_and_changes_no_log_prob(tiny_path, synth_dir):
    """A question's G box rows packed into one row (prefix | G suffixes, each seeing the prefix and itself) and its G
    answer rows into another: token log-probs and LoRA gradients equal to the unpacked rows, in far fewer tokens."""
    net, processor = model.load_model(str(tiny_path))
    model.add_lora(net, model.LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    for m in model.lora_modules(net).values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.02
    cfg = runs.resolve_convention(grpo.GRPOConfig(group_size=4, max_new_tokens=8, temperature=2.0))
    rows = grpo.rollouts(net, processor, cfg, data.read_records(synth_dir / "train.jsonl")[:2], seed=3)
    samples = grpo.rollout_samples(rows, processor, cfg)[0]
    pad, image = processor.tokenizer.pad_token_id, net.config.image_token_id
    plain = chat.collate(samples, processor.image_processor, pad, image)
    packed = dict(plain, **dpo.pack_groups([list(range(k, k + 4)) for k in range(0, 16, 4)], samples, plain, pad,
                                           image))
    assert packed["packed_ids"].shape[0] == 4 and packed["packed_ids"].numel() < 0.5 * plain["input_ids"].numel()
    results = []
    for batch in (plain, packed):
        net.zero_grad()
        logps = dpo.token_logps(net, batch, dpo.encode_images(net, batch), chunk_size=7)
        (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.trainable_parameters(net)]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 + 1e-4 * a.abs().max().item())


def _run(synth_dir, out, **overrides):
    base = dict(model="tiny", data=str(synth_dir / "train.jsonl"), out=str(out), limit=8, batch_size=2, grad_accum=1,
                group_size=3, max_new_tokens=8, lr=1e-3, warmup_ratio=0.0, seed=0)
    return visrl.train(grpo.GRPOConfig(**{**base, **overrides}))


def test_a_run_learns_from_its_rewards_and_a_resumed_one_is_the_same(synth_dir, tmp_path, monkeypatch):
    """Three steps straight, and one step then --resume to three: the same rollouts (seeded by the questions), the same
    losses and the same adapter; the adapter moved and the log holds each kind's reward, KL and clip rate."""
    monkeypatch.setattr(generate, "rule_answer_score", _scripted_score)
    whole = _run(synth_dir, tmp_path / "whole", max_steps=3)
    _run(synth_dir, tmp_path / "cut", max_steps=1, save_every=1)
    cut = _run(synth_dir, tmp_path / "cut", max_steps=3, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3]
    for a, b in zip(rows, again):
        for key in ("loss", "box/reward", "answer/reward", "answer/kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert any(r["grad_norm"] > 0 for r in rows) and any(r["answer/reward"] > 0 for r in rows)
    ours, theirs = load_file(whole / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    assert any(v.abs().max() > 0 for k, v in ours.items() if "lora_B" in k)  # it trained


def test_grpo_refuses_what_it_cannot_do(synth_dir, tmp_path):
    with pytest.raises(data.UserError, match="group-size"):
        _run(synth_dir, tmp_path / "a", group_size=1, max_steps=1)
    with pytest.raises(data.UserError, match="val-fraction"):
        _run(synth_dir, tmp_path / "b", val_fraction=0.1, max_steps=1)
