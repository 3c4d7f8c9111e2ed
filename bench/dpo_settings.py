"""DPO stages 1 and 2 at other settings on one seed of a `bench/demo_seeds.py` run: its SFT adapter and its
generated pairs are reused (they do not depend on the DPO settings), each setting's stages are run as the demo
runs them (its flags, one changed) and evaluated on the seed's test questions, with the held-out loss.

    VISRL_CACHE=<the run's cache> python bench/dpo_settings.py --run runs/demo-seeds --seed 0 \
        --settings lr=5e-5 epochs=1 --out runs/dpo-settings

Prints one line per setting and stage: the demo's metrics, the held-out box (and answer) loss after it, and
the answers it flipped against SFT's on the same questions (right -> wrong, wrong -> right: how far the stage
moved the answer step, which a single accuracy hides).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import chat  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402


@dataclass
class Args:
    run: str  # a bench/demo_seeds.py --out
    seed: int = 0
    # each: comma-separated dpo flags that replace the demo's; `s1.flag=v` / `s2.flag=v`: that stage only; a flag of
    # two values takes them space-separated (`s2.lambdas=0 0.5`)
    settings: tuple[str, ...] = ("lr=5e-5",)
    out: str = "runs/dpo-settings"


def main(args: Args) -> None:
    base = Path(args.run) / f"seed{args.seed}"
    ran = {k: v for k, v in json.loads((base / "config.json").read_text()).items() if k != "command"}
    run_cfg = demo.DemoConfig(**{"dpo_answer_anchor": False, **ran})  # the settings it ran with (older runs: no anchor)
    for spec in args.settings:
        flags = dict(kv.split("=") for kv in spec.split(","))  # dpo flags as typed: lr=5e-5, s1.nll-weight=0
        out = Path(args.out) / f"seed{args.seed}-{spec.replace(',', '-').replace('=', '')}"
        adapter = base / "sft" / "adapter"
        for stage in (1, 2):
            # the demo's flags as typed (value "" for a switch that is on: the bare flag), then the setting's
            settings = {k.replace("_", "-"): "" if v is True else str(v) for k, v in demo.dpo_settings(run_cfg, stage).items()}
            settings |= {k.split(".", 1)[-1]: v for k, v in flags.items() if k[:3] not in ("s1.", "s2.") or
                         k.startswith(f"s{stage}.")}
            as_stage = settings.pop("stage", str(stage))  # s1.stage=2,s1.lambdas=1 0: stage 1 with an answer anchor
            subprocess.run([sys.executable, str(ROOT / "visrl.py"), "dpo", "--data", str(base / "round1/generate/pairs.jsonl"),
                            "--stage", as_stage, "--adapter", str(adapter), "--image-root", str(base / "data"),
                            "--out", str(out / f"dpo{stage}"), "--seed", str(args.seed), "--resume"]
                           + [x for k, v in settings.items() for x in ["--" + k] + v.split()], check=True)
            adapter = out / f"dpo{stage}" / "adapter"
            row = demo.evaluate_phase(run_cfg, adapter, base / "data" / "test.jsonl", out / f"dpo{stage}")
            last = json.loads((out / f"dpo{stage}" / "metrics.jsonl").read_text().splitlines()[-1])
            held = {k: round(v, 3) for k, v in last.items() if k in ("eval_box/loss", "eval_answer/loss", "eval_box/logps/chosen")}
            flips = answer_flips(base / "sft" / "eval" / "predictions.jsonl", out / f"dpo{stage}" / "eval" / "predictions.jsonl")
            print(spec, "stage", stage, {k: round(v, 1) for k, v in row.items()}, held, flips, flush=True)


def answer_flips(before: Path, after: Path) -> dict:
    """Questions whose answer went right -> wrong and wrong -> right between two evaluations."""
    def right(path):
        return {r["id"]: chat.exact_match(r["answer"] or "", r["answers"]) == 1.0 for r in data.read_jsonl_rows(path)}
    old, new = right(before), right(after)
    return {"lost": sum(old[k] and not new[k] for k in old), "gained": sum(new[k] and not old[k] for k in old)}


if __name__ == "__main__":
    main(tyro.cli(Args))
