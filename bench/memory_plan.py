"""What one visrl training step needs: per-GPU peak memory, broken down, and its FLOPs; checked against measured steps.

    python bench/memory_plan.py --shape qwen2.5-vl-7b --world 8 --stage dpo2        # one plan, broken down
    python bench/memory_plan.py --model /path/to/Qwen2.5-VL-7B-Instruct --grad-checkpointing
    python bench/memory_plan.py --guide                    # docs/guide.md's table: 1-8 GPUs of 24/40/80/141 GB
    python bench/memory_plan.py --validate                 # this CPU: predicted vs measured, 7B shape at 1/2/4 layers

The model of memory (bytes; T tokens through the decoder in a micro-batch, N response tokens, V vocabulary, H hidden,
I MLP width, all of it read off the code path of visrl's step):
  weights      every frozen parameter in its dtype, / world under FSDP2, plus the units FSDP2 holds gathered at once
               (the root - embeddings, final norm, lm_head - for the whole step, a decoder layer and the next one)
  lora         adapter parameters, gradients and AdamW's two moments, all fp32: 16 bytes a parameter, / world
  activations  what autograd keeps per token per decoder layer, counted tensor by tensor (saved_per_token), for
               every layer; with gradient checkpointing only each layer's input, plus one layer recomputed
  transient    the largest short-lived working set on top of them: the backward of one decoder layer, or the
               log-prob chunks (dpo.linear_logprobs: [min(N, 1024), V] fp32 logits recomputed in backward), or the
               reference's own pass when it is not precomputed
  vision       the frozen tower runs first, without gradients: its features stay for the step
FLOPs: 2 per multiply-add; a frozen weight's backward computes the input gradient only (1x forward, not 2x); the
log-probs touch lm_head at the N response positions only; checkpointing recomputes each layer's forward once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first: bench/generate.py must not stand for the project's generate.py
import model  # noqa: E402
import shapes  # noqa: E402

GIB = 2 ** 30
LOGP_CHUNK = 1024  # dpo.LOGP_CHUNK
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM), for MFU

# --------------------------------------------------------------------------------------------
# The model's sizes, counted exactly on the meta device (no memory, no weights needed).

@dataclass
class Sizes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head dim
    vocab: int
    root_params: int  # embeddings, final norm, lm_head: FSDP2's root unit (a tied lm_head counted once)
    layer_params: int  # one decoder layer
    vision_params: int  # the vision tower and its merger
    vision_depth: int
    vision_hidden: int
    lora_params: int  # the adapter at this rank on every linear of the decoder (visrl's default targets)
    lora_rank: int

def sizes_of(config, lora_rank: int = 8) -> Sizes:
    """Sizes of a Qwen-VL config (a transformers config object) with a rank-`lora_rank` adapter on all linears."""
    arch = config.model_type
    with torch.device("meta"):
        net = model.ARCHS[arch][1]._from_config(config, dtype=torch.bfloat16)
        model.add_lora(net, model.LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank))
    count = lambda module: sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)  # noqa: E731
    text, lm = config.text_config, model.language_model(net)
    layer = count(lm.layers[0])
    total = sum(p.numel() for n, p in net.named_parameters() if "lora_" not in n)
    vision = count(net.model.visual)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision_hidden = getattr(config.vision_config, "hidden_size", None)
    if arch == "qwen2_vl":
        vision_hidden = config.vision_config.embed_dim
    return Sizes(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                 heads=text.num_attention_heads, kv_dim=text.num_key_value_heads * head_dim, vocab=text.vocab_size,
                 root_params=total - vision - layer * text.num_hidden_layers, layer_params=layer,
                 vision_params=vision, vision_depth=config.vision_config.depth, vision_hidden=vision_hidden,
                 lora_params=sum(p.numel() for n, p in net.named_parameters() if "lora_" in n), lora_rank=lora_rank)

def load_config(model_dir: str | None = None, shape: str | None = None, layers: int = 0):
    """The config of a checkpoint directory (config.json alone is read) or of a named real shape."""
    if shape:
        return shapes.shape_config(shape, shapes.build_tokenizer(), layers)
    path = model.resolve_model_path(model_dir)
    config = model.ARCHS[json.loads((path / "config.json").read_text())["model_type"]][0].from_pretrained(path)
    if layers:
        config.text_config.num_hidden_layers = layers
    return config

# --------------------------------------------------------------------------------------------
# One micro-batch as the step sees it, and the plan of a step.

@dataclass
class Micro:
    rows: int  # rows through the decoder: SFT samples, or DPO pairs packed one a row
    row_len: int  # padded length of every row
    responses: int  # response tokens whose log-probs are taken (both sides of a pair)
    patches: int  # vision patches of the micro-batch's distinct images (before the 2x2 merge)

@dataclass
class Setup:
    world: int = 1  # ranks (GPUs); FSDP2 shards over them
    fsdp: bool = False  # FSDP2 on (visrl shards when world > 1; bench/gpu_check.py also at world 1)
    grad_checkpointing: bool = False
    # how the adapters see their input, which they keep for backward: `fp32` copies (CPU), `autocast` (CUDA, one
    # process: the fp32 copy cast back to a bf16 copy per adapter), `bf16` (FSDP2's bf16 parameters on CUDA: no copy,
    # so q/k/v and gate/up keep one shared input each)
    adapter_inputs: str = "fp32"
    weight_bytes: int = 2  # bf16 weights
    reference_per_step: bool = False  # --no-reuse: the reference's pass each step instead of the precomputed table

def saved_per_token(s: Sizes, setup: Setup) -> int:
    """Bytes autograd keeps per token for one decoder layer, tensor by tensor (LoRA on every linear, frozen base):
    MLP gate, up and act(gate) [I] bf16; the adapters' inputs (q, k, v, o, gate, up [H]; down [I]); both RMSNorms'
    fp32 inputs [H]; rotated q and the attention output [H], rotated k and v [kv] bf16; the attention's log-sum-exp
    [heads] fp32; the 7 adapters' rank-wide middles and the norms' fp32 scales. A frozen linear keeps nothing (its
    input gradient needs only its weight)."""
    b, adapter_b = 2, 4 if setup.adapter_inputs == "fp32" else 2
    adapters = {"fp32": 4 * (6 * s.hidden + s.intermediate), "autocast": 2 * (6 * s.hidden + s.intermediate),
                "bf16": 2 * (3 * s.hidden + s.intermediate)}[setup.adapter_inputs]
    return (3 * s.intermediate * b + adapters + 2 * 4 * s.hidden + 2 * (s.hidden + s.kv_dim) * b + 4 * s.heads
            + 7 * s.lora_rank * adapter_b + 2 * 4)

def plan(s: Sizes, micro: Micro, setup: Setup) -> dict:
    """Per-GPU peak bytes of a training step over micro-batches like `micro`, by part (their sum is the peak), at the
    larger of two moments. As backward starts: everything saved, plus the widest of the log-prob chunks' backward and
    the final norm's (a decoder layer's backward frees its saved tensors as fast as it makes gradients). Under FSDP2,
    as the forward starts: the root unit's all-gather output and its unsharded copy both live while the vision unit
    gathers the same way (measured: --validate-world 2); with few layers this is the larger."""
    w = setup.world
    tokens = micro.rows * micro.row_len
    weights = (s.root_params + s.layers * s.layer_params + s.vision_params) * setup.weight_bytes
    shard = weights / w if setup.fsdp else weights
    gathered = (s.root_params + min(2, s.layers) * s.layer_params) * setup.weight_bytes if setup.fsdp else 0
    lora = 16 * s.lora_params / (w if setup.fsdp else 1)
    per_layer = saved_per_token(s, setup) * tokens
    if setup.grad_checkpointing:
        activations = 2 * s.hidden * tokens * s.layers + per_layer  # each layer's input; one layer recomputed
    else:
        activations = per_layer * s.layers
    final = 4 * s.hidden * tokens  # the final norm's fp32 input
    chunk = min(micro.responses, LOGP_CHUNK)
    logits = 12 * chunk * s.vocab  # backward: logits, logits - lse and its exp, [chunk, V] fp32 each
    transient = max(logits, 2 * 4 * s.hidden * tokens)  # or the final norm's backward: two [T, H] fp32
    if setup.reference_per_step:  # after the policy's forward, its activations kept: a layer's MLP, no grad
        transient = max(transient, 4 * 2 * s.intermediate * tokens + 2 * 2 * s.hidden * tokens)
    features = micro.patches // 4 * s.hidden * 2
    backward = {"fsdp_gathered": gathered, "activations": activations, "final_norm_and_features": final + features,
                "transient": transient}
    gathering = 2 * (s.root_params + s.vision_params) * setup.weight_bytes if setup.fsdp else 0
    moment = backward if sum(backward.values()) >= gathering else {"fsdp_gathering_at_forward_start": gathering}
    return {"weights": shard, "lora_and_adam": lora, **moment}

def step_flops(s: Sizes, micro: Micro, setup: Setup, micro_steps: int = 1) -> dict:
    """FLOPs of one optimizer step (micro_steps micro-batches like `micro`): `model` without recomputation (for MFU),
    `hardware` with it."""
    tokens = micro.rows * micro.row_len
    linear = 2 * s.layer_params * tokens  # a layer's matmuls, forward (norms and biases are noise)
    attention = 2 * 2 * micro.rows * micro.row_len ** 2 * s.hidden / 2  # QK^T and PV, causal half
    lora = 2 * (s.lora_params / s.layers) * tokens
    layer_forward = linear + attention + lora
    layer_backward = linear + 2 * attention + 2 * lora  # frozen weights: input gradients only
    head = 2 * s.hidden * s.vocab * micro.responses  # log-probs at response positions
    vision = 2 * s.vision_params * micro.patches
    forward = s.layers * layer_forward + head + vision
    backward = s.layers * layer_backward + 2 * head  # recomputed logits, then the hidden's gradient
    reference = s.layers * layer_forward + head if setup.reference_per_step else 0
    recompute = s.layers * layer_forward if setup.grad_checkpointing else 0
    model_flops = micro_steps * (forward + backward + reference)
    return {"model": model_flops, "hardware": model_flops + micro_steps * recompute}

# --------------------------------------------------------------------------------------------
# Upstream's settings as micro-batches: 512x512 images (324 tokens each after the 2x2 merge), stage 2's answer row
# the longest (both images), rows padded to the longest; text and response lengths of VisRL's prompts.

IMAGE_TOKENS = 324  # a 512x512 image: 36 x 36 patches of 14 px, merged 2x2
PROMPT_TOKENS, BOX_TOKENS, ANSWER_TOKENS = 80, 25, 12  # system + question + instruction; a box reply; an answer

def upstream_micro(stage: str, batch: int, image_tokens: int = IMAGE_TOKENS) -> Micro:
    """A micro-batch of upstream's experiment: sft (batch samples, half box steps, half answer steps), dpo1 (batch
    box pairs), dpo2 (batch pairs, each a box and an answer row, packed: prefix | chosen | rejected)."""
    patches = 4 * image_tokens
    box_row = PROMPT_TOKENS + image_tokens + BOX_TOKENS
    answer_row = PROMPT_TOKENS + 2 * image_tokens + BOX_TOKENS + ANSWER_TOKENS
    if stage == "sft":
        return Micro(batch, answer_row, batch * (BOX_TOKENS + ANSWER_TOKENS) // 2, batch * patches * 3 // 2)
    if stage == "dpo1":
        return Micro(batch, box_row + BOX_TOKENS, batch * 2 * BOX_TOKENS, batch * patches)
    return Micro(2 * batch, answer_row + ANSWER_TOKENS, batch * 2 * (BOX_TOKENS + ANSWER_TOKENS), batch * 3 * patches)

def render(parts: dict, flops: dict | None = None) -> str:
    """A plan as lines: each part in GiB, the peak, the step's FLOPs."""
    lines = [f"  {k:<32} {v / GIB:8.2f} GiB" for k, v in parts.items()]
    lines.append(f"  {'peak':<32} {sum(parts.values()) / GIB:8.2f} GiB")
    if flops:
        lines.append(f"  step FLOPs: {flops['model'] / 1e12:.1f} T (model), {flops['hardware'] / 1e12:.1f} T (with "
                     "recomputation)")
    return "\n".join(lines)

