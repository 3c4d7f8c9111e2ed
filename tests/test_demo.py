"""The whole-recipe demo: --quick runs every phase, writes the table and plots, and a rerun resumes."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
import dpo
import demo


def test_line_plot_draws_each_series(tmp_path):
    path = demo.line_plot({"a": [(1, 0.0), (2, 1.0)], "b": [(1, -1.0), (2, 2.0)]}, "t", tmp_path / "p.png")
    image = Image.open(path).convert("RGB")
    colors = set(image.getdata())
    assert demo._COLORS[0] in colors and demo._COLORS[1] in colors


def test_a_stage_1_run_with_the_answer_anchor_labels_its_answer_margins_as_not_preference_trained(tmp_path, monkeypatch):
    row = {"step": 1, "loss": 0.7, "dpo_term": 0.69, "nll_term": 0.01, "box/rewards/margins": 0.0,
           "answer/rewards/margins": 0.0}
    for stage, anchored in (("dpo1", True), ("dpo2", False)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        (tmp_path / stage / "config.json").write_text(json.dumps({"answer_anchor": anchored}))
    drawn = {}
    monkeypatch.setattr(demo, "line_plot", lambda series, title, path, **kw: drawn.setdefault(path.name, list(series)))
    demo.plot_curves(tmp_path)
    assert drawn["dpo1-margins.png"] == ["box step", "answer step (NLL anchor)"]
    assert drawn["dpo2-margins.png"] == ["box step", "answer step"]


def test_questions_for_the_rl_phases_carry_no_boxes(synth_dir, tmp_path):
    records = data.read_records(synth_dir / "train.jsonl")[:5]
    path = demo.write_questions_without_boxes(records, synth_dir / "q.jsonl")
    rows = [json.loads(line) for line in path.open()]
    assert all(not row.get("boxes") and not row.get("bboxs") for row in rows)
    back = data.read_records(path)
    assert [r.question for r in back] == [r.question for r in records] and all(r.box is None for r in back)
    assert [r.answers for r in back] == [r.answers for r in records]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.demo(demo.DemoConfig(out=str(out), quick=True, report_to="tensorboard"))


def test_quick_demo_runs_every_phase(quick_run):
    out, results = quick_run
    assert [p["phase"] for p in results["phases"]] == ["sft", "dpo stage 1", "dpo stage 2"]
    for p in results["phases"]:
        assert {"acc@0.5", "answer_acc", "direct_acc", "well_formed", "direct_well_formed"} <= p.keys()
        assert p["n_test"] == results["config"]["n_test"]
        assert (out / p["adapter"].split(str(out) + "/")[-1] / "adapter.safetensors").exists()
    # each DPO phase starts from the previous phase's adapter (and so is referenced against it)
    assert results["phases"][1]["from"] == results["phases"][0]["adapter"]
    assert results["phases"][2]["from"] == results["phases"][1]["adapter"]
    table = (out / "results.md").read_text()
    assert all(f"| {p['phase']} |" in table for p in results["phases"])
    for name in ("sft-loss", "round1-dpo1-loss", "round1-dpo1-margins", "round1-dpo2-loss", "round1-dpo2-margins"):
        assert Image.open(out / "plots" / f"{name}.png").size == (760, 440)
    # a DPO loss plot draws the preference term and the NLL term as two lines
    colors = set(Image.open(out / "plots" / "round1-dpo2-loss.png").convert("RGB").getdata())
    assert demo._COLORS[0] in colors and demo._COLORS[1] in colors
    # generation saw only box-free questions: its crop scores come from answers alone
    lines = [json.loads(line) for line in (out / "round1" / "generate" / "candidates.jsonl").open()]
    assert lines and all(line["crop_score_source"] == "answer from crop alone" and line["gt_box"] is None for line in lines)
    dpo2 = [json.loads(line) for line in (out / "round1" / "dpo2" / "metrics.jsonl").open()]
    assert all("answer/rewards/margins" in row and "box/rewards/margins" in row for row in dpo2)
    # SFT read the annotated records only; generation asked other records' questions
    sft_ids = {r.id for r in data.read_records(out / "data" / "train_sft.jsonl")}
    question_ids = {r.id for r in data.read_records(out / "data" / "questions_round1.jsonl")}
    assert len(sft_ids) == results["config"]["sft_records"] and question_ids and not sft_ids & question_ids
    sft_config = json.loads((out / "sft" / "config.json").read_text())
    assert sft_config["focus_first_steps"] == results["config"]["sft_focus_first_steps"] > 0
    # --report-to tensorboard reached every training phase: each one's losses, step by step, in its own directory
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for phase in ("sft", "round1/dpo1", "round1/dpo2"):
        events = EventAccumulator(str(out / phase / "tensorboard"))
        events.Reload()
        rows, losses = [json.loads(line) for line in (out / phase / "metrics.jsonl").open()], events.Scalars("loss")
        assert [e.step for e in losses] == [r["step"] for r in rows]
        assert [e.value for e in losses] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # float32 scalars


def test_quick_demo_rerun_skips_finished_phases(quick_run, capsys):
    out, results = quick_run
    again = demo.demo(demo.DemoConfig(out=str(out), quick=True))  # without --report-to: it changes no result
    assert again["phases"] == results["phases"]
    assert capsys.readouterr().out.count("done earlier") == 3
    with pytest.raises(data.UserError, match="other settings"):
        demo.demo(demo.DemoConfig(out=str(out), quick=True, seed=1))


def test_quick_demo_resumes_a_phase_that_was_stopped(quick_run, capsys):
    out, results = quick_run
    # as if DPO stage 2 had been stopped after its last checkpoint: no adapter, not in phases.json
    state = json.loads((out / "phases.json").read_text())
    state["phases"] = state["phases"][:2]
    (out / "phases.json").write_text(json.dumps(state))
    shutil.rmtree(out / "round1" / "dpo2" / "adapter")
    again = demo.demo(demo.DemoConfig(out=str(out), quick=True))
    assert capsys.readouterr().out.count("done earlier") == 2
    redone, before = again["phases"][2], results["phases"][2]
    assert redone["phase"] == "dpo stage 2" and (out / "round1" / "dpo2" / "adapter" / "adapter.safetensors").exists()
    # restored from the checkpoint: the same weights, so the same evaluation
    assert [redone[k] for k in ("acc@0.5", "answer_acc", "direct_acc")] == [before[k] for k in ("acc@0.5", "answer_acc", "direct_acc")]


def test_stage_commands_parse_back_to_the_configs_the_demo_means():
    import tyro

    import generate
    import visrl

    sft = demo.stage_args("sft", dict(data="d.jsonl", lr=0.002, crop_alone_samples=True, grad_checkpointing=False))
    assert sft[:2] == [demo.VISRL, "sft"]
    assert tyro.cli(visrl.SFTConfig, args=sft[2:]) == visrl.SFTConfig(data="d.jsonl", lr=0.002, crop_alone_samples=True,
                                                                      grad_checkpointing=False)
    dpo_args = demo.flag_args(dict(data="p.jsonl", stage=2, lr=5e-4, adapter="a", resume=True))
    assert tyro.cli(dpo.DPOConfig, args=dpo_args) == dpo.DPOConfig(data="p.jsonl", stage=2, lr=5e-4, adapter="a",
                                                                       resume=True)
    gen = dict(data="q.jsonl", attempts=2, out="o", temperature=1.0)
    assert tyro.cli(generate.GenerateConfig, args=demo.flag_args(gen)) == generate.GenerateConfig(**gen)


def test_the_demo_passes_report_to_to_every_training_phase(tmp_path, monkeypatch):
    import tyro

    import visrl

    cfg = demo.DemoConfig(out=str(tmp_path / "demo"), report_to="tensorboard")
    sft = demo.stage_args("sft", demo.sft_settings(cfg, tmp_path / "sft.jsonl"))
    parsed = tyro.cli(visrl.SFTConfig, args=sft[2:])
    assert (parsed.report_to, parsed.out) == ("tensorboard", str(tmp_path / "demo" / "sft"))  # the phase's own --out
    for stage in (1, 2):
        args = demo.flag_args(dict(data="p.jsonl", stage=stage, **demo.dpo_settings(cfg, stage)))
        assert tyro.cli(dpo.DPOConfig, args=args).report_to == "tensorboard"
    plain = demo.DemoConfig(out=str(tmp_path / "demo"))  # not given: the printed commands stay as they were
    assert "--report-to" not in demo.stage_args("sft", demo.sft_settings(plain, tmp_path / "sft.jsonl")) + \
        demo.flag_args(demo.dpo_settings(plain, 1)) + demo.flag_args(demo.dpo_settings(plain, 2))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed: one line, before the demo makes anything
    with pytest.raises(data.UserError, match=r"pip install 'visrl\[tensorboard\]'") as error:
        demo.demo(cfg)
    assert "\n" not in str(error.value) and not (tmp_path / "demo").exists()


def _stage_that_checkpoints_on_sigterm(tmp_path):
    """A stand-in stage script: it says when it is ready, and on SIGTERM writes 'checkpoint' and exits 0 (written
    beside the marker and renamed: a reader polling for the marker never sees it empty)."""
    marker, ready = tmp_path / "stopped", tmp_path / "ready"
    stage = tmp_path / "stage.py"
    written = tmp_path / "stopped.tmp"
    stage.write_text(
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(written)!r}).write_text('checkpoint'), "
        f"pathlib.Path({str(written)!r}).rename({str(marker)!r}), sys.exit(0)))\n"
        f"pathlib.Path({str(ready)!r}).write_text('')\n"
        "time.sleep(60)\n")
    return stage, marker, ready


def test_a_stage_gets_the_signal_and_the_demo_waits_for_it(tmp_path):
    # SIGTERM to the demo reaches the running stage (which checkpoints and exits in the real one); the demo
    # waits for it instead of dying and leaving it behind
    import os
    import signal
    import threading

    stage, marker, ready = _stage_that_checkpoints_on_sigterm(tmp_path)

    def terminate_when_ready():
        while not ready.exists():
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    threading.Thread(target=terminate_when_ready, daemon=True).start()
    demo.run_stage([str(stage), "sft"])  # returns: the stage exited 0 after its handler ran
    assert marker.read_text() == "checkpoint"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the demo's own again


def test_a_stage_is_told_to_stop_when_the_demo_is_killed(tmp_path):
    # SIGKILL to the demo (no handler runs): the kernel sends its running stage SIGTERM, so the stage checkpoints
    # and exits instead of writing its run on with nobody to read it
    import subprocess
    import sys
    import time

    stage, marker, ready = _stage_that_checkpoints_on_sigterm(tmp_path)
    root = str(Path(demo.__file__).parent)
    parent = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); import demo; "
                               f"demo.run_stage([{str(stage)!r}, 'sft'])"])
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "checkpoint"
