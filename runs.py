"""The rules every entry point shares: the flags of every stage (`RunConfig`, and `ConventionArgs`: prompts, crop,
pixel cap, box form), `--out` guards that never destroy what a command did not create, the run's config.json,
and one-line errors for expected failures (`cli`).
"""

import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data import UserError

# -----------------------------------------------------------------------------
# entry points: an expected error is one line a user can act on; an --out never destroys an input or a run

@dataclass
class ConventionArgs:
    """How every stage shows the model a record. Unset: as the adapter (or exported model) recorded it, else
    upstream VisRL's; a chain of stages keeps one convention (model.resolve_convention)."""

    # upstream: each stage's instruction as VisRL asks it, `<|vision_end|>\n` before the text; visrl: the focus
    # instruction for every box step, no newline (a box prompt that never changes between SFT and DPO)
    prompts: Literal["upstream", "visrl"] | None = None
    crop: Literal["raw", "vcot"] | None = None  # the answer step's crop: the box (upstream) or Visual-CoT's >= 224 px
    max_pixels: int | None = None  # images downsized (NEAREST) to at most this many pixels; 0: no cap (upstream 512*512)
    box_form: Literal["square", "axis", "pixel"] | None = None  # how boxes are written as text (upstream: square)
    mix_conventions: bool = False  # allow a flag above to differ from what the adapter was trained with


@dataclass
class RunConfig(ConventionArgs):
    """What every pipeline stage (sft, generate, dpo, eval) is told: the model, the data, where its run goes."""

    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl` (built on first use)
    adapter: str | None = None  # a trained adapter, merged into the base first (with its parent chain)
    data: str = "synth"  # records: Visual-CoT .jsonl/.json or ours, a directory with <split>.jsonl, or `synth`
    image_root: str | None = None  # image paths are relative to this (default: the data file's directory)
    out: str = "runs/out"  # the run's directory (each command has its own default)
    limit: int | None = None  # the first N records only
    seed: int = 0
    skip_bad_records: bool = False  # skip (and report) malformed records instead of stopping
    # replace the run in --out (only this command's files); without it generate and eval resume a rerun with the
    # same settings, sft and dpo refuse one unless --resume
    overwrite: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


def cli(parse, run) -> None:
    """Run an entry point: run(parse()). An expected error (UserError) prints `error: <message>` once (rank 0
    under torchrun) and exits 2; anything else is a bug and keeps its traceback. `--debug` anywhere on the
    command line, or VISRL_DEBUG=1, prints the traceback of expected errors too."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("VISRL_DEBUG", "0") not in ("", "0")
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--debug"]
    try:
        run(parse())
    except UserError as e:
        if debug:
            traceback.print_exc()
        if int(os.environ.get("RANK", "0")) == 0 or debug:  # every rank meets the same check: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents

def check_out(out, run_files, *, inputs=(), data_files=(), resume=False, overwrite=False,
              resumable=True) -> list[Path]:
    """Refuse an --out that would destroy what this invocation did not create; returns the files of an earlier
    run that --overwrite replaces (delete them with `clear_run` once every input has been checked).

    inputs: directories read (model, adapter and its parents): --out may not equal, contain or lie inside one.
    data_files: files read: --out may not hold one. run_files: the names this command writes into --out;
    if any exists, --out holds a run: --resume continues it, --overwrite replaces it, else an error."""
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    resolved = out_path.resolve()
    for name, path in inputs:
        if path is not None and _overlaps(resolved, Path(path).resolve()):
            raise UserError(f"--out {out} overlaps the {name} {path}: choose a directory outside it")
    for name, path in data_files:
        if path is not None and resolved in Path(path).resolve().parents:
            raise UserError(f"--out {out} holds the {name} {path}: choose another directory")
    found = [resolved / f for f in run_files if (resolved / f).exists()]
    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if found and not resume and not overwrite:
        ways = "pass --resume to continue it or --overwrite to replace it" if resumable else "pass --overwrite to replace it"
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise UserError(f"--out {out} already holds a run ({names}); {ways} (or choose another --out)")
    return found if overwrite else []

def check_settings(out, command: str, settings: dict, keys, how: str) -> None:
    """Refuse to go on with the run in --out when its config.json was written by another command, or by this one
    with other values of `keys` (what a rerun must keep); `how` says how this command goes on with a run."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); pass --overwrite to replace the run, or choose another --out")
    if not isinstance(old, dict):
        raise UserError(f"{path}: not a run's config; pass --overwrite to replace the run, or choose another --out")
    if old.get("command", command) != command:
        raise UserError(f"--out {out} holds a `{old['command']}` run, not a `{command}` one; choose another --out")
    changed = [k for k in keys if old.get(k, settings[k]) != settings[k]]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {settings[k]!r}" for k in changed)
        raise UserError(f"--out {out} holds a run made with other settings ({detail}); {how} with the same "
                        "settings, pass --overwrite to replace it, or choose another --out")

def write_config(out, command: str, settings: dict) -> None:
    """<out>/config.json: the command and its settings, written whole (a kill leaves the old one or the new)."""
    path = Path(out) / "config.json"
    tmp = path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps({"command": command, **settings}, indent=2), encoding="utf-8")
    os.replace(tmp, path)

def clear_run(paths: list[Path]) -> None:
    """Delete an earlier run's files (what check_out returned for --overwrite)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
