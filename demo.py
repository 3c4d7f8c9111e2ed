"""The whole VisRL recipe in one command, on the tiny model and the synthetic set: `python visrl.py demo`.

    synthetic data -> SFT warm-up -> [generate pairs -> DPO stage 1 -> DPO stage 2] x rounds

with an evaluation on the held-out test split after every phase. Each phase starts from the previous phase's adapter
(merged into the base), also its DPO reference. As in the recipe (few box annotations, then the model labels new
questions for itself), only SFT reads boxes, of the first --sft-records training records; pairs are generated on *other*
records with their boxes removed, so the rule scorer judges a box by the answers alone (through its crop, and from the
crop alone). The training phases run as the commands a user types (`python visrl.py sft|dpo ...`, printed first), so
the demo is the README's chain. A rerun into the same --out skips finished phases and resumes an interrupted one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from PIL import Image, ImageDraw

import chat
import data
import evaluate
import generate
import runs
import synth

@dataclass
class DemoConfig:
    """The whole recipe on the tiny model: data, SFT, self-generated pairs, DPO stages 1 and 2, evaluations.
    The settings are the tiny model's; BENCHMARKS.md ("The demo's settings") has what each was chosen over."""

    # every phase's outputs, results.md, results.json, plots/
    out: Annotated[str | None, runs.default("runs/demo, or runs/demo-quick with --quick")] = None
    seed: int = 0  # data, training order and sampling
    quick: bool = False  # a few records and steps per phase: exercises every phase in ~1 minute (numbers meaningless)
    rounds: int = 1  # self-evolution rounds (generate -> stage 1 -> stage 2), each on fresh questions
    model: str = "tiny"  # `tiny` (Qwen2.5-VL), `tiny-qwen2-vl`, `tiny-qwen3-vl`, `tiny-qwen3.5`, or a checkpoint
    n_train: int = 500  # synthetic training records: the first --sft-records annotated, the rest bare questions
    sft_records: int = 64  # records SFT reads (question, box, answer); the RL phases never see a box
    n_test: int = 500  # held-out synthetic test records, evaluated after every phase
    sft_steps: int = 1000  # SFT optimizer steps: a warm-up, not convergence (upstream: 3 epochs)
    sft_focus_first_steps: int = 400  # SFT's first steps on box samples alone (sft --focus-first-steps)
    sft_lr: float = 2e-3  # SFT learning rate
    # the prompt set of the whole chain (recorded by SFT, inherited by every later phase). Not upstream's: upstream
    # asks generation's and DPO's box step with VisRL's instruction, which its SFT taught for the answer step only;
    # `visrl` asks every box step with the one instruction SFT taught, which a model trained from random weights needs
    prompts: Literal["upstream", "visrl"] = "visrl"
    lora_rank: int = 16  # LoRA rank of every phase
    lora_alpha: float = 32.0  # LoRA alpha of every phase
    batch_size: int = 8  # SFT batch size
    questions: int = 320  # questions (records after the SFT ones, boxes removed) each generation round samples
    attempts: int = 3  # generate.py --attempts: each attempt a sampled and a diversity box (upstream: 3)
    gen_temperature: float = 2.0  # generation's sampling temperature (upstream: 2; top-k 50 as generate.py)
    gen_top_p: float = 0.7  # generation's top-p (upstream: 0.7)
    gen_max_new_tokens: int = 64  # generation's reply limit (upstream: 1024): the tiny model's replies are < 20 tokens
    dpo_epochs: float = 4.0  # epochs of each DPO stage over the round's pairs (upstream: 5)
    dpo_lr: float = 5e-5  # DPO learning rate of both stages (upstream: 5e-6, for a 7B model)
    dpo_beta: float = 0.1  # DPO beta (both stages)
    dpo_nll_weight: float = 3.0  # dpo --nll-weight: the chosen responses' NLL beside the DPO loss (upstream: none)
    dpo_answer_anchor: bool = True  # stage 1 also trains the chosen answer's NLL on its crop (dpo --answer-anchor)
    dpo_batch_size: int = 4  # pairs per DPO step
    eval_batch_size: int = 32  # prompts per generate call in the evaluations
    # passed to every training phase (sft, dpo): tensorboard writes each phase's curves, live, into
    # <phase dir>/tensorboard (`tensorboard --logdir <out>` shows them all)
    report_to: Literal["none", "tensorboard"] = "none"

    # a rerun goes on with the phases it finished (and may add or drop --report-to: it changes no result)
    rerun_may_change: ClassVar[tuple[str, ...]] = ("out", "report_to")

