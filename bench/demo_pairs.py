"""Why DPO does (not) move the demo's boxes: what generation's pairs hold, and where SFT's boxes fail.

    python bench/demo_pairs.py runs/demo-seeds/seed0 runs/demo-seeds/seed1 ...

For each demo folder (a finished `visrl.py demo` run, round 1), reading the annotated boxes that the RL
phases never saw (the synthetic set's train.jsonl), it prints:
- pair quality: how often the chosen and the rejected box are right (IoU > 0.5 with the true frame), and
  how often the rejected one is the model's own sampled box (not the diversity rule's random box);
- coverage: questions where a sampled box was wrong, and those among them where another sampled box was
  right (only these can teach the model a box it gets wrong);
- where SFT fails: held-out Acc@0.5 per grid cell of the true frame (the synthetic frames sit in a 4 x 4
  grid of 336 px cells), beside how many of SFT's annotated records put their frame in that cell.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import data  # noqa: E402

CELL = 336  # synth.py's grid cell, pixels


def right(box, truth) -> bool:
    return box is not None and chat.iou(tuple(box), tuple(truth)) > 0.5


def cell(box) -> tuple[int, int]:
    return int(box[0]) // CELL, int(box[1]) // CELL


def report(run: Path) -> None:
    truth = {r.id: r.box for r in data.read_records(run / "data" / "train.jsonl")}
    lines = data.read_jsonl_rows(run / "round1" / "generate" / "candidates.jsonl")
    pairs = [line for line in lines if line["pair"]]
    chosen_right = sum(right(p["candidates"][p["chosen"]]["box"], truth[p["id"]]) for p in pairs)
    rejected_right = sum(right(p["candidates"][p["rejected"]]["box"], truth[p["id"]]) for p in pairs)
    rejected_own = sum(p["candidates"][p["rejected"]]["kind"] == "sampled" for p in pairs)
    some_wrong = mixed = 0
    for line in lines:
        sampled = [right(c["box"], truth[line["id"]]) for c in line["candidates"] if c["kind"] == "sampled"]
        some_wrong += not all(sampled)
        mixed += any(sampled) and not all(sampled)
    n = max(len(pairs), 1)
    print(f"{run}: {len(lines)} questions, {len(pairs)} pairs; chosen box right {100 * chosen_right / n:.0f}%, "
          f"rejected box right {100 * rejected_right / n:.0f}%, rejected = own sampled box {rejected_own}; "
          f"questions with a wrong sampled box {some_wrong}, of them with a right one too {mixed}")
    sft_cells = collections.Counter(cell(r.box) for r in data.read_records(run / "data" / "train_sft.jsonl"))
    by_cell = collections.defaultdict(list)
    for row in data.read_jsonl_rows(run / "sft" / "eval" / "predictions.jsonl"):
        by_cell[cell(row["gt_box"])].append(right(row["box"], row["gt_box"]))
    print("  SFT Acc@0.5 by cell (x, y): " + "  ".join(
        f"{c}: {100 * sum(v) / len(v):.0f}% ({sft_cells[c]} SFT records)" for c, v in sorted(by_cell.items())))


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        report(Path(arg))
