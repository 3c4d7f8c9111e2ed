"""Several processes and interrupted runs: torchrun on CPU/gloo, checkpoints, resume, signals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runs
import visrl
from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_reduce_to_the_single_process_gradients(synth_dir, tmp_path):
    train = str(synth_dir / "train.jsonl")
    _run([sys.executable, "tests/dist_grads.py", str(tmp_path / "one.safetensors"), train, "4"])
    _run(TORCHRUN + ["tests/dist_grads.py", str(tmp_path / "two.safetensors"), train, "2"])
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:  # the same global batch of 4; fp32, summation order differs across ranks
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5 * one[name].abs().max().item())


def _sft_cmd(synth_dir, out, *extra):
    return [str(synth_dir / "train.jsonl"), "--out", str(out), "--lr", "1e-3", "--limit", "16", *extra]


def test_two_rank_losses_match_one_rank(synth_dir, tmp_path):
    _run([sys.executable, "visrl.py", "sft", "--grad-accum", "1", "--data"] + _sft_cmd(synth_dir, tmp_path / "one", "--batch-size", "4",
                                                                  "--max-steps", "3"))
    _run(TORCHRUN + ["visrl.py", "sft", "--grad-accum", "1", "--data"] + _sft_cmd(synth_dir, tmp_path / "two", "--batch-size", "2",
                                                             "--max-steps", "3"))
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def _wait_for(predicate, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigkill_then_resume_gives_the_same_losses(synth_dir, tmp_path):
    base = [sys.executable, "visrl.py", "sft", "--grad-accum", "1", "--data"]
    steps = ["--max-steps", "8", "--save-every", "2", "--batch-size", "2"]
    _run(base + _sft_cmd(synth_dir, tmp_path / "whole", *steps))
    proc = subprocess.Popen(base + _sft_cmd(synth_dir, tmp_path / "killed", *steps), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "killed" / "checkpoints" / "step_00000004" / "meta.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_rows(tmp_path / "killed"))
    assert 4 <= killed_at < 8  # died mid-run, after the step-4 checkpoint
    _run(base + _sft_cmd(synth_dir, tmp_path / "killed", *steps, "--resume"))
    whole, resumed = _rows(tmp_path / "whole"), _rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 9))  # no duplicates, nothing lost
    for a, b in zip(whole, resumed):
        assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"]  # exact: fp32 CPU is deterministic
    assert (tmp_path / "killed" / "adapter" / "adapter.safetensors").exists()


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(synth_dir, tmp_path):
    cmd = [sys.executable, "visrl.py", "sft", "--grad-accum", "1", "--data"] + _sft_cmd(synth_dir, tmp_path / "run", "--max-steps", "40",
                                                                   "--batch-size", "2")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    checkpoint = visrl.latest_checkpoint(tmp_path / "run")
    stopped_at = json.loads((checkpoint / "meta.json").read_text())["step"]
    assert stopped_at == len(_rows(tmp_path / "run")) < 40
    assert not (tmp_path / "run" / "adapter").exists()  # no final adapter from an unfinished run
    _run(cmd + ["--resume"])
    assert [r["step"] for r in _rows(tmp_path / "run")] == list(range(1, 41))


def test_a_torn_checkpoint_write_leaves_the_previous_one(synth_dir, tmp_path):
    out = tmp_path / "run"
    visrl.train(visrl.SFTConfig(grad_accum=1, data=str(synth_dir / "train.jsonl"), out=str(out), max_steps=4, save_every=2,
                              batch_size=2, limit=16, lr=1e-3))
    good = visrl.latest_checkpoint(out)
    assert good.name == "step_00000004"
    # a write killed half-way: a temporary directory with some shards and no meta.json
    torn = out / "checkpoints" / ".tmp_step_00000006"
    shutil.copytree(good, torn)
    (torn / "meta.json").unlink()
    shard = next(torn.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert visrl.latest_checkpoint(out) == good
    visrl.train(visrl.SFTConfig(grad_accum=1, data=str(synth_dir / "train.jsonl"), out=str(out), max_steps=6, save_every=2,
                              batch_size=2, limit=16, lr=1e-3, resume=True))
    assert [r["step"] for r in _rows(out)] == list(range(1, 7))
    assert visrl.latest_checkpoint(out).name == "step_00000006"
    assert not torn.exists()


def test_two_rank_fsdp_dpo_matches_one_rank(pairs_file, tmp_path):
    common = ["visrl.py", "dpo", "--grad-accum", "1", "--data", str(pairs_file), "--stage", "2", "--max-steps", "2", "--lr", "1e-3",
              "--warmup-ratio", "0"]  # (warm-up's first step is at lr 0: both steps move here)
    _run([sys.executable] + common + ["--out", str(tmp_path / "one"), "--batch-size", "2"])
    _run(TORCHRUN + common + ["--out", str(tmp_path / "two"), "--batch-size", "1"])  # FSDP2 by default
    # and two full rows per pair with a reference pass per step: packing and the precomputed table change nothing
    _run([sys.executable] + common + ["--out", str(tmp_path / "rows"), "--batch-size", "2", "--no-reuse"])
    for a, b, c in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two"), _rows(tmp_path / "rows")):
        for key in ("loss", "box/loss", "answer/loss", "answer/rewards/margins"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
            assert c[key] == pytest.approx(a[key], abs=1e-5), key
    one = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")  # gathered from both ranks' shards
    assert one.keys() == two.keys()
    # Adam divides by sqrt(v): an element whose gradient is ~0 can move by up to lr per step on
    # float-rounding noise, so a few may differ by <= 2 steps x lr; all the others agree to 1e-5
    # (a wrong gather, e.g. zeros for the other rank's shard, would break the kaiming-sized A factors).
    for name in one:
        diff = (two[name] - one[name]).abs()
        assert diff.max() <= 2 * 1e-3 + 1e-6, name
        assert (diff <= 1e-5).float().mean() >= 0.995, name


def _run_saying_why(cmd):
    """_run, and a failure shows the command, its exit status and its whole stderr (the ranks' own lines, such as
    a rank's traceback or "terminate called ...", come before torchrun's summary, past the last 3000 characters)."""
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    stderr = result.stderr if len(result.stderr) <= 20000 else result.stderr[:10000] + "\n[...]\n" + result.stderr[-10000:]
    assert result.returncode == 0, f"`{' '.join(cmd)}` exited with {result.returncode}; its stderr:\n{stderr}"
    return result


def test_generation_under_fsdp_matches_one_process(synth_dir, tmp_path):
    """The one-process run goes first: the ranks find the tiny checkpoint built (two ranks building it at once
    can cache a copy without weights)."""
    train = str(synth_dir / "train.jsonl")
    _run_saying_why([sys.executable, "tests/dist_generate.py", str(tmp_path / "one.json"), train])
    _run_saying_why(TORCHRUN + ["tests/dist_generate.py", str(tmp_path / "two.json"), train])
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert one == two and len(one) == 2


def test_fsdp_sigterm_then_resume_continues_exactly(synth_dir, tmp_path):
    """Two FSDP2 ranks under torchrun: SIGTERM mid-run (torchrun forwards it), then --resume; the
    resumed steps' losses equal a straight run's (sharded checkpoint through DCP)."""
    base = TORCHRUN + ["visrl.py", "sft", "--grad-accum", "1", "--data"]
    steps = ["--batch-size", "2", "--max-steps", "30"]
    _run(base + _sft_cmd(synth_dir, tmp_path / "whole", *steps))
    proc = subprocess.Popen(base + _sft_cmd(synth_dir, tmp_path / "split", *steps), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "split" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    checkpoint = visrl.latest_checkpoint(tmp_path / "split")
    assert checkpoint is not None, proc.stderr.read()[-3000:]
    stopped_at = json.loads((checkpoint / "meta.json").read_text())["step"]
    assert 2 <= stopped_at < 30
    _run(base + _sft_cmd(synth_dir, tmp_path / "split", *steps, "--resume"))
    whole, split = _rows(tmp_path / "whole"), _rows(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 31))
    for a, b in zip(whole, split):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)


def test_an_expected_error_under_torchrun_is_said_once(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    result = subprocess.run(TORCHRUN + ["visrl.py", "sft", "--grad-accum", "1", "--data", str(bad), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0
    assert result.stderr.count(f"error: 1 bad record(s) in {bad}") == 1, result.stderr[-3000:]
    assert f"{bad}:1: field 'image': missing" in result.stderr
    # torchrun's launcher adds its own failure summary (a traceback of torch.distributed.run); none from visrl
    assert not any(name in result.stderr for name in ('visrl.py", line', 'data.py", line', 'dpo.py", line'))
    assert not (tmp_path / "run").exists()


def test_a_second_process_on_a_run_being_written_is_refused_and_the_lock_dies_with_its_holder(synth_dir, tmp_path):
    """`sft --resume --out R` while another process still writes R stops with one line naming the holder, before
    writing anything; once the holder is SIGKILLed (no cleanup runs), --resume continues the run."""
    base = [sys.executable, "visrl.py", "sft", "--grad-accum", "1", "--data"]
    out = tmp_path / "run"
    first = subprocess.Popen(base + _sft_cmd(synth_dir, out, "--max-steps", "5000", "--save-every", "2"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "checkpoints" / "step_00000002" / "meta.json").exists(), first)
        second = subprocess.run(base + _sft_cmd(synth_dir, out, "--max-steps", "5000", "--save-every", "2", "--resume"),
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.kill()
        first.wait()
    assert_one_line_error(second.returncode, second.stderr, f"--out {out} is being written by `sft` (pid {first.pid})")
    resume_at = json.loads((visrl.latest_checkpoint(out) / "meta.json").read_text())["step"]
    _run(base + _sft_cmd(synth_dir, out, "--max-steps", str(resume_at + 2), "--save-every", "2", "--resume"))
    assert [r["step"] for r in _rows(out)] == list(range(1, resume_at + 3))


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds text (zombies, which a container's init may never reap, excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            alive = proc.name.isdigit() and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if alive and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:  # it ended meanwhile
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ranks_die_with_their_launcher(synth_dir, tmp_path):
    """SIGKILL to torchrun and its process group: torchrun starts its ranks in a session of their own, so the
    group's signal misses them; their parent-death signal ends them, the run stops being written, its lock is free."""
    out = tmp_path / "run"
    launcher = subprocess.Popen(TORCHRUN + ["visrl.py", "sft", "--grad-accum", "1", "--batch-size", "2", "--data"]
                                + _sft_cmd(synth_dir, out, "--max-steps", "5000"), cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, launcher)
    ranks = [pid for pid in _processes_naming("visrl.py sft --grad-accum 1 --batch-size 2 --data") if pid != launcher.pid]
    assert len(ranks) == 2, ranks
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 60
    while set(ranks) & set(_processes_naming(str(out))) and time.time() < deadline:
        time.sleep(0.1)
    assert not set(ranks) & set(_processes_naming(str(out))), "ranks outlived their launcher"
    written = metrics.stat().st_size
    time.sleep(2)
    assert metrics.stat().st_size == written
    runs.RunLock(out, "sft").take().release()  # nobody holds the lock any more