# --------------------------------------------------------------------------------------------
# Phases. Each returns its row of the table; finished phases are read back from <out>/phases.json.

def evaluate_phase(cfg: DemoConfig, adapter: Path, test_file: Path, out: Path) -> dict:
    """Acc@0.5 and answer accuracy through the model's own crop, and the direct (no crop) answer accuracy."""
    common = dict(model=cfg.model, adapter=str(adapter), data=str(test_file), batch_size=cfg.eval_batch_size,
                  max_new_tokens=40, seed=cfg.seed, pictures=3)
    two_step_cfg = evaluate.EvalConfig(out=str(out / "eval"), box="model", **common)
    generate_fn = evaluate.reply_function(two_step_cfg)  # one model load for both evaluations
    two_step = evaluate.evaluate(two_step_cfg, generate_fn)["sets"]["synth"]
    direct_cfg = evaluate.EvalConfig(out=str(out / "eval-direct"), box="none", **common)
    direct = evaluate.evaluate(direct_cfg, generate_fn)["sets"]["synth"]

    def well_formed(run: str) -> float:  # answers that are one of the pattern names: DPO must not erode the format
        rows = data.read_jsonl_rows(out / run / "predictions.jsonl")
        return 100 * sum(chat.normalize_answer(r["answer"] or "") in synth.SYNTH_PATTERNS for r in rows) / len(rows)

    return {"acc@0.5": two_step["detection"]["acc"], "answer_acc": 100 * two_step["answer"]["exact_match"],
            "direct_acc": 100 * direct["answer"]["exact_match"], "well_formed": well_formed("eval"),
            "direct_well_formed": well_formed("eval-direct"), "n_test": two_step["items"]}

def write_questions_without_boxes(records: list[data.Record], path: Path) -> Path:
    """The RL phases' questions: image, question and answers only, so no step can use a box annotation."""
    data.write_records(path, [data.Record(r.id, r.image, r.question, r.answers, [], r.width, r.height)
                              for r in records])
    return path

def annotation_pairs(records: list[data.Record], path: Path, root: Path, seed: int) -> Path:
    """--quick only: true box and answer (chosen) vs a random box and another answer (rejected)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            wrong = rng.choice([p for p in synth.SYNTH_PATTERNS if p != r.answer])
            random_box = chat.box_to_text(chat.random_box(r.width, r.height, rng), r.width, r.height)
            pair = data.Pair(r, chat.box_to_text(r.box, r.width, r.height), random_box, r.answer, wrong)
            f.write(json.dumps(data.pair_json(pair, root)) + "\n")
    return path

VISRL = str(Path(__file__).with_name("visrl.py"))

def flag_args(flags: dict) -> list[str]:
    """Command-line flags for these fields (True -> --flag, False -> --no-flag), as tyro reads them."""
    args = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return args

def report_settings(cfg: DemoConfig) -> dict:
    """--report-to for a training phase, only when the demo was given it (the printed commands stay the plain ones)."""
    return {} if cfg.report_to == "none" else {"report_to": cfg.report_to}

def sft_settings(cfg: DemoConfig, sft_file: Path) -> dict:
    """The demo's SFT run, as `visrl.py sft` fields."""
    return dict(model=cfg.model, data=sft_file, out=Path(cfg.out) / "sft", seed=cfg.seed, prompts=cfg.prompts,
                max_steps=cfg.sft_steps, focus_first_steps=cfg.sft_focus_first_steps, lr=cfg.sft_lr,
                batch_size=cfg.batch_size, grad_accum=1, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                crop_alone_samples=True,  # generation's rule scorer asks the crop alone
                cache_pixels=True,  # 64 records: ~40 MB, and later epochs decode nothing
                save_every=50, resume=True, **report_settings(cfg))

