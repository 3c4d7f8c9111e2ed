"""The SFT loop and the CLI, on the tiny model and a small synthetic set."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat
import data
import dpo
import model
import runs
import synth
import visrl
from conftest import assert_one_line_error, finish_cli, plain_token_logps, run_cli, snapshot, start_cli

ROOT = Path(__file__).resolve().parent.parent


def _config(synth_dir, out, **overrides):
    base = dict(model="tiny", data=str(synth_dir), out=str(out), batch_size=4, grad_accum=1, lr=2e-3, warmup_ratio=0.0,
                seed=0)
    return visrl.SFTConfig(**{**base, **overrides})


def _collate(processor, net, samples):
    return chat.collate(samples, processor.image_processor, processor.tokenizer.pad_token_id, net.config.image_token_id)


def _mean_loss(net, processor, samples):
    """Token-mean loss of samples, one forward."""
    batch = _collate(processor, net, samples)
    with torch.no_grad():
        return visrl.sft_loss(net, batch, torch.tensor(float(len(batch["response_targets"])))).item()


def test_sft_loss_is_the_mean_cross_entropy_of_a_plain_forward(tiny_path, synth_dir):
    """The fused path (features once, response positions only) against HF's full logits, sample by sample."""
    net, processor = model.load_model(str(tiny_path))
    records = data.read_records(synth_dir / "train.jsonl")[:2]
    samples = [s for r in records for s in chat.sft_samples(r, processor.tokenizer, processor.image_processor,
                                                            crop_alone=True)]
    with torch.no_grad():
        expected = -torch.cat([plain_token_logps(net, processor, s) for s in samples]).mean()
        ours = _mean_loss(net, processor, samples)
    assert math.isclose(ours, expected.item(), rel_tol=1e-5)


def test_sft_lowers_the_loss(synth_dir, tmp_path):
    out = visrl.train(_config(synth_dir, tmp_path / "run", max_steps=30))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in rows)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 30
    # Held-out judgement of "lowers the loss": the same fixed validation samples before and after.
    net, processor = model.load_model("tiny")
    net.eval()
    val = [s for r in data.read_records(synth_dir / "val.jsonl")
           for s in chat.sft_samples(r, processor.tokenizer, processor.image_processor)]
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
    samples = [s for r in records for s in chat.sft_samples(r, processor.tokenizer, processor.image_processor)]
    n_tokens = sum(sum(label != chat.IGNORE_INDEX for label in s.labels[1:]) for s in samples)
    n_tokens = torch.tensor(float(n_tokens))
    params = model.trainable_parameters(net)

    def grads(groups):
        for p in params:
            p.grad = None
        for group in groups:
            visrl.sft_loss(net, _collate(processor, net, group), n_tokens).backward()
        return [p.grad.clone() for p in params]

    whole, split = grads([samples]), grads([samples[:2], samples[2:]])
    for a, b in zip(whole, split):
        # fp32; padding changes only the summation order: agree to rounding, relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_long_samples_are_dropped_and_counted(synth_dir, tmp_path, capsys):
    net, processor = model.load_model("tiny")
    records = data.read_records(synth_dir / "train.jsonl")[:6]
    answer_len = len(chat.sft_samples(records[0], processor.tokenizer, processor.image_processor)[1].input_ids)
    cfg = _config(synth_dir, tmp_path, max_len=answer_len - 1)
    samples = visrl.build_sft_samples(cfg, records, processor, model.Dist())
    assert all(len(s.input_ids) <= answer_len - 1 for s in samples)
    dropped = sum(len(s.input_ids) > answer_len - 1 for r in records
                  for s in chat.sft_samples(r, processor.tokenizer, processor.image_processor))
    assert f"warning: sft dropped {dropped} samples longer than {answer_len - 1} tokens" in capsys.readouterr().err


