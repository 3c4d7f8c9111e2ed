"""Per seed of a bench/demo_seeds.py run, how each DPO stage moved the answers against SFT on the same test
questions: answers flipped right -> wrong / wrong -> right, and the accuracy given a right box (IoU > 0.5) and a
well-formed answer (one of the synthetic set's pattern names), SFT -> stage 1 -> stage 2.

    python bench/demo_flips.py --run runs/demo-seeds --seeds 0 1 2 3 4
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import chat  # noqa: E402
import data  # noqa: E402
import synth  # noqa: E402
import viscot  # noqa: E402
from dpo_settings import answer_flips  # noqa: E402

PHASES = ("sft", "round1/dpo1", "round1/dpo2")


@dataclass
class Args:
    run: str  # a bench/demo_seeds.py --out
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


def accuracy_given_box_and_form(predictions: Path) -> float:
    """Answer accuracy over the questions with a right box and a well-formed answer (percent)."""
    kept = [r for r in data.read_jsonl_rows(predictions)
            if r["box"] is not None and viscot.iou_float32(r["box"], r["gt_box"]) > 0.5
            and (r["answer"] or "").strip().lower() in synth.SYNTH_PATTERNS]
    return 100 * sum(chat.exact_match(r["answer"], r["answers"]) == 1.0 for r in kept) / max(len(kept), 1)


def main(args: Args) -> None:
    totals = {phase: [0, 0] for phase in PHASES[1:]}
    for seed in args.seeds:
        predictions = [Path(args.run) / f"seed{seed}" / phase / "eval" / "predictions.jsonl" for phase in PHASES]
        flips = []
        for phase, after in zip(PHASES[1:], predictions[1:]):
            moved = answer_flips(predictions[0], after)
            flips.append(f"{moved['lost']}/{moved['gained']}")
            totals[phase][0] += moved["lost"]
            totals[phase][1] += moved["gained"]
        given = " -> ".join(f"{accuracy_given_box_and_form(p):.1f}" for p in predictions)
        print(f"seed {seed}: lost/gained stage 1 {flips[0]}, stage 2 {flips[1]}; given box and form {given}")
    print("all seeds, lost/gained:", {phase: tuple(counts) for phase, counts in totals.items()})


if __name__ == "__main__":
    main(tyro.cli(Args))
