"""The SFT loop and the CLI, on the tiny model and a small synthetic set."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import model
import visrl
import train

ROOT = Path(__file__).resolve().parent.parent


def _config(synth_dir, out, **overrides):
    base = dict(model="tiny", data=str(synth_dir), out=str(out), batch_size=4, lr=2e-3, warmup_ratio=0.0,
                seed=0)
    return visrl.SFTConfig(**{**base, **overrides})


def _items(processor, samples):
    return [{"input_ids": s.input_ids, "labels": s.labels, **data.sample_pixels(s, processor.image_processor)}
            for s in samples]


def _mean_loss(net, processor, samples):
    """Token-mean loss of samples, one forward."""
    batch = data.collate(_items(processor, samples), processor.tokenizer.pad_token_id, net.config.image_token_id)
    n_tokens = (batch["labels"][:, 1:] != data.IGNORE_INDEX).sum().float()
    with torch.no_grad():
        return visrl.sft_loss(net, batch, n_tokens).item()


def test_sft_lowers_the_loss(synth_dir, tmp_path):
    out = visrl.sft(_config(synth_dir, tmp_path / "run", max_steps=30))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in rows)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 30
    # Held-out judgement of "lowers the loss": the same fixed validation samples before and after.
    net, processor = model.load_model("tiny")
    net.eval()
    val = [s for r in data.read_records(synth_dir / "val.jsonl")
           for s in data.sft_samples(r, processor.tokenizer, processor.image_processor)]
    before = _mean_loss(net, processor, val)
    model.load_adapter(net, out)
    after = _mean_loss(net, processor, val)
    assert after < before - 0.5, (before, after)
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])


def test_step_loss_does_not_depend_on_the_accumulation_split(tiny_path, synth_dir):
    """One batch of 4 and two micro-batches of 2 give the same gradients (one token normaliser)."""
    net, processor = model.load_model(str(tiny_path))
    model.add_lora(net, model.LoRAConfig(rank=4, alpha=8))
    for m in model.lora_modules(net).values():  # non-zero B so A gets gradients too
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    records = data.read_records(synth_dir / "train.jsonl")[:2]
    samples = [s for r in records for s in data.sft_samples(r, processor.tokenizer, processor.image_processor)]
    items = _items(processor, samples)
    pad, image = processor.tokenizer.pad_token_id, net.config.image_token_id
    n_tokens = sum(sum(label != data.IGNORE_INDEX for label in s.labels[1:]) for s in samples)
    n_tokens = torch.tensor(float(n_tokens))
    params = model.trainable_parameters(net)

    def grads(groups):
        for p in params:
            p.grad = None
        for group in groups:
            visrl.sft_loss(net, data.collate(group, pad, image), n_tokens).backward()
        return [p.grad.clone() for p in params]

    whole, split = grads([items]), grads([items[:2], items[2:]])
    for a, b in zip(whole, split):
        # fp32; padding changes only the summation order: agree to rounding, relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_long_samples_are_dropped_or_rejected(synth_dir, tmp_path, capsys):
    net, processor = model.load_model("tiny")
    records = data.read_records(synth_dir / "train.jsonl")[:6]
    answer_len = len(data.sft_samples(records[0], processor.tokenizer, processor.image_processor)[1].input_ids)
    cfg = _config(synth_dir, tmp_path, max_len=answer_len - 1)
    samples = visrl.build_sft_samples(cfg, records, processor, train.Dist())
    assert all(len(s.input_ids) <= answer_len - 1 for s in samples)
    assert "dropped" in capsys.readouterr().err
    cfg.error_on_long = True
    with pytest.raises(ValueError, match=r"train\.jsonl:\d+: (focus|answer) sample has \d+ tokens"):
        visrl.build_sft_samples(cfg, records, processor, train.Dist())


def test_sft_reports_a_bad_record_with_file_and_line(synth_dir, tmp_path):
    lines = (synth_dir / "train.jsonl").read_text().splitlines()[:8]
    bad = json.loads(lines[3])
    bad["bboxs"] = [[50, 50, 10, 10]]  # inverted
    lines[3] = json.dumps(bad)
    bad_file = synth_dir / "bad_train.jsonl"
    bad_file.write_text("\n".join(lines) + "\n")
    try:
        with pytest.raises(data.DataError, match=r"bad_train\.jsonl:4: field 'bboxs'"):
            visrl.sft(_config(bad_file, tmp_path / "run", max_steps=1))
        out = visrl.sft(_config(bad_file, tmp_path / "run2", max_steps=1, skip_bad_records=True))
        assert (out / "adapter.safetensors").exists()
    finally:
        bad_file.unlink()


def test_cli_help_and_sft_command(synth_dir, tmp_path):
    env_python = [sys.executable, str(ROOT / "visrl.py")]
    help_text = subprocess.run(env_python + ["sft", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--adapter", "--data", "--out", "--limit", "--seed", "--max-steps", "--epochs",
                 "--lr", "--batch-size", "--grad-accum", "--lora-rank", "--lora-alpha"):
        assert flag in help_text, flag
    run = subprocess.run(env_python + ["sft", "--data", str(synth_dir), "--out", str(tmp_path / "cli"),
                                       "--max-steps", "2", "--limit", "8"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "8 records -> 16 samples" in run.stderr


def test_data_synth_builds_the_cached_set_once(monkeypatch, tmp_path):
    import synth

    monkeypatch.setenv("VISRL_CACHE", str(tmp_path))
    calls = []
    real = synth.make_synth

    def small(root, seed=0):
        calls.append(root)
        return real(root, n_train=4, n_val=2, n_test=2, seed=seed)

    monkeypatch.setattr(synth, "make_synth", small)
    path = train.resolve_data("synth", "train", seed=3)
    assert path.name == "train.jsonl" and path.exists() and str(tmp_path) in str(path)
    assert train.resolve_data("synth", "test", seed=3).exists()
    assert len(calls) == 1  # the second call reuses the cache
    assert len(data.read_records(path)) == 4


def test_focus_first_curriculum_draws_box_samples_then_all_kinds_and_resumes_in_place(synth_dir, tmp_path):
    _, processor = model.load_model("tiny")
    records = data.read_records(synth_dir / "train.jsonl")[:12]
    cfg = _config(synth_dir, tmp_path, crop_alone_samples=True, focus_first_steps=5, grad_accum=2, batch_size=2)
    samples = visrl.build_sft_samples(cfg, records, processor, train.Dist())
    kinds = {s.kind for s in samples}
    assert kinds == {"focus", "answer", "crop"}

    def first(n, start_step):
        stream = visrl.sft_index_stream(cfg, samples, train.Dist(), start_step)
        return [next(stream) for _ in range(n)]

    whole = first(40, 0)  # micro-batches: 5 steps x 2 accumulation = 10 focus-only micro-batches first
    assert all(samples[i].kind == "focus" for batch in whole[:10] for i in batch)
    assert {samples[i].kind for batch in whole[10:] for i in batch} == kinds
    for step in (3, 5, 9):  # resuming at an optimizer step gives exactly the rest of the uninterrupted stream
        assert first(40 - 2 * step, step) == whole[2 * step:]
    # with two ranks the focus batches do not overlap
    ranks = [next(visrl.sft_index_stream(cfg, samples, train.Dist(rank=r, world_size=2), 0)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_focus_first_steps_must_leave_mixed_steps(synth_dir, tmp_path):
    for steps in (4, -1):
        cfg = _config(synth_dir, tmp_path, limit=8, max_steps=4, focus_first_steps=steps)
        with pytest.raises(ValueError, match=f"focus-first-steps {steps} must be positive, fewer than the 4 steps"):
            visrl.sft(cfg)