GPU_SIZES = (24, 40, 80, 141)  # GB of common cards: L4/A10-class, A100-40G, A100/H100-80G, H200

def guide_table(shape: str = "qwen2.5-vl-7b") -> str:
    """docs/guide.md's table: upstream's DPO stage 2 (3 pairs a micro-batch, r8, bf16 under CUDA autocast) on 1-8 GPUs:
    the peak without and with checkpointing, and the first setting that fits each card (90% of it usable)."""
    s = sizes_of(load_config(shape=shape))
    micro = upstream_micro("dpo2", 3)
    rows = ["| GPUs | peak, plain | peak, --grad-checkpointing | " + " | ".join(f"{g} GB" for g in GPU_SIZES) + " |",
            "|---:|---:|---:|" + "---|" * len(GPU_SIZES)]
    for world in (1, 2, 4, 8):
        peaks = {}
        for ckpt in (False, True):
            setup = Setup(world=world, fsdp=world > 1, grad_checkpointing=ckpt,
                          adapter_inputs="bf16" if world > 1 else "autocast")
            peaks[ckpt] = sum(plan(s, micro, setup).values())
        fits = []
        for gb in GPU_SIZES:
            usable = 0.9 * gb * 1e9
            fits.append("fits" if peaks[False] <= usable else "--grad-checkpointing" if peaks[True] <= usable
                        else "no (fewer pairs a micro-batch)")
        rows.append(f"| {world} | {peaks[False] / GIB:.1f} GiB | {peaks[True] / GIB:.1f} GiB | "
                    + " | ".join(fits) + " |")
    return "\n".join(rows)

