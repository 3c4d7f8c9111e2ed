"""Tests for runs.py: --out guards, one-line CLI errors."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import runs  # noqa: E402


def test_check_out_refuses_overlaps_and_earlier_runs(tmp_path):
    model_dir, run = tmp_path / "model", tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for out in (model_dir, model_dir / "sub", tmp_path):
        with pytest.raises(data.UserError, match="overlaps the --model"):
            runs.check_out(out, ("adapter",), inputs=[("--model", model_dir)])
    with pytest.raises(data.UserError, match="holds the --data"):
        runs.check_out(tmp_path, ("adapter",), data_files=[("--data", model_dir / "config.json")])
    assert runs.check_out(run, ("adapter", "metrics.jsonl")) == []  # a fresh --out
    (run / "adapter").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(data.UserError, match=r"already holds a run \(adapter\); pass --resume .* or --overwrite"):
        runs.check_out(run, ("adapter", "metrics.jsonl"))
    assert runs.check_out(run, ("adapter", "metrics.jsonl"), resume=True) == []
    with pytest.raises(data.UserError, match="pass one of them"):
        runs.check_out(run, ("adapter",), resume=True, overwrite=True)
    replaced = runs.check_out(run, ("adapter", "metrics.jsonl"), overwrite=True)
    assert replaced == [(run / "adapter").resolve()]
    runs.clear_run(replaced)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only the run's own files go
    with pytest.raises(data.UserError, match="is a file"):
        runs.check_out(run / "notes.txt", ("adapter",))


def test_cli_prints_expected_errors_on_one_line_and_keeps_bugs_loud(monkeypatch, capsys):
    def fail(_):
        raise data.DataError("x.jsonl:3: field 'image': missing")

    monkeypatch.setattr(sys, "argv", ["visrl.py"])
    monkeypatch.delenv("VISRL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        runs.cli(lambda: None, fail)
    assert e.value.code == 2 and capsys.readouterr().err == "error: x.jsonl:3: field 'image': missing\n"
    monkeypatch.setattr(sys, "argv", ["visrl.py", "--debug"])
    with pytest.raises(SystemExit):
        runs.cli(lambda: None, fail)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: x.jsonl:3: field 'image': missing\n")
    monkeypatch.setattr(sys, "argv", ["visrl.py"])
    monkeypatch.setenv("RANK", "1")  # other ranks meet the same check: rank 0 says it
    with pytest.raises(SystemExit):
        runs.cli(lambda: None, fail)
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyError):  # a bug is not caught
        runs.cli(lambda: None, lambda _: {}["missing"])