def dpo_settings(cfg: DemoConfig, stage: int) -> dict:
    """The demo's training settings for a DPO stage (and its --report-to), as `visrl.py dpo` fields."""
    anchor = {"answer_anchor": True} if cfg.dpo_answer_anchor and stage == 1 else {}
    return dict(epochs=cfg.dpo_epochs, lr=cfg.dpo_lr, beta=cfg.dpo_beta, nll_weight=cfg.dpo_nll_weight, **anchor,
                batch_size=cfg.dpo_batch_size, grad_accum=1, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                **report_settings(cfg))

def stage_args(subcommand: str, flags: dict) -> list[str]:
    """The argv of `python visrl.py <subcommand>` with these flags."""
    return [VISRL, subcommand, *flag_args(flags)]

def run_stage(args: list[str]) -> None:
    """Run one training stage as its own process, exactly the printed command; its errors are its own lines. Ctrl-C
    reaches the stage (same process group), which checkpoints and exits while the demo waits; SIGTERM is passed on,
    and the demo's death too."""
    print("demo: python " + shlex.join(["visrl.py", *args[1:]]), flush=True)
    def in_the_stage():  # Ctrl-C as the terminal means it; SIGTERM (checkpoint, exit) if the demo dies first
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        runs.die_with_parent(signal.SIGTERM)

    process = subprocess.Popen([sys.executable, *args], preexec_fn=in_the_stage)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        raise data.UserError(f"demo: `visrl.py {args[1]}` stopped with exit code {code} (its message is above); "
                             "run the demo again to resume: finished phases are kept")

def run_phase(cfg: DemoConfig, state: dict, name: str, phase_dir: Path, args: list[str], adapter_in: Path | None,
              test_file: Path, pairs: int | None = None, extra_seconds: float = 0.0) -> Path:
    """One training phase (a `visrl.py` command; --resume: from its newest checkpoint, if an earlier run left
    one) and its evaluation, recorded in <out>/phases.json; a phase finished earlier is read back. Its adapter."""
    adapter = phase_dir / "adapter"
    done = {p["phase"]: p for p in state["phases"]}
    if name in done:
        print(f"demo: {name}: done earlier ({done[name]['seconds']:.0f} s)")
        return adapter
    start = time.time()
    run_stage(args)
    if not (adapter / "adapter.safetensors").exists():  # a signal stopped it: it saved a checkpoint instead
        raise SystemExit(f"demo: {name} stopped before its end; run the same command again to resume it")
    row = {"phase": name, **evaluate_phase(cfg, adapter, test_file, phase_dir), "pairs": pairs,
           "seconds": time.time() - start + extra_seconds, "adapter": str(adapter),
           "from": str(adapter_in or cfg.model)}
    state["phases"].append(row)
    (Path(cfg.out) / "phases.json").write_text(json.dumps(state, indent=2))
    print(f"demo: {name}: Acc@0.5 {row['acc@0.5']:.1f}  answer {row['answer_acc']:.1f}  "
          f"direct {row['direct_acc']:.1f}  ({row['seconds']:.0f} s)")
    return adapter