# --------------------------------------------------------------------------------------------
# Measuring: one real visrl step under the profiler, peak of the bytes torch has allocated (CPU's analogue of
# torch.cuda.max_memory_allocated), and the micro-batches it saw.

def allocated_peaks(prof, window_name: str) -> list[int]:
    """The peak live bytes in each window named window_name (a record_function), from every allocation and free the
    profiler saw, in time order, since it started (an op's own totals would misplace its temporaries' frees)."""
    from torch._C._profiler import _EventType

    allocations, windows, stack = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.name == window_name:
            windows.append((node.start_time_ns, node.end_time_ns))
        stack.extend(node.children)
    allocations.sort()
    peaks, live, i = [], 0, 0
    for start, end in sorted(windows):
        while i < len(allocations) and allocations[i][0] < start:
            live += allocations[i][1]
            i += 1
        peak = live
        while i < len(allocations) and allocations[i][0] <= end:
            live += allocations[i][1]
            peak = max(peak, live)
            i += 1
        peaks.append(peak)
    return peaks

def micro_of(batch: dict) -> Micro:
    """A collated batch's sizes (packed DPO rows if it has them)."""
    ids = batch.get("packed_ids", batch["input_ids"])
    return Micro(rows=ids.shape[0], row_len=ids.shape[1], responses=len(batch["response_targets"]),
                 patches=batch["pixel_values"].shape[0])