def test_sft_reports_a_bad_record_with_file_and_line(synth_dir, tmp_path):
    lines = (synth_dir / "train.jsonl").read_text().splitlines()[:8]
    bad = json.loads(lines[3])
    bad["bboxs"] = [[50, 50, 10, 10]]  # inverted
    lines[3] = json.dumps(bad)
    bad_file = synth_dir / "bad_train.jsonl"
    bad_file.write_text("\n".join(lines) + "\n")
    try:
        with pytest.raises(data.DataError, match=r"bad_train\.jsonl:4: field 'bboxs'"):
            visrl.train(_config(bad_file, tmp_path / "run", max_steps=1))
        out = visrl.train(_config(bad_file, tmp_path / "run2", max_steps=1, skip_bad_records=True))
        assert (out / "adapter.safetensors").exists()
    finally:
        bad_file.unlink()


def test_cli_help_and_sft_command(synth_dir, tmp_path):
    env_python = [sys.executable, str(ROOT / "visrl.py")]
    help_text = subprocess.run(env_python + ["sft", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--adapter", "--data", "--out", "--limit", "--seed", "--max-steps", "--epochs",
                 "--lr", "--batch-size", "--grad-accum", "--lora-rank", "--lora-alpha", "--val-fraction", "--eval-every",
                 "--prompts", "--crop", "--max-pixels", "--box-form", "--mix-conventions"):
        assert flag in help_text, flag
    run = subprocess.run(env_python + ["sft", "--data", str(synth_dir), "--out", str(tmp_path / "cli"),
                                       "--max-steps", "2", "--limit", "8", "--grad-accum", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "eval_loss" in rows[-1] and "eval_loss" not in rows[0]  # held out: at the end
    assert "8 records -> 14 samples (+ 2 held out)" in run.stderr  # --val-fraction 0.1: one whole record


def test_data_synth_builds_the_cached_set_once(monkeypatch, tmp_path):
    monkeypatch.setenv("VISRL_CACHE", str(tmp_path))
    calls = []
    real = synth.make_synth

    def small(root, seed=0, **sizes):
        calls.append(root)
        return real(root, n_train=4, n_val=2, n_test=2, seed=seed)

    monkeypatch.setattr(synth, "make_synth", small)
    path = synth.resolve_data("synth", "train", seed=3)
    assert path.name == "train.jsonl" and path.exists() and str(tmp_path) in str(path)
    assert synth.resolve_data("synth", "test", seed=3).exists()
    assert len(calls) == 1  # the second call reuses the cache
    assert len(data.read_records(path)) == 4


def test_focus_first_curriculum_draws_box_samples_then_all_kinds_and_resumes_in_place(synth_dir, tmp_path):
    _, processor = model.load_model("tiny")
    records = data.read_records(synth_dir / "train.jsonl")[:12]
    cfg = _config(synth_dir, tmp_path, crop_alone_samples=True, focus_first_steps=5, grad_accum=2, batch_size=2)
    samples = visrl.build_sft_samples(cfg, records, processor, model.Dist())
    kinds = {s.kind for s in samples}
    assert kinds == {"focus", "answer", "crop"}

    def first(n, start_step):
        stream = visrl.sft_index_stream(cfg, samples, model.Dist(), start_step)
        return [next(stream) for _ in range(n)]

    whole = first(40, 0)  # micro-batches: 5 steps x 2 accumulation = 10 focus-only micro-batches first
    assert all(samples[i].kind == "focus" for batch in whole[:10] for i in batch)
    assert {samples[i].kind for batch in whole[10:] for i in batch} == kinds
    for step in (3, 5, 9):  # resuming at an optimizer step gives exactly the rest of the uninterrupted stream
        assert first(40 - 2 * step, step) == whole[2 * step:]
    # with two ranks the focus batches do not overlap
    ranks = [next(visrl.sft_index_stream(cfg, samples, model.Dist(rank=r, world_size=2), 0)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_focus_first_steps_must_leave_mixed_steps(synth_dir, tmp_path):
    for steps in (4, -1):
        cfg = _config(synth_dir, tmp_path, limit=8, max_steps=4, focus_first_steps=steps)
        with pytest.raises(ValueError, match=f"focus-first-steps {steps} must be positive, fewer than the 4 steps"):
            visrl.train(cfg)


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log directory as TensorBoard reads it back: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_writes_the_numbers_of_metrics_jsonl_at_their_steps(synth_dir, tmp_path):
    import numpy as np

    out = tmp_path / "run"
    visrl.train(_config(synth_dir, out, limit=8, max_steps=3, eval_every=2, report_to="tensorboard"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {}  # each numeric field of each row at the row's step, as a float32 (TensorBoard's scalar)
    for row in rows:
        for key, value in row.items():
            if key != "step":
                expected.setdefault(key, []).append((row["step"], float(np.float32(value))))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "eval_loss", "elapsed_s"} <= expected.keys()
    assert [step for step, _ in expected["eval_loss"]] == [2, 3]  # held out at --eval-every 2 and at the end
    assert _scalars(out / "tensorboard") == expected


def test_a_resumed_run_s_events_replace_those_of_the_steps_it_redoes(tmp_path):
    import time

    writer_class = visrl.summary_writer("tensorboard")
    log = visrl.MetricsLog(tmp_path, writer_class, start_step=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    log.close()
    time.sleep(1.01 - time.time() % 1)  # a later process: its event file's name (seconds first) sorts after
    log = visrl.MetricsLog(tmp_path, writer_class, start_step=1)  # resumed from the checkpoint of step 1
    for step in (2, 3):
        log.write({"step": step, "loss": 10.0 * step})
    log.close()
    assert _scalars(tmp_path / "tensorboard") == {"loss": [(1, 1.0), (2, 20.0), (3, 30.0)]}
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1.0, 2.0, 3.0, 20.0, 30.0]  # appended: resume_point drops the redone rows before a run goes on


# --------------------------------------------------------------------------------------------
# When things go wrong: no command destroys what it did not create; an expected error is one line, exit 2.


def _main(monkeypatch, capsys, main, *argv):
    """An entry point's main() on argv, as its command line; (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prog", *map(str, argv)])
    monkeypatch.delenv("VISRL_DEBUG", raising=False)
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_a_second_run_into_the_same_out_is_refused_until_resume_or_overwrite(synth_dir, tmp_path):
    out = tmp_path / "run"
    visrl.train(_config(synth_dir, out, max_steps=2, limit=8))
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    code, _, err = run_cli("visrl.py", "sft", "--grad-accum", "1", "--data", synth_dir, "--out", out, "--max-steps", "2", "--limit", "8")
    assert_one_line_error(code, err, f"--out {out} already holds a run", "--resume", "--overwrite")
    assert snapshot(out) == before
    with pytest.raises(data.UserError, match=r"other settings \(--lr 0.002 -> 0.001\)"):
        visrl.train(_config(synth_dir, out, max_steps=3, limit=8, resume=True, lr=1e-3))
    assert snapshot(out) == before
    visrl.train(_config(synth_dir, out, max_steps=3, limit=8, overwrite=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # replaced, not appended to
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    assert (out / "notes.txt").read_text() == "the user's own file"  # --overwrite replaces the run's files only


def test_an_out_overlapping_an_input_is_refused_and_nothing_changes(synth_dir, tiny_path, pairs_file, tmp_path,
                                                                    monkeypatch, capsys):
    import evaluate
    import generate

    run = tmp_path / "sft"
    visrl.train(_config(synth_dir, run, max_steps=1, limit=8))
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "pairs.jsonl").write_bytes(pairs_file.read_bytes())
    before = snapshot(run, tiny_path, gen)
    adapter = run / "adapter"
    cases = [
        (visrl.main, ["dpo", "--init-adapter", adapter, "--out", run, "--data", pairs_file], "overlaps the --adapter"),
        (visrl.main, ["dpo", "--init-adapter", adapter, "--out", adapter / "x", "--data", pairs_file], "overlaps the --adapter"),
        (visrl.main, ["sft", "--model", tiny_path, "--out", tiny_path, "--data", synth_dir], "overlaps the --model"),
        (visrl.main, ["dpo", "--data", gen / "pairs.jsonl", "--out", gen], "holds the --data"),
        (visrl.main, ["export", "--adapter", adapter, "--out", run, "--overwrite"], "overlaps the input"),
        (generate.main, ["--adapter", adapter, "--out", run, "--data", synth_dir], "overlaps the --adapter"),
        (evaluate.main, ["--adapter", adapter, "--out", adapter, "--data", synth_dir], "overlaps the --adapter"),
    ]
    for main, argv, message in cases:
        code, err = _main(monkeypatch, capsys, main, *argv)
        assert_one_line_error(code, err, message)
    assert snapshot(run, tiny_path, gen) == before


def test_the_answer_anchor_outside_stage_1_or_without_the_nll_term_is_refused(pairs_file, tmp_path, monkeypatch,
                                                                                capsys):
    for argv in (["--stage", "2", "--nll-weight", "1"], ["--stage", "1"]):
        code, err = _main(monkeypatch, capsys, visrl.main, "dpo", "--data", pairs_file, "--answer-anchor",
                          "--out", tmp_path / "run", *argv)
        assert_one_line_error(code, err, "--answer-anchor: for --stage 1 with --nll-weight > 0")
    assert not (tmp_path / "run").exists()


def test_report_to_tensorboard_without_the_package_is_one_line_before_any_work(synth_dir, pairs_file, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed (restored after the test)
    for name in [name for name in sys.modules if name.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)  # imported by an earlier test: torch would not import it again
    for argv in (["sft", "--data", synth_dir], ["dpo", "--data", pairs_file]):
        code, err = _main(monkeypatch, capsys, visrl.main, *argv, "--report-to", "tensorboard", "--out", tmp_path / "r")
        assert_one_line_error(code, err, "--report-to tensorboard", "pip install 'visrl[tensorboard]'",
                              "pip install tensorboard")
    assert not (tmp_path / "r").exists()


def test_default_outs_differ_per_stage():
    import evaluate
    import export
    import generate
    import tyro

    outs = [visrl.SFTConfig().out, tyro.cli(dpo.DPOConfig, args=["--data", "p.jsonl"]).out,
            tyro.cli(dpo.DPOConfig, args=["--data", "p.jsonl", "--stage", "2"]).out, generate.GenerateConfig().out,
            evaluate.EvalConfig().out, export.ExportConfig(adapter="a").out]
    assert outs[1:3] == ["runs/dpo1", "runs/dpo2"] and len(set(outs)) == len(outs)


def test_an_adapter_is_never_its_own_parent(tiny_path, tmp_path):
    net, _ = model.load_model(str(tiny_path))
    model.add_lora(net, model.LoRAConfig(rank=2, alpha=4))
    with pytest.raises(data.UserError, match="its own parent"):
        model.save_adapter(net, tmp_path / "a", model.LoRAConfig(parent_adapter=str(tmp_path / "a" / ".")))
    model.save_adapter(net, tmp_path / "a", model.LoRAConfig(rank=2, alpha=4))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "parent_adapter": str(tmp_path / "a")}))
    with pytest.raises(data.UserError, match="loops back on itself"):  # a hand-edited loop: an error, not a recursion
        model.load_adapter(net, tmp_path / "a")


def test_every_entry_point_reports_an_expected_error_on_one_line(synth_dir, pairs_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((synth_dir / "train.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    corrupt = tmp_path / "ckpt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps({"set": "s", "id": 3, "answers": ["a"], "width": 9, "height": 9,
                                       "gt_box": [1, 2, 3], "box_text": "[0.1, 0.1, 0.2, 0.2]"}) + "\n")
    cases = [  # (command line, what the message must name)
        (["visrl.py", "sft", "--grad-accum", "1", "--data", bad, "--out", tmp_path / "a"], [f"{bad}:2: invalid JSON"]),
        (["visrl.py", "sft", "--grad-accum", "1", "--model", corrupt, "--out", tmp_path / "b", "--data", synth_dir],
         [f"{corrupt}/config.json: cannot read"]),
        (["visrl.py", "dpo", "--grad-accum", "1", "--data", pairs_file, "--out", tmp_path / "c", "--resume", "--overwrite"], ["pass one of them"]),
        (["visrl.py", "export", "--adapter", tmp_path / "nowhere"], ["nowhere: not an adapter directory"]),
        (["visrl.py", "infer", "--image", tmp_path / "missing.png", "--question", "?"], ["missing.png"]),
        (["generate.py", "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "d"], ["missing.jsonl"]),
        (["generate.py", "--attempts", "0", "--out", tmp_path / "e"], ["--attempts"]),
        (["evaluate.py", "--predictions", predictions, "--out", tmp_path / "f"],
         [f"{predictions}:1: field 'gt_box'", "[1, 2, 3]"]),
        (["evaluate.py", "--endpoint", "http://127.0.0.1:9", "--data", synth_dir, "--limit", "1", "--out",
          tmp_path / "g"], ["http://127.0.0.1:9/v1/chat/completions"]),  # nothing listens there
    ]
    started = [(start_cli(*argv), fragments) for argv, fragments in cases]  # together: most of each is imports
    for process, fragments in started:
        assert_one_line_error(*finish_cli(process)[::2], *fragments)
    code, _, err = run_cli("visrl.py", "sft", "--grad-accum", "1", "--data", bad, "--out", tmp_path / "a", "--debug")
    assert code == 2 and "Traceback" in err and f"{bad}:2: invalid JSON" in err  # --debug shows where it was raised
    assert not any((tmp_path / name).exists() for name in "abcdef")  # a refused command writes nothing


def test_generate_and_eval_are_visrl_subcommands_with_the_same_behaviour(tmp_path):
    # `visrl.py generate|eval` run the same functions as `python generate.py|evaluate.py`: the same one-line
    # error, started the way a user starts them (both in parallel: they are import-bound)
    missing = tmp_path / "missing.jsonl"
    started = {cmd: start_cli(*cmd, "--data", missing, "--out", tmp_path / "_".join(cmd).replace(".py", ""))
               for cmd in (("visrl.py", "generate"), ("generate.py",), ("visrl.py", "eval"), ("evaluate.py",))}
    results = {cmd: finish_cli(p) for cmd, p in started.items()}
    for cmd, (code, _, err) in results.items():
        assert_one_line_error(code, err, str(missing))
    line = lambda cmd: results[cmd][2][results[cmd][2].index("error: "):].replace("visrl_py_", "").strip()
    assert line(("visrl.py", "generate")).split(":")[:2] == line(("generate.py",)).split(":")[:2]
    assert line(("visrl.py", "eval")).split(":")[:2] == line(("evaluate.py",)).split(":")[:2]


def test_held_out_records_are_fixed_by_the_seed_and_their_loss_is_the_plain_mean_nll(synth_dir, tiny_path, tmp_path):
    held = runs.held_out(100, 0.1, seed=0)
    assert len(held) == 10 and held == runs.held_out(100, 0.1, seed=0) and held != runs.held_out(100, 0.1, seed=1)
    assert len(runs.held_out(8, 0.1, seed=0)) == 1 and runs.held_out(8, 0.0, seed=0) == set()
    with pytest.raises(data.UserError, match="--val-fraction"):
        runs.held_out(8, 1.0, seed=0)
    # a run's eval_loss: the mean token NLL of the held-out records' samples under its final adapter, computed
    # here by HF's own full-logits forward
    adapter = visrl.train(_config(synth_dir, tmp_path / "run", limit=10, max_steps=2, val_fraction=0.2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = data.read_records(synth_dir / "train.jsonl", limit=10)
    net, processor = model.load("tiny", str(adapter), device="cpu", dtype="float32")
    samples = [s for i in sorted(runs.held_out(10, 0.2, seed=0)) for s in
               chat.sft_samples(records[i], processor.tokenizer, processor.image_processor)]
    with torch.no_grad():
        logps = torch.cat([plain_token_logps(net, processor, s) for s in samples])
    assert rows[-1]["eval_loss"] == pytest.approx(-logps.mean().item(), rel=1e-4)
    assert rows[-1]["eval_tokens"] == sum(len(s.input_ids) for s in samples)  # only they were evaluated


def test_a_chain_keeps_the_convention_sft_was_given(synth_dir, pairs_file, tmp_path):
    """sft -> generate -> dpo 1 -> dpo 2 -> eval -> export: the prompt set, crop rule and pixel cap SFT was given
    (none of them the default) are recorded in its adapter and every later stage takes them without a flag."""
    import evaluate
    import export
    import generate

    chosen = {"prompts": "visrl", "crop": "vcot", "max_pixels": 300_000, "box_form": "square"}
    sft = visrl.train(visrl.SFTConfig(data=str(synth_dir / "train.jsonl"), out=str(tmp_path / "sft"), limit=8,
                                      max_steps=1, grad_accum=1, **chosen))
    generate.generate(generate.GenerateConfig(adapter=str(sft), data=str(synth_dir / "train.jsonl"), limit=2,
                                              out=str(tmp_path / "gen"), attempts=1, max_new_tokens=8))
    dpo1 = visrl.train(dpo.DPOConfig(data=str(pairs_file), stage=1, adapter=str(sft), out=str(tmp_path / "dpo1"),
                                     max_steps=1, grad_accum=1, limit=4, val_fraction=0.0))
    dpo2 = visrl.train(dpo.DPOConfig(data=str(pairs_file), stage=2, adapter=str(dpo1), out=str(tmp_path / "dpo2"),
                                     max_steps=1, grad_accum=1, limit=4, val_fraction=0.0))
    evaluate.evaluate(evaluate.EvalConfig(adapter=str(dpo2), data=str(synth_dir / "test.jsonl"), limit=2,
                                          out=str(tmp_path / "eval"), max_new_tokens=8, pictures=0))
    for run in ("sft", "gen", "dpo1", "dpo2", "eval"):
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert {k: config[k] for k in chosen} == chosen, run
    for adapter in (sft, dpo1, dpo2):
        assert model.read_adapter_config(adapter).convention == chosen
    # a flag that contradicts the adapter is an error naming both, unless asked for
    with pytest.raises(data.UserError, match=r"--crop raw: the adapter .*dpo2.* was trained with --crop vcot"):
        evaluate.evaluate(evaluate.EvalConfig(adapter=str(dpo2), data=str(synth_dir / "test.jsonl"), limit=2,
                                              out=str(tmp_path / "eval-raw"), crop="raw"))
    assert not (tmp_path / "eval-raw").exists()
    mixed = runs.resolve_convention(evaluate.EvalConfig(adapter=str(dpo2), crop="raw", mix_conventions=True))
    assert (mixed.crop, mixed.prompts, mixed.max_pixels) == ("raw", "visrl", 300_000)
    # an exported model keeps it too; with nothing recorded, upstream's defaults
    merged = export.export_command(export.ExportConfig(adapter=str(dpo2), out=str(tmp_path / "merged")))
    assert runs.convention_of(runs.resolve_convention(evaluate.EvalConfig(model=str(merged)))) == chosen
    assert runs.convention_of(runs.resolve_convention(evaluate.EvalConfig())) == runs.UPSTREAM_CONVENTION


def test_the_readme_layout_table_is_true_to_the_code():
    # every top-level module has a row, and its line count is the file's (`wc -l`)
    from pathlib import Path
    import re

    root = Path(__file__).resolve().parent.parent
    rows = dict(re.findall(r"^\| `(\w+\.py)` \|.*\| (\d+) \|$", (root / "README.md").read_text(), re.M))
    modules = {p.name: len(p.read_text().splitlines()) for p in root.glob("*.py")}
    assert set(rows) == set(modules)
    assert {name: int(n) for name, n in rows.items()} == modules
    assert max(modules.values()) <= 600, modules  # the redesign's bound: a module a reader holds in their head


def test_the_package_installs_every_module():
    # `pip install .` must carry every top-level module (a missing one breaks the installed commands)
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted(p.stem for p in root.glob("*.py"))


def test_modules_import_one_way_and_only_at_the_top():
    # the redesign's rule: no import cycle among the project's modules, and none imported inside a function
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    modules = {p.stem: ast.parse(p.read_text()) for p in root.glob("*.py")}

    def imported(node):  # the project modules an import statement names
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) else []
        return [n for n in names if n in modules]

    graph = {}
    for name, tree in modules.items():
        graph[name] = {m for node in tree.body for m in imported(node)}
        inner = [(node.lineno, m) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.ClassDef))
                 for node in ast.walk(fn) for m in imported(node)]
        assert not inner, f"{name}.py imports project modules inside a function: {inner}"

    def reaches(start, target, seen=()):
        return any(dep == target or (dep not in seen and reaches(dep, target, (*seen, dep))) for dep in graph[start])

    assert not [name for name in graph if reaches(name, name)], graph


def test_every_flag_says_what_it_does_and_its_default_and_the_stages_keep_to_40():
    import collections
    import warnings

    import tyro

    for name, (cls, _) in visrl.COMMANDS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            parser = tyro.extras.get_parser(cls)
        flags = [a for a in parser._actions if a.option_strings and "-h" not in a.option_strings]
        helps = collections.Counter(a.help for a in flags)
        for flag in flags:
            what = flag.help.replace("(required)", "").rsplit("(default", 1)[0].strip()
            assert what, f"{name} {flag.option_strings[0]}: no help text"
            assert helps[flag.help] == 1, f"{name} {flag.option_strings[0]}: its help is another flag's too"
            assert "(default: None)" not in flag.help, f"{name} {flag.option_strings[0]}: its default is not in words"
            assert "(default" in flag.help or "(required)" in flag.help, (name, flag.option_strings, flag.help)
        if name in ("sft", "dpo", "generate", "eval"):
            assert len(flags) <= 40, (name, len(flags))


@pytest.mark.parametrize("form", ["axis", "pixel"])
def test_every_box_form_runs_the_whole_chain(form, synth_dir, tmp_path, monkeypatch):
    """--box-form given to SFT alone: generate and dpo train in it, and eval, infer, serve and export take it from
    the adapter. Past training, a model that answers each page's true box in `form` (model.sample replaced) must
    be read back to that box by every one of them, and eval's scorer must count it right."""
    import base64
    import io
    import threading
    import urllib.request

    import evaluate
    import export
    import generate
    import serve

    train, test = str(synth_dir / "train.jsonl"), str(synth_dir / "test.jsonl")
    sft = visrl.train(visrl.SFTConfig(data=train, out=str(tmp_path / "sft"), limit=8, max_steps=1, grad_accum=1,
                                      box_form=form))
    generate.generate(generate.GenerateConfig(adapter=str(sft), data=train, limit=2, out=str(tmp_path / "gen"),
                                              attempts=1, max_new_tokens=8))
    processor = model.load_processor("tiny").image_processor
    records = data.read_records(train)[:4]
    with open(tmp_path / "pairs.jsonl", "w") as f:  # the true box against one nearer the corner, written in `form`
        for r in records:
            rejected = tuple(v / 4 for v in r.box)
            pair = data.Pair(r, chat.write_box(r.box, r.width, r.height, form, processor),
                             chat.write_box(rejected, r.width, r.height, form, processor), r.answer, "dotted", form)
            f.write(json.dumps(data.pair_json(pair, synth_dir)) + "\n")
    dpo2 = visrl.train(dpo.DPOConfig(data=str(tmp_path / "pairs.jsonl"), stage=2, adapter=str(sft), max_steps=1,
                                     grad_accum=1, out=str(tmp_path / "dpo2"), val_fraction=0.0))
    merged = export.export_command(export.ExportConfig(adapter=str(dpo2), out=str(tmp_path / "merged")))
    assert runs.resolve_convention(evaluate.EvalConfig(model=str(merged))).box_form == form

    tests = data.read_records(test)[:3]
    truth = {data.load_image(r).tobytes(): r.box for r in tests + records[:1]}

    def true_boxes(net, proc, prompts, *args, **kwargs):  # the focus step: the page's true box in `form`
        return [model.Reply(chat.write_box(truth[ims[0].tobytes()], *ims[0].size, form, processor)
                            if len(ims) == 1 else "dotted", 1, 1, "stop") for _, ims in prompts]

    monkeypatch.setattr(model, "sample", true_boxes)
    results = evaluate.evaluate(evaluate.EvalConfig(adapter=str(dpo2), data=test, limit=3, out=str(tmp_path / "eval"),
                                                    pictures=0))
    (scores,) = results["sets"].values()
    assert scores["detection"]["correct"] == 3  # read in `form`, scored in square text
    for run in ("sft", "gen", "dpo2", "eval"):
        assert json.loads((tmp_path / run / "config.json").read_text())["box_form"] == form, run
    image, r = data.load_image(records[0]), records[0]
    infer = evaluate.infer_command(evaluate.InferConfig(image=r.image, question=r.question, adapter=str(dpo2),
                                                        out=str(tmp_path / "infer.png")))
    assert chat.iou(infer["box"], r.box) > 0.95
    httpd, worker = serve.make_server(serve.ServeConfig(adapter=str(dpo2), port=0))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {"visual_cot": True, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": r.question}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        cot = json.loads(urllib.request.urlopen(request, timeout=120).read())["visual_cot"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        worker.stop()
    assert chat.iou(cot["box"], r.box) > 0.95


def test_the_schedule_is_hf_cosine_with_warmup_step_by_step_from_lr_0():
    """Upstream trains with HF Trainer's `lr_scheduler_type: cosine`, `warmup_ratio: 0.1` (configs/train_*.yaml):
    transformers' get_cosine_schedule_with_warmup over ceil(ratio x steps) warm-up steps (TrainingArguments.
    get_warmup_steps), whose first step runs at lr 0. Ours, stepped through an optimizer, against HF's own."""
    from transformers import get_cosine_schedule_with_warmup
    for total, ratio in ((6, 0.1), (30, 0.1), (25, 0.3), (10, 0.0), (1, 0.1)):
        ours, ours_scheduler = visrl.make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-4, total, ratio)
        theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        theirs_scheduler = get_cosine_schedule_with_warmup(theirs, math.ceil(total * ratio), total)
        for step in range(total):
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], abs=1e-15), (total, step)
            ours.step(), ours_scheduler.step(), theirs.step(), theirs_scheduler.step()
        assert ratio == 0.0 or visrl.cosine_schedule(0, total, ratio) == 0.0  # the first step moves nothing


def test_a_run_extended_by_max_steps_follows_its_new_schedule_from_the_resumed_step(synth_dir, tmp_path):
    """A finished run resumed with a larger --max-steps goes on with the longer cosine at its own step: the lr of each
    step equals a run made that long at once (the optimizer's saved lr, the old schedule's last, is not kept)."""
    visrl.train(_config(synth_dir, tmp_path / "long", max_steps=3, limit=8, batch_size=2))
    visrl.train(_config(synth_dir, tmp_path / "grown", max_steps=1, limit=8, batch_size=2))
    visrl.train(_config(synth_dir, tmp_path / "grown", max_steps=3, limit=8, batch_size=2, resume=True))
    lrs = lambda out: [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lrs(tmp_path / "grown") == pytest.approx(lrs(tmp_path / "long")) and len(set(lrs(tmp_path / "long"))) == 3