def generate_round(cfg: DemoConfig, rnd: int, adapter: Path, bare_records: list[data.Record],
                   data_dir: Path) -> tuple[Path, int]:
    """One round's preference pairs from the current model (generate.py resumes itself): (pairs file, count);
    --quick falls back to pairs made from the annotations (a negative count) when the model keeps none."""
    gen_dir = Path(cfg.out) / f"round{rnd}" / "generate"
    chunk = bare_records[(rnd - 1) * cfg.questions: rnd * cfg.questions] or bare_records[:cfg.questions]
    questions = write_questions_without_boxes(chunk, data_dir / f"questions_round{rnd}.jsonl")
    gen_flags = dict(model=cfg.model, adapter=str(adapter), data=str(questions), out=str(gen_dir),
                     seed=cfg.seed + rnd, attempts=cfg.attempts, temperature=cfg.gen_temperature,
                     top_p=cfg.gen_top_p, batch_size=64, chunk=32, max_new_tokens=cfg.gen_max_new_tokens)
    if not (gen_dir / "summary.json").exists():  # written when generation finishes
        print("demo: python " + shlex.join(["generate.py", *flag_args(gen_flags)]), flush=True)
        generate.generate(generate.GenerateConfig(**gen_flags))
    pairs_file = gen_dir / "pairs.jsonl"
    n_pairs = sum(1 for line in pairs_file.open() if line.strip())
    if n_pairs == 0 and not cfg.quick:
        raise data.UserError(f"demo: generation kept no preference pair ({gen_dir / 'summary.json'}); "
                             "the SFT model never answers right and wrong on the same question")
    if n_pairs == 0:  # a few SFT steps answer nothing, so no pair is kept; --quick still runs DPO, on annotation pairs
        return annotation_pairs(chunk, gen_dir / "pairs_from_annotations.jsonl", data_dir, cfg.seed), -len(chunk)
    return pairs_file, n_pairs

def demo(cfg: DemoConfig) -> dict:
    """Run (or resume) the whole recipe; writes results.md/json and plots into --out, whose lock it holds."""
    if cfg.quick:  # CI-sized: every phase runs, on a handful of records and steps
        cfg = replace(cfg, n_train=24, n_test=8, sft_records=16, sft_steps=6, sft_focus_first_steps=2, questions=8,
                      attempts=1, dpo_epochs=1.0, batch_size=4, dpo_batch_size=2)
    if cfg.out is None:  # the quick run and the full one never share a folder
        cfg = replace(cfg, out="runs/demo-quick" if cfg.quick else "runs/demo")
    out = Path(cfg.out)
    runs.check_rerun(out, "demo", cfg, "rerun it")
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:  # now, not after the data
        raise data.UserError("demo --report-to tensorboard: the tensorboard package is not installed; "
                             "pip install 'visrl[tensorboard]' (or pip install tensorboard)")
    with runs.RunLock(out, "demo").take():
        runs.write_config(out, "demo", cfg)
        state_path = out / "phases.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {"phases": []}
        data_dir = out / "data"
        if not (data_dir / "test.jsonl").exists():
            start = time.time()
            synth.make_synth(data_dir, n_train=cfg.n_train, n_val=0, n_test=cfg.n_test, seed=cfg.seed)
            state["data_seconds"] = time.time() - start
        test_file, records = data_dir / "test.jsonl", data.read_records(data_dir / "train.jsonl")
        if not 0 < cfg.sft_records < len(records):
            raise data.UserError(f"--sft-records {cfg.sft_records} must leave questions for generation among "
                                 f"the {len(records)} training records")
        sft_file = data_dir / "train_sft.jsonl"
        data.write_records(sft_file, records[:cfg.sft_records])
        adapter = run_phase(cfg, state, "sft", out / "sft", stage_args("sft", sft_settings(cfg, sft_file)), None,
                            test_file)
        for rnd in range(1, cfg.rounds + 1):
            gen_start, tag = time.time(), "" if cfg.rounds == 1 else f" (round {rnd})"
            pairs_file, n_pairs = generate_round(cfg, rnd, adapter, records[cfg.sft_records:], data_dir)
            for stage in (1, 2):
                stage_dir = out / f"round{rnd}" / f"dpo{stage}"
                args = stage_args("dpo", dict(data=pairs_file, stage=stage, model=cfg.model, adapter=adapter,
                                              image_root=data_dir, out=stage_dir, seed=cfg.seed,
                                              **dpo_settings(cfg, stage), save_every=50, resume=True))
                adapter = run_phase(cfg, state, f"dpo stage {stage}{tag}", stage_dir, args, adapter, test_file,
                                    n_pairs, time.time() - gen_start if stage == 1 else 0.0)
        total = state.get("data_seconds", 0.0) + sum(p["seconds"] for p in state["phases"])
        results = {"config": asdict(cfg), "phases": state["phases"], "data_seconds": state.get("data_seconds", 0.0),
                   "total_seconds": total}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        markdown = results_markdown(results)
        (out / "results.md").write_text(markdown)
        plot_curves(out, cfg.sft_focus_first_steps)
    print(markdown)
    return results