def measure(cfg, steps: int = 2) -> tuple[list[int], list[Micro]]:
    """Run visrl.train(cfg) for `steps` optimizer steps under the profiler: each step's peak allocated bytes, and the
    micro-batches of the step (the largest one's sizes feed the plan)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import visrl

    seen, train_step = [], visrl.train_step

    def watched(objective, micro, *args):
        seen.append([micro_of(b) for b in micro])
        with record_function("visrl.train_step"):
            return train_step(objective, micro, *args)

    cfg.max_steps, visrl.train_step = steps, watched
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            visrl.train(cfg)
    finally:
        visrl.train_step = train_step
    return allocated_peaks(prof, "visrl.train_step"), [max(
        m, key=lambda x: x.rows * x.row_len) for m in seen]

def write_pairs(records, path: Path) -> Path:
    """Preference pairs from annotated records (the true box and answer chosen, a shifted box and another pattern
    rejected): a DPO step to measure, as long as the recipe's pairs."""
    import chat
    import data
    import synth

    with open(path, "w") as f:
        for i, r in enumerate(records):
            x1, y1, x2, y2 = r.box
            shift = (x2 - x1) if x2 + (x2 - x1) <= r.width else -(x2 - x1)
            pair = data.Pair(r, chat.box_to_text(r.box, r.width, r.height),
                             chat.box_to_text((x1 + shift, y1, x2 + shift, y2), r.width, r.height),
                             r.answer, synth.SYNTH_PATTERNS[(synth.SYNTH_PATTERNS.index(r.answer) + 1) % 6])
            f.write(json.dumps(data.pair_json(pair, path.parent)) + "\n")
    return path

