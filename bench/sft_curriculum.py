"""Measurement: does SFT learn the box? Held-out exact match per sample kind, during training.

    python bench/sft_curriculum.py [--records 800] [--steps 1500] [--focus-first-steps 0] [--seed 0]
                                   [--focus-only] [--every 250]

SFT on the synthetic set as `visrl.py sft --crop-alone-samples --cache-pixels` trains it (the same
samples, batches of 8, LoRA r16, lr 2e-3, the same optimizer, schedule and loss), on one process; every
--every steps it prints, for the 200 test records of the cached set, the share of focus / answer /
crop-alone samples whose every response token is the argmax (teacher-forced: the exact box text, the
exact answer). README ("What the tiny model learns") quotes the numbers of its first version (a /tmp
script on the same training records, 256 test pages): mixed from step 0 the box stays near chance,
--focus-first-steps 600 learns it. Not a timing benchmark: the numbers are accuracies, not seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import model  # noqa: E402
import synth  # noqa: E402
import visrl  # noqa: E402


@torch.no_grad()
def exact_match_by_kind(net, collate, samples) -> dict[str, float]:
    """Share of samples of each kind whose response tokens are all the greedy argmax."""
    net.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(samples), 48):
        chunk = samples[start:start + 48]
        batch = collate(chunk)
        features = dpo.encode_images(net, batch)
        hidden = net.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["row_grid_thw"],
                           mm_encoder_outputs={"image": BaseModelOutputWithPooling(
                               pooler_output=[features[i] for i in batch["image_index"]])}).last_hidden_state
        response = hidden.reshape(-1, hidden.shape[-1])[batch["response_index"]]  # [N, H]
        wrong = (net.lm_head(response).argmax(-1) != batch["response_targets"]).long()  # [N]
        wrong_per_row = torch.zeros(len(chunk), dtype=torch.long).index_add_(0, batch["response_row"], wrong)
        for kind, hit in zip([s.kind for s in chunk], (wrong_per_row == 0).tolist()):
            hits.setdefault(kind, []).append(hit)
    net.train()
    return {kind: round(100 * sum(v) / len(v), 1) for kind, v in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=800)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--focus-first-steps", type=int, default=0)
    parser.add_argument("--focus-only", action="store_true", help="train on focus samples only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=250)
    args = parser.parse_args()

    cfg = visrl.SFTConfig(seed=args.seed, batch_size=8, lr=2e-3, lora_rank=16, lora_alpha=32.0,
                          crop_alone_samples=True, focus_first_steps=args.focus_first_steps)
    net, processor = model.load_model("tiny")
    visrl.seed_everything(args.seed)  # after loading: the adapter's initialisation follows the seed
    model.add_lora(net, model.LoRAConfig(cfg.lora_rank, cfg.lora_alpha))
    world = model.Dist()
    records = data.read_records(synth.resolve_data("synth", "train", args.seed), limit=args.records)
    samples = visrl.build_sft_samples(cfg, records, processor, world)
    if args.focus_only:
        samples = [s for s in samples if s.kind == "focus"]
    test_records = data.read_records(synth.resolve_data("synth", "test", args.seed))
    test_samples = visrl.build_sft_samples(cfg, test_records, processor, world)
    pixel_cache = {}
    collate = lambda rows: chat.collate(rows, processor.image_processor, processor.tokenizer.pad_token_id,
                                        net.config.image_token_id, pixel_cache)

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler = visrl.make_optimizer(params, cfg.lr, args.steps, cfg.warmup_ratio)
    stream = visrl.sft_index_stream(cfg, samples, world, 0)
    print(f"{len(samples)} samples from {len(records)} records; {args.steps} steps, "
          f"focus first {args.focus_first_steps}{', focus only' if args.focus_only else ''}", flush=True)
    for step in range(1, args.steps + 1):
        batch = collate([samples[i] for i in next(stream)])
        loss = visrl.sft_loss(net, batch, torch.tensor(float(len(batch["response_targets"]))))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, visrl.GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % args.every == 0 or step == args.steps:
            print(f"step {step}  loss {loss.item():.4f}  held-out exact match %: "
                  f"{exact_match_by_kind(net, collate, test_samples)}", flush=True)


if __name__ == "__main__":
    main()