# --------------------------------------------------------------------------------------------
# The table and the plots.

def results_markdown(results: dict) -> str:
    """The per-phase table (percentages on the held-out test split)."""
    cfg = results["config"]
    lines = [f"# VisRL demo ({cfg['model']}, seed {cfg['seed']}{', quick' if cfg['quick'] else ''})", "",
             f"Held-out synthetic test split: {cfg['n_test']} questions. Acc@0.5: the predicted box's IoU with "
             "the true frame > 0.5 (strictly, as the benchmark counts it). Answer: exact match, answering through "
             "the crop of the model's own box. Direct: exact match answering from the full image alone. "
             "Well-formed: answers that are one of the six pattern names. Seconds: training + evaluation "
             "(+ generation for the first DPO phase of a round).", "",
             "| phase | Acc@0.5 | answer (own crop) | answer (direct) | well-formed answers (crop / direct) | pairs "
             "| seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for p in results["phases"]:
        pairs = ("-" if p.get("pairs") is None else str(p["pairs"]) if p["pairs"] >= 0
                 else f"{-p['pairs']} (from annotations, --quick)")
        formed = f"{p['well_formed']:.0f} / {p['direct_well_formed']:.0f}" if "well_formed" in p else "-"  # older runs
        lines.append(f"| {p['phase']} | {p['acc@0.5']:.1f} | {p['answer_acc']:.1f} | {p['direct_acc']:.1f} | "
                     f"{formed} | {pairs} | {p['seconds']:.0f} |")
    lines += ["", f"Total wall time: {results['total_seconds']:.0f} s (synthetic data: {results['data_seconds']:.0f} "
              "s; the tiny checkpoint, if built on this run, is not counted)."]
    return "\n".join(lines) + "\n"

def plot_curves(out: Path, focus_first_steps: int = 0) -> list[Path]:
    """plots/<phase>-loss.png for every phase (a DPO phase's preference and NLL terms as separate lines) and
    plots/<phase>-margins.png (reward margins) for every DPO phase."""
    paths = []
    for metrics_file in sorted(out.glob("**/metrics.jsonl")):
        phase = str(metrics_file.parent.relative_to(out))
        slug = phase.replace("/", "-")
        rows = [json.loads(line) for line in metrics_file.open()]  # one per logged optimizer step
        held_out = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if rows and "dpo_term" in rows[0]:
            series = {"preference (DPO) term": [(r["step"], r["dpo_term"]) for r in rows]}
            if any(r["nll_term"] for r in rows):
                series["NLL term (x --nll-weight)"] = [(r["step"], r["nll_term"]) for r in rows]
        else:
            series = {"cross-entropy": [(r["step"], r["loss"]) for r in rows]}
        marks = [(focus_first_steps, "all sample kinds from here")] if focus_first_steps and phase == "sft" else []
        if len(held_out) > 1:  # one point (the default: at the end only) is in results, not worth a line
            series["held-out loss"] = held_out
        paths.append(line_plot(series, f"{phase}: training loss", out / "plots" / f"{slug}-loss.png",
                               ylabel="loss (nats per token)" if phase == "sft" else "loss", marks=marks))
        margins = {kind: [(r["step"], r[f"{kind}/rewards/margins"]) for r in rows if f"{kind}/rewards/margins" in r]
                   for kind in ("box", "answer")}
        config = metrics_file.parent / "config.json"
        anchored = config.exists() and json.loads(config.read_text()).get("answer_anchor", False)
        names = {"box": "box step", "answer": "answer step (NLL anchor)" if anchored else "answer step"}
        margins = {names[kind]: points for kind, points in margins.items() if points}
        if margins:
            paths.append(line_plot(margins, f"{phase}: DPO reward margin, chosen - rejected",
                                   out / "plots" / f"{slug}-margins.png", ylabel="reward margin", log_y=False))
    return paths

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]