def measure_ranks(cfg, world: int, work: Path, steps: int) -> tuple[list[int], list[Micro]]:
    """measure() in each of `world` torchrun ranks (FSDP2, as visrl shards): the largest rank's peaks."""
    import subprocess

    spec = work / "measure.json"
    spec.write_text(json.dumps({"kind": type(cfg).__name__, "cfg": asdict(cfg), "steps": steps}))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), __file__, "--measure-one", str(spec)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {world} measuring ranks failed:\n{done.stderr[-3000:]}")
    results = [json.loads((work / f"measure.rank{r}.json").read_text()) for r in range(world)]
    peaks = [max(r["peaks"][i] for r in results) for i in range(len(results[0]["peaks"]))]
    return peaks, [Micro(**m) for m in results[0]["micros"]]

def measure_one(spec_path: str) -> None:
    """A torchrun rank of measure_ranks: measure, write this rank's peaks and micro-batches beside the spec."""
    import os

    import dpo
    import runs
    import visrl

    spec = json.loads(Path(spec_path).read_text())
    cls = {"SFTConfig": visrl.SFTConfig, "DPOConfig": dpo.DPOConfig}[spec["kind"]]
    peaks, micros = measure(cls(**spec["cfg"]), spec["steps"])
    rank = int(os.environ.get("RANK", "0"))
    (Path(spec_path).parent / f"measure.rank{rank}.json").write_text(
        json.dumps({"peaks": peaks, "micros": [asdict(m) for m in micros]}))
    runs.leave_process_group()