# Two bf16 runs of the same global batch: one process without checkpointing, and two FSDP2 ranks with each decoder
# layer checkpointed. Checkpointing recomputes the same forward bit for bit; what differs is rounding: the ranks'
# gradients are summed in another order and the matmuls see 1 row instead of 2, each result rounded to bf16 (unit
# roundoff 2^-8 = 0.4%). So the first step agrees exactly and later steps to 1% (2.5 bf16 roundings), while the
# losses themselves move by far more than that from step to step (asserted): a wrong step would not pass.
BF16_REL = 0.01


def _bf16_pair(common, one_extra, two_extra, tmp_path):
    _run([sys.executable] + common + ["--out", str(tmp_path / "one"), "--dtype", "bfloat16"] + one_extra)
    _run(TORCHRUN + common + ["--out", str(tmp_path / "two"), "--dtype", "bfloat16", "--grad-checkpointing"]
         + two_extra)
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert json.loads((tmp_path / "two" / "config.json").read_text())["grad_checkpointing"] is True
    assert abs(one[1]["loss"] - one[0]["loss"]) > 10 * BF16_REL * abs(one[0]["loss"])  # the steps do move
    assert two[0]["loss"] == one[0]["loss"]
    return one, two


def test_fsdp2_checkpointing_and_bf16_sft_matches_one_plain_process(synth_dir, tmp_path):
    common = ["visrl.py", "sft", "--grad-accum", "1", "--data", str(synth_dir / "train.jsonl"), "--lr", "1e-3",
              "--limit", "16", "--max-steps", "3", "--warmup-ratio", "0"]
    one, two = _bf16_pair(common, ["--batch-size", "4"], ["--batch-size", "2"], tmp_path)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=BF16_REL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=BF16_REL)