def _ticks(low: float, high: float, log: bool) -> list[float]:
    """Tick values: powers of ten on a log axis, else 1/2/5 x 10^k steps, about five of them."""
    if log:
        return [10.0 ** k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                if low <= 10.0 ** k <= high] or [low, high]
    raw = (high - low) / 5
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1)]

def line_plot(series: dict[str, list[tuple[float, float]]], title: str, path: Path, xlabel: str = "optimizer step",
              ylabel: str = "loss", log_y: bool | None = None, marks=(), size=(760, 440)) -> Path:
    """A PNG line chart drawn with PIL: one line per series with a legend, labelled axes with ticks, a log y-axis when
    log_y (None: when the values are positive and span over 30x), and dashed vertical marks [(x, label)]."""
    width, height = size
    left, right, top, bottom = 70, 220, 30, 50
    image = Image.new("RGB", size, (255, 255, 255))
    pen = ImageDraw.Draw(image)
    series = {name: [(x, y) for x, y in s if math.isfinite(x) and math.isfinite(y)] for name, s in series.items()}
    points = [p for s in series.values() for p in s]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        low, high = min(p[1] for p in points), max(p[1] for p in points)
        if log_y is None:
            log_y = low > 0 and high / low > 30
        x1 = x1 if x1 > x0 else x0 + 1
        high = high if high > low else (low * 10 if log_y else low + 1)
        y0, y1 = (math.log10(low), math.log10(high)) if log_y else (low, high)

        def xy(x, y):
            y = math.log10(max(y, 1e-30)) if log_y else y
            return (left + (x - x0) / (x1 - x0) * (width - left - right),
                    height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

        for tick in _ticks(low, high, log_y):
            _, ty = xy(x0, tick)
            pen.line([(left, ty), (width - right, ty)], fill=(235, 235, 235))
            pen.text((4, ty - 6), f"{tick:.3g}", fill=(0, 0, 0))
        for tick in _ticks(x0, x1, False):
            tx, _ = xy(tick, low)
            pen.line([(tx, height - bottom), (tx, height - bottom + 4)], fill=(0, 0, 0))
            pen.text((tx - 8, height - bottom + 6), f"{tick:g}", fill=(0, 0, 0))
        if not log_y and low < 0 < high:  # the zero line: where a reward margin changes sign
            pen.line([xy(x0, 0), xy(x1, 0)], fill=(160, 160, 160))
        for x, label in marks:
            mx, _ = xy(x, low)
            for yy in range(top, height - bottom, 8):
                pen.line([(mx, yy), (mx, min(yy + 4, height - bottom))], fill=(90, 90, 90))
            pen.text((mx + 4, top + 18), label, fill=(90, 90, 90))
        for i, (name, s) in enumerate(series.items()):
            color = _COLORS[i % len(_COLORS)]
            if len(s) > 1:
                pen.line([xy(x, y) for x, y in s], fill=color, width=2)
            elif s:
                cx, cy = xy(*s[0])
                pen.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=color)
            legend_y = top + 16 * i
            pen.line([(width - right + 10, legend_y + 6), (width - right + 30, legend_y + 6)], fill=color, width=3)
            pen.text((width - right + 36, legend_y), name[:30], fill=(0, 0, 0))
    pen.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    pen.text((left, 8), title, fill=(0, 0, 0))
    pen.text(((left + width - right) // 2 - 40, height - 18), xlabel, fill=(0, 0, 0))
    pen.text((left + 4, top + 4), ylabel + (" (log scale)" if log_y else ""), fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
