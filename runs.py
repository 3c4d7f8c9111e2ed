"""The rules every entry point shares: the flags of every stage (`RunConfig`, `ConventionArgs`), `--out` guards that
never destroy what a command did not create, the one rerun rule (`check_rerun`, `rerun_may_change`), the lock a run
directory holds while a process writes it, the held-out split, and one-line errors for expected failures (`cli`).
"""

import ctypes
import dataclasses
import fcntl
import json
import math
import os
import random
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import tyro

from data import UserError

UPSTREAM_MAX_PIXELS = 512 * 512  # LLaMA-Factory's `image_resolution` default, which VisRL trains with
# the convention a run takes when neither its flags nor its adapter say otherwise
UPSTREAM_CONVENTION = {"prompts": "upstream", "crop": "raw", "max_pixels": UPSTREAM_MAX_PIXELS, "box_form": "square"}

def default(words: str):
    """A flag's default said in words, for flags whose value is None until something else decides it."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {words})")

INHERITED = default("as the adapter or exported model recorded it, else upstream's")

@dataclass
class ConventionArgs:
    """How every stage shows the model a record. Unset: as the adapter (or exported model) recorded it, else upstream
    VisRL's; a chain of stages keeps one convention (resolve_convention)."""

    # upstream: each stage's instruction as VisRL asks it, `<|vision_end|>\n` before the text; visrl: the focus
    # instruction for every box step, no newline (a box prompt that never changes between SFT and DPO)
    prompts: Annotated[Literal["upstream", "visrl"] | None, INHERITED] = None
    # the answer step's crop: the box itself (raw, upstream's) or Visual-CoT's >= 224 px window around it (vcot)
    crop: Annotated[Literal["raw", "vcot"] | None, INHERITED] = None
    # images downsized (NEAREST) to at most this many pixels before the processor; 0: no cap (upstream: 512*512)
    max_pixels: Annotated[int | None, INHERITED] = None
    # how boxes are written as text: square-normalised (upstream's, the benchmark's), axis-normalised, pixels of
    # the resized image the model sees (Qwen2.5-VL's own grounding form), or integers 0-1000 of each side
    # (Qwen3-VL's and Qwen3.5's)
    box_form: Annotated[Literal["square", "axis", "pixel", "rel1000"] | None, INHERITED] = None
    mix_conventions: bool = False  # let a flag above differ from what the adapter was trained with