def test_fsdp2_checkpointing_and_bf16_dpo_stage_2_matches_one_plain_process(pairs_file, tmp_path):
    common = ["visrl.py", "dpo", "--grad-accum", "1", "--data", str(pairs_file), "--stage", "2", "--max-steps", "3",
              "--lr", "1e-3", "--warmup-ratio", "0"]
    one, two = _bf16_pair(common, ["--batch-size", "2"], ["--batch-size", "1"], tmp_path)
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=BF16_REL), key
        # a kind's loss falls towards 0 as its margin grows (-log sigmoid), and a margin starts at 0: compared on the
        # scale of the first step's loss, ln 2, or of the margin once it is larger, not relatively
        for key in ("box/loss", "answer/loss", "box/rewards/margins", "answer/rewards/margins"):
            assert b[key] == pytest.approx(a[key], abs=BF16_REL * max(0.6931, abs(a[key]))), key


@pytest.mark.parametrize("name", ["tiny-qwen3-vl", "tiny-qwen3.5"])
def test_two_rank_fsdp_on_the_qwen3_families_matches_one_rank(name, pairs_file, tmp_path):
    """FSDP2 over 2 ranks equals one process on Qwen3-VL (DeepStack features, packed pairs) and Qwen3.5 (linear-
    attention layers, two rows per pair): DPO stage 2, each step's losses."""
    common = ["visrl.py", "dpo", "--model", name, "--grad-accum", "1", "--data", str(pairs_file), "--stage", "2",
              "--max-steps", "2", "--lr", "1e-3", "--warmup-ratio", "0", "--val-fraction", "0"]
    _run([sys.executable] + common + ["--out", str(tmp_path / "one"), "--batch-size", "2"])
    _run(TORCHRUN + common + ["--out", str(tmp_path / "two"), "--batch-size", "1"])
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == len(two) == 2 and one[1]["loss"] != one[0]["loss"]
    for a, b in zip(one, two):
        for key in ("loss", "box/loss", "answer/loss", "answer/rewards/margins"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
