"""Benchmark: generate.py's candidates per second, batched vs one question at a time, one run each.

    python bench/generate.py [--questions 8] [--attempts 3] [--max-new-tokens 32]   (CUDA_VISIBLE_DEVICES= for the CPU)

Same tiny model, same synthetic questions, same settings (rule scorer, upstream sampling); only how
prompts reach model.sample differs:
  one at a time   --chunk 1 --batch-size 1        every prompt its own forward (upstream: one request each)
  one question    --chunk 1 --batch-size 2K       one question's prompts per call
  batched         --chunk Q --batch-size 2K*Q     all questions' prompts per call (left-padded)
The random tiny model's box replies never parse, so no answer would be sampled; to time the whole
pipeline, each unparseable box reply is swapped *after* it was sampled (its cost counted) for a
random valid box, so every candidate also gets its crop and a sampled answer. Time = generate()'s own
loop (images, prompts, sampling, scoring, files), model loading excluded.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import data  # noqa: E402
import generate  # noqa: E402
import synth  # noqa: E402


class ValidBoxes:
    """The in-process sampler, with unparseable box replies replaced after sampling."""

    def __init__(self, inner, records):
        self.inner, self.processor = inner, inner.processor
        self.by_question = {r.question: r for r in records}

    def __call__(self, prompts, sampling, seed):
        replies = self.inner(prompts, sampling, seed)
        rng = random.Random(seed)
        out = []
        for (messages, _), reply in zip(prompts, replies):
            text = messages[0]["content"][1]["text"]
            r = self.by_question.get(text[:-len(chat.FOCUS_INSTRUCTION) - 1]) if text.endswith(chat.FOCUS_INSTRUCTION) else None
            if r is not None and chat.text_to_box(reply, r.width, r.height) is None:
                reply = chat.box_to_text(chat.random_box(r.width, r.height, rng), r.width, r.height)
            out.append(reply)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    per_question = 2 * args.attempts
    variants = [("one prompt at a time", 1, 1), ("one question per call", 1, per_question),
                ("batched", args.questions, per_question * args.questions)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth.make_synth(tmp / "synth", n_train=args.questions, n_val=1, n_test=1, seed=0)
        records = data.read_records(tmp / "synth" / "train.jsonl")
        base = generate.GenerateConfig(data=str(tmp / "synth" / "train.jsonl"), attempts=args.attempts,
                                       max_new_tokens=args.max_new_tokens)
        sampler = ValidBoxes(generate.LocalSampler(base), records)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
        rows = []
        for name, chunk, batch in variants:
            sampler.inner.batch_size = batch
            cfg = generate.GenerateConfig(**{**vars(base), "out": str(tmp / name.replace(" ", "_")),
                                             "chunk": chunk, "batch_size": batch})
            summary = generate.generate(cfg, sampler)
            rows.append((name, chunk, batch, summary))
    print("\n| variant | device | questions x candidates | --chunk | --batch-size | max new tokens | "
          "seconds | candidates/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    slow = rows[0][3]["this_run"]["candidates_per_s"]
    for name, chunk, batch, summary in rows:
        run = summary["this_run"]
        print(f"| {name} | {device} | {args.questions} x {per_question} | {chunk} | {batch} | {args.max_new_tokens} | "
              f"{run['seconds']:.1f} | {run['candidates_per_s']:.2f} | {run['candidates_per_s'] / slow:.1f}x |")


if __name__ == "__main__":
    main()