def validate(layer_counts=(1, 2, 4), shape: str = "qwen2.5-vl-7b", vision_depth: int = 2, steps: int = 1,
             work: str | None = None, world: int = 1) -> list[dict]:
    """Predicted vs measured peak of an sft and a dpo stage-2 step on random checkpoints of `shape` at each layer
    count (bf16, on this CPU: the adapters' inputs saved in fp32); world > 1: FSDP2 over that many torchrun ranks,
    each with the same micro-batch. Prints a markdown table."""
    import data
    import dpo
    import synth
    import visrl

    work = Path(work or tempfile.mkdtemp(prefix="memory_plan."))
    synth_dir = work / "synth"
    if not (synth_dir / "train.jsonl").exists():
        synth.make_synth(synth_dir, n_train=24, n_val=2, n_test=2, seed=0)
    pairs = write_pairs(data.read_records(synth_dir / "train.jsonl")[:12], synth_dir / "pairs.jsonl")
    rows = []
    print(f"| layers | step{' (' + str(world) + ' ranks, FSDP2)' if world > 1 else ''} | tokens x rows | responses | "
          "predicted | measured | error | predicted - weights | measured - weights |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for layers in layer_counts:
        checkpoint = work / f"{shape}-{layers}"
        if not (checkpoint / "config.json").exists():
            model.make_shape(checkpoint, shape, layers=layers, vision_depth=vision_depth)
        s = sizes_of(load_config(str(checkpoint)))
        common = dict(model=str(checkpoint), out=str(work / "run"), overwrite=True, val_fraction=0.0, grad_accum=1,
                      dtype="bfloat16")
        sft = lambda **kw: visrl.SFTConfig(data=str(synth_dir / "train.jsonl"), batch_size=2, limit=12,  # noqa: E731
                                           **common, **kw)
        dpo2 = lambda **kw: dpo.DPOConfig(data=str(pairs), stage=2, batch_size=3, **common, **kw)  # noqa: E731
        plain = Setup(world=world, fsdp=world > 1)
        runs = [("sft", sft(), plain), ("dpo stage 2", dpo2(), plain)]
        if layers == max(layer_counts) and world == 1:  # the switches, at the largest model
            runs += [("sft, checkpointing", sft(grad_checkpointing=True), Setup(grad_checkpointing=True)),
                     ("dpo stage 2, checkpointing", dpo2(grad_checkpointing=True), Setup(grad_checkpointing=True)),
                     ("dpo stage 2, --no-reuse", dpo2(reuse=False), Setup(reference_per_step=True))]
        for stage, cfg, setup in runs:
            peaks, micros = measure(cfg, steps) if world == 1 else measure_ranks(cfg, world, work, steps)
            micro = max(micros, key=lambda m: m.rows * m.row_len)
            parts = plan(s, micro, setup)
            predicted, measured = sum(parts.values()), max(peaks)
            weights = parts["weights"]
            rows.append(dict(layers=layers, stage=stage, micro=asdict(micro), parts=parts, predicted=predicted,
                             measured=measured))
            print(f"| {layers} | {stage} | {micro.row_len} x {micro.rows} | {micro.responses} | "
                  f"{predicted / GIB:.2f} GiB | {measured / GIB:.2f} GiB | {100 * (predicted / measured - 1):+.1f}% | "
                  f"{(predicted - weights) / GIB:.2f} GiB | {(measured - weights) / GIB:.2f} GiB |", flush=True)
    return rows

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(shapes.REAL_SHAPES), help="a named real shape (default qwen2.5-vl-7b)")
    p.add_argument("--model", help="a checkpoint directory (its config.json is read) instead of --shape")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the model's)")
    p.add_argument("--stage", choices=("sft", "dpo1", "dpo2"), default="dpo2")
    p.add_argument("--batch", type=int, default=0, help="samples (sft) or pairs (dpo) a micro-batch (default: "
                                                        "upstream's, 2 for sft and 3 for dpo)")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches a step (for the step's FLOPs)")
    p.add_argument("--image-tokens", type=int, default=IMAGE_TOKENS, help="tokens an image (324: 512x512)")
    p.add_argument("--world", type=int, default=1, help="GPUs (FSDP2 shards over them when more than one)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-reuse", action="store_true", help="the reference's pass each step (dpo --no-reuse)")
    p.add_argument("--cpu", action="store_true", help="as on a CPU: adapters' inputs kept in fp32, no autocast")
    p.add_argument("--guide", action="store_true", help="print docs/guide.md's table and exit")
    p.add_argument("--validate", action="store_true", help="measure on this machine, print the validation table")
    p.add_argument("--layer-counts", default="1,2,4", help="--validate: layer counts to measure")
    p.add_argument("--work", help="--validate: a directory for its checkpoints and data (kept; default: a new one)")
    p.add_argument("--validate-world", type=int, default=1, help="--validate: FSDP2 over this many torchrun ranks")
    p.add_argument("--measure-one", help=argparse.SUPPRESS)  # a torchrun rank of --validate-world
    args = p.parse_args(argv)
    if args.guide:
        print(guide_table(args.shape or "qwen2.5-vl-7b"))
        return
    if args.measure_one:
        measure_one(args.measure_one)
        return
    if args.validate:
        validate(tuple(int(n) for n in args.layer_counts.split(",")), args.shape or "qwen2.5-vl-7b", work=args.work,
                 world=args.validate_world)
        return
    config = load_config(args.model, None if args.model else args.shape or "qwen2.5-vl-7b", args.layers)
    s = sizes_of(config, args.lora_rank)
    micro = upstream_micro(args.stage, args.batch or (2 if args.stage == "sft" else 3), args.image_tokens)
    setup = Setup(world=args.world, fsdp=args.world > 1, grad_checkpointing=args.grad_checkpointing,
                  adapter_inputs="fp32" if args.cpu else "bf16" if args.world > 1 else "autocast",
                  reference_per_step=args.no_reuse)
    print(f"{args.model or args.shape or 'qwen2.5-vl-7b'}: {s.layers} layers; {args.stage}, a micro-batch of "
          f"{micro.rows} rows x {micro.row_len} tokens, {micro.responses} response tokens; world {args.world}"
          f"{', gradient checkpointing' if args.grad_checkpointing else ''}")
    print(render(plan(s, micro, setup), step_flops(s, micro, setup, args.grad_accum)))
    if config.model_type not in ("qwen2_5_vl", "qwen2_vl"):  # weights and adapters are counted from the model itself
        print(f"note: {config.model_type}: the activations are counted as a Qwen2.5-VL layer keeps them (attention, "
              "MLP); its own layers (DeepStack, linear attention) are not traced or validated yet")

if __name__ == "__main__":
    import runs

    runs.cli(lambda: None, lambda _: main())  # an expected error (a bad --model) is one line
