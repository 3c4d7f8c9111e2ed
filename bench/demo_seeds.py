"""The demo's claims, measured from scratch over seeds: runs `visrl.py demo` once per seed (each resumable in
its own folder), then writes the per-seed table, the mean +- standard error over seeds, and the paired
differences the README claims, each marked as holding when it is beyond 2 standard errors.

    VISRL_CACHE=$(mktemp -d) python bench/demo_seeds.py --out runs/demo-seeds --seeds 0 1 2 3 4 --n-test 500
    python bench/demo_seeds.py --out runs/demo-strong --seeds 0 --n-test 500 --demo-args="--sft-records 200"

Writes <out>/table.md (also printed) and <out>/table.json. A fresh VISRL_CACHE builds the tiny checkpoint from
scratch, as a new machine does.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
METRICS = (("acc@0.5", "Acc@0.5"), ("answer_acc", "answer (own crop)"), ("direct_acc", "answer (direct)"),
           ("well_formed", "well-formed (crop)"), ("direct_well_formed", "well-formed (direct)"))


@dataclass
class Args:
    out: str = "runs/demo-seeds"  # one folder per seed, and table.md / table.json
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_test: int = 500  # held-out test questions per seed
    demo_args: str = ""  # more `visrl.py demo` flags, e.g. --demo-args="--sft-records 200" (with the =)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def run_seed(args: Args, seed: int) -> dict:
    """The demo's results for one seed (a finished run is read back; an interrupted one resumes)."""
    out = Path(args.out) / f"seed{seed}"
    results = out / "results.json"
    if not results.exists():
        cmd = [sys.executable, str(ROOT / "visrl.py"), "demo", "--out", str(out), "--seed", str(seed),
               "--n-test", str(args.n_test), *shlex.split(args.demo_args)]
        print("bench: " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    return json.loads(results.read_text())


def main(args: Args) -> None:
    runs = {seed: run_seed(args, seed) for seed in args.seeds}
    phases = {seed: {p["phase"]: p for p in r["phases"]} for seed, r in runs.items()}
    names = [p["phase"] for p in next(iter(runs.values()))["phases"]]
    lines = [f"Demo from scratch, {len(args.seeds)} seeds, {args.n_test} held-out test questions each"
             + (f", demo flags `{args.demo_args}`" if args.demo_args else "") + ". Percent.", "",
             "| seed | phase | " + " | ".join(label for _, label in METRICS) + " | pairs | seconds |",
             "|---|---|" + "---:|" * (len(METRICS) + 2)]
    for seed in args.seeds:
        for name in names:
            p = phases[seed][name]
            lines.append(f"| {seed} | {name} | " + " | ".join(f"{p[key]:.1f}" for key, _ in METRICS)
                         + f" | {p['pairs'] if p.get('pairs') is not None else '-'} | {p['seconds']:.0f} |")
    for name in names:
        cells = [mean_se([phases[s][name][key] for s in args.seeds]) for key, _ in METRICS]
        lines.append(f"| mean +- SE | {name} | " + " | ".join(f"{m:.1f} +- {se:.1f}" for m, se in cells) + " | | |")

    # the claims, as paired differences over seeds (each seed's own SFT model is its baseline)
    last = names[-1]
    claims = [("crop > direct after SFT", [phases[s]["sft"]["answer_acc"] - phases[s]["sft"]["direct_acc"]
                                           for s in args.seeds], "greater"),
              (f"{last} > SFT, Acc@0.5", [phases[s][last]["acc@0.5"] - phases[s]["sft"]["acc@0.5"]
                                          for s in args.seeds], "greater"),
              (f"{last} > SFT, answer (own crop)", [phases[s][last]["answer_acc"] - phases[s]["sft"]["answer_acc"]
                                                    for s in args.seeds], "greater"),
              (f"{last} keeps well-formed answers (crop)",
               [phases[s][last]["well_formed"] - phases[s]["sft"]["well_formed"] for s in args.seeds], "not lower"),
              (f"{last} keeps well-formed answers (direct)",
               [phases[s][last]["direct_well_formed"] - phases[s]["sft"]["direct_well_formed"] for s in args.seeds],
               "not lower")]
    lines += ["", "| claim | per-seed differences (points) | mean +- SE | holds (beyond 2 SE) |", "|---|---|---:|---|"]
    verdicts = {}
    for claim, diffs, kind in claims:
        mean, se = mean_se(diffs)
        holds = mean - 2 * se > 0 if kind == "greater" else mean + 2 * se >= 0
        verdicts[claim] = {"differences": diffs, "mean": mean, "se": se, "holds": holds}
        lines.append(f"| {claim} | {', '.join(f'{d:+.1f}' for d in diffs)} | {mean:+.1f} +- {se:.1f} | "
                     f"{'yes' if holds else 'NO'} |")
    table = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(table)
    (Path(args.out) / "table.json").write_text(json.dumps({"args": vars(args), "phases": phases,
                                                           "claims": verdicts}, indent=2))
    print(table)


if __name__ == "__main__":
    main(tyro.cli(Args))
