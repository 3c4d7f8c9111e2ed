"""Tests for runs.py: --out guards, one-line CLI errors."""

import dataclasses
import os
import subprocess
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


def test_a_locked_out_refuses_a_second_writer_until_its_holder_is_gone(tmp_path):
    run = tmp_path / "run"
    assert runs.RunLock(run, "sft").take(create=False).file is None and not run.exists()  # a refused command makes nothing
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import runs; "
                               "lock = runs.RunLock(sys.argv[2], 'sft').take(); print('locked', flush=True); time.sleep(600)",
                               str(Path(__file__).resolve().parents[1]), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for create in (False, True):
            with pytest.raises(data.UserError, match=rf"--out {run} is being written by `sft` \(pid {holder.pid}\)"):
                runs.RunLock(run, "dpo").take(create)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock with the process
        holder.wait()
    with runs.RunLock(run, "dpo").take() as lock:
        assert (run / runs.LOCK_FILE).read_text() == f"`dpo` (pid {os.getpid()})\n"
        with pytest.raises(data.UserError, match="being written by `dpo`"):  # a second holder in this process too
            runs.RunLock(run, "eval").take()
    assert lock.file is None
    runs.RunLock(run, "eval").take().release()  # released on leaving the block


def test_a_rerun_may_change_only_what_its_config_declares(tmp_path):
    @dataclasses.dataclass
    class Config(runs.RunConfig):
        lr: float = 0.1
        workers: int = 2
        rerun_may_change = runs.RunConfig.rerun_may_change + ("workers",)

    runs.write_config(tmp_path, "cmd", Config())
    runs.check_rerun(tmp_path, "cmd", Config(workers=8, overwrite=True), "rerun it")  # declared, and the base's
    with pytest.raises(data.UserError, match=r"other settings \(--lr 0.1 -> 0.2\); rerun it with the same settings"):
        runs.check_rerun(tmp_path, "cmd", Config(lr=0.2), "rerun it")
    with pytest.raises(data.UserError, match="holds a `cmd` run, not a `other` one"):
        runs.check_rerun(tmp_path, "other", Config(), "rerun it")
    runs.check_rerun(tmp_path / "fresh", "cmd", Config(lr=0.3), "rerun it")  # nothing there yet: anything goes