@dataclass
class RunConfig(ConventionArgs):
    """What every pipeline stage (sft, generate, dpo, eval) is told: the model, the data, where its run goes."""

    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl` / `tiny-qwen3-vl` / `tiny-qwen3.5`
    # a trained adapter, merged into the base first (with its parent chain)
    adapter: Annotated[str | None, default("none: the base model alone")] = None
    data: str = "synth"  # records: Visual-CoT .jsonl/.json or ours, a directory with <split>.jsonl, or `synth`
    image_root: Annotated[str | None, default("the data file's directory")] = None  # the root of relative image paths
    out: str = "runs/out"  # the run's directory
    limit: Annotated[int | None, default("every record")] = None  # read the first N records only
    seed: int = 0  # data order, held-out split, sampling
    skip_bad_records: bool = False  # skip (and report) malformed records instead of stopping
    # replace the run in --out (only this command's files); without it generate and eval resume a rerun with the
    # same settings, sft and dpo refuse one unless --resume
    overwrite: bool = False
    # weights' dtype: auto is bfloat16 on a GPU (adapters stay float32), float32 on the CPU. The device is the GPU
    # when torch sees one (under torchrun, the rank's own), else the CPU: `CUDA_VISIBLE_DEVICES=` runs on the CPU
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    # what a rerun into the same --out (or --resume) may change; every other setting must be what the run in --out
    # was made with (check_rerun). Each command's config extends it.
    rerun_may_change: ClassVar[tuple[str, ...]] = ("out", "overwrite", "mix_conventions")

def read_json(path, what: str) -> dict:
    """A JSON object from a file we read as input; any failure is a UserError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what}: {e}") from e
    if not isinstance(value, dict):
        raise UserError(f"{path}: the {what} is not a JSON object")
    return value

CONVENTION_FILE = "visrl_convention.json"  # an exported model's convention (export.py writes it)

def recorded_convention(model: str, adapter: str | None) -> tuple[dict, str]:
    """The convention the adapter (else an exported model) was trained with, and where it was read; {} if none."""
    if adapter:
        path = Path(adapter) / "adapter_config.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; {adapter} is not an adapter directory")
        return read_json(path, "adapter config").get("convention") or {}, f"the adapter {adapter}"
    path = Path(model) / CONVENTION_FILE  # the built-in tiny models have none
    return (read_json(path, "convention") if path.is_file() else {}), f"the model {model}"

def resolve_convention(cfg):
    """cfg with its convention (ConventionArgs) resolved: as given, else as the adapter or exported model recorded it,
    else upstream VisRL's. A given value that contradicts the record is an error unless --mix-conventions: a chain
    sft -> generate -> dpo -> eval uses one prompt set, crop, pixel cap, box form."""
    recorded, where = recorded_convention(cfg.model, cfg.adapter)
    values = {}
    for name, upstream in UPSTREAM_CONVENTION.items():
        given, had = getattr(cfg, name), recorded.get(name)
        if given is not None and had is not None and given != had and not cfg.mix_conventions:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {given}: {where} was trained with {flag} {had}; a chain keeps one "
                            f"convention (leave {flag} out, or add --mix-conventions to mean it)")
        values[name] = given if given is not None else had if had is not None else upstream
    return dataclasses.replace(cfg, **values)

def convention_of(cfg) -> dict:
    """The resolved convention as recorded in an adapter config or an export."""
    return {name: getattr(cfg, name) for name in UPSTREAM_CONVENTION}

# -----------------------------------------------------------------------------
# entry points: an expected error is one line a user can act on; an --out never destroys an input or a run

def cli(parse, run) -> None:
    """run(parse()): an expected error (UserError) prints `error: <message>` once (rank 0 under torchrun) and exits 2,
    a bug keeps its traceback; `--debug` anywhere in argv, or VISRL_DEBUG=1, prints expected errors' tracebacks too."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("VISRL_DEBUG", "0") not in ("", "0")
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--debug"]
    try:
        run(parse())
        leave_process_group()
    except UserError as e:
        if debug:
            traceback.print_exc()
        if int(os.environ.get("RANK", "0")) == 0 or debug:  # every rank meets the same check: say it once
            print(f"error: {e}", file=sys.stderr)
        leave_process_group(2)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

def leave_process_group(code: int = 0) -> None:
    """A rank that finished (or refused) its work exits with `code` here, streams flushed, without the interpreter's
    teardown (no-op outside a process group). A gloo worker thread may still be freeing the last collective's
    tensors, which takes the GIL; a thread taking it while the interpreter finalizes is ended inside a noexcept
    destructor: std::terminate ("terminate called without an active exception"), SIGABRT, and torchrun reports a
    finished run as failed (9 of 40 runs of a generating worker on 2 cores). destroy_process_group would join those
    threads, but with torch.distributed.fsdp imported the gloo backend outlives it (torch 2.13)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents

def check_out(out, run_files, *, inputs=(), data_files=(), resume=False, overwrite=False, resumable=True) -> list[Path]:
    """Refuse an --out that would destroy what this invocation did not create; returns the files of an earlier run
    that --overwrite replaces (delete them with `clear_run` once every input has been checked). --out may not equal,
    contain or lie inside one of `inputs` (directories read), nor hold one of `data_files` (files read); if it holds
    one of `run_files` (what this command writes), --resume continues that run, --overwrite replaces it, else error."""
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
        ways = ("pass --resume to continue it or " if resumable else "pass ") + "--overwrite to replace it"
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise UserError(f"--out {out} already holds a run ({names}); {ways} (or choose another --out)")
    return found if overwrite else []

def check_rerun(out, command: str, cfg, how: str) -> None:
    """The one rerun rule: refuse the run in --out if its config.json is another command's, or differs in a setting
    that type(cfg).rerun_may_change does not list; `how` is how this command goes on with a run ("--resume it")."""
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
    settings = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as config.json holds them: a tuple is a list
    changed = [k for k in settings if k not in cfg.rerun_may_change and old.get(k, settings[k]) != settings[k]]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {settings[k]!r}" for k in changed)
        raise UserError(f"--out {out} holds a run made with other settings ({detail}); {how} with the same "
                        "settings, pass --overwrite to replace it, or choose another --out")

def write_config(out, command: str, cfg, decoding: dict | None = None) -> None:
    """<out>/config.json: the command and its settings (and, for an in-process model's replies, model.decoding's
    configuration), written whole (a kill leaves the old one or the new)."""
    path = Path(out) / "config.json"
    tmp = path.with_name(".config.json.tmp")
    extra = {} if decoding is None else {"decoding": decoding}
    tmp.write_text(json.dumps({"command": command, **dataclasses.asdict(cfg), **extra}, indent=2), encoding="utf-8")
    os.replace(tmp, path)

def clear_run(paths: list[Path]) -> None:
    """Delete an earlier run's files (what check_out returned for --overwrite)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

def die_with_parent(sig: int) -> None:
    """Have the kernel send this process `sig` when its parent dies (Linux). torchrun starts its ranks, and the demo
    its stages, apart from the launcher's process group: killed, the launcher would leave them writing the run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent ended before that line (re-parented to init)
            os.kill(os.getpid(), sig)

LOCK_FILE = ".visrl.lock"

class RunLock:
    """An flock on <out>/.visrl.lock, held while this process writes the run in --out: a second process on the same
    --out stops with one line naming the holder. The kernel frees it when the holder exits, SIGKILL included."""

    def __init__(self, out, command: str):
        self.path, self.command, self.file = Path(out) / LOCK_FILE, command, None

    def take(self, create: bool = True) -> "RunLock":
        """Hold the lock from now on. create=False locks only an --out that exists (so that a command refused later
        has created nothing); the call with create=True, before the first write, makes --out."""
        if self.file is not None or not (create or self.path.parent.is_dir()):
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(f"--out {self.path.parent} is being written by {holder}; wait for it to end, or "
                            "choose another --out") from None
        file.truncate(0)
        file.write(f"`{self.command}` (pid {os.getpid()})\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file drops the flock
            self.file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

def held_out(n_items: int, fraction: float, seed: int) -> set[int]:
    """Indices of the held-out items: ceil(fraction * n) of them, chosen by the seed alone."""
    if not 0 <= fraction < 1:
        raise UserError(f"--val-fraction {fraction}: expected at least 0 and below 1")
    return set(random.Random(f"visrl-val/{seed}").sample(range(n_items), math.ceil(fraction * n_items)))
