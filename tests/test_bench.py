"""The benchmarks a GPU run relies on: the memory plan's accounting and the GPU check's CPU dry run."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # last: bench/generate.py must not stand for the project's generate.py
import memory_plan  # noqa: E402

import model  # noqa: E402


def test_allocated_peaks_sees_every_allocation_and_free_in_a_window():
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = [torch.zeros(250_000)]  # 1 MB live when the window opens
        with record_function("window"):
            a = torch.zeros(1_000_000)  # +4 MB
            b = a + 1  # +4 MB: 9 MB live, the peak
            del a
            c = b.exp()  # +4 - 0: 9 MB again
            del b, c
        with record_function("window"):
            kept.append(torch.zeros(500_000))  # 1 + 2 MB
    peaks = memory_plan.allocated_peaks(prof, "window")  # (+ a few bytes of the ops' own bookkeeping)
    assert [round(p / 1000) for p in peaks] == [9_000, 3_000]


def test_the_plans_count_of_saved_activations_is_what_autograd_keeps():
    # an independent count: every tensor autograd saves in a LoRA'd decoder layer's forward (tiny widths, bf16 weights,
    # fp32 adapters, as on this CPU), unique storages, weights excluded, against saved_per_token x tokens
    net, _ = model.load_model("tiny", dtype=torch.bfloat16)
    model.add_lora(net, model.LoRAConfig(rank=8, alpha=16.0))
    net.train()
    sizes = memory_plan.sizes_of(net.config)
    layer = model.language_model(net).layers[0]
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = 64
    x = torch.randn(1, tokens, sizes.hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None].expand(3, 1, tokens)
    rotary = model.language_model(net).rotary_emb(x, positions)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(x, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    per_token = memory_plan.saved_per_token(sizes, memory_plan.Setup(adapter_inputs="fp32"))
    rotary_bytes = sum(t.untyped_storage().nbytes() for t in rotary)  # cos/sin: shared by every layer, not per layer
    assert sum(saved.values()) - rotary_bytes == per_token * tokens


def test_the_plan_counts_the_7b_shape_as_published():
    sizes = memory_plan.sizes_of(memory_plan.load_config(shape="qwen2.5-vl-7b"))
    assert sizes.root_params + sizes.layers * sizes.layer_params + sizes.vision_params == 8_292_166_656
    assert sizes.lora_params == 28 * 8 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    parts = memory_plan.plan(sizes, memory_plan.upstream_micro("dpo2", 3), memory_plan.Setup(world=8, fsdp=True))
    assert parts["weights"] == 8_292_166_656 * 2 / 8  # bf16, sharded over 8
    # FSDP2's two moments: 28 layers' activations outweigh the root's gathering; with checkpointing they do not
    assert "activations" in parts
    checkpointed = memory_plan.plan(sizes, memory_plan.upstream_micro("dpo2", 3),
                                    memory_plan.Setup(world=8, fsdp=True, grad_checkpointing=True))
    assert checkpointed["fsdp_gathering_at_forward_start"] == 2 * 2 * (sizes.root_params + sizes.vision_params)


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--steps", "1", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    smoke = [line for line in table.splitlines() if line.startswith("| smoke: ")]
    assert len(smoke) == 7 and all("| ok" in line for line in smoke), table
    steps = [line for line in table.splitlines() if line.startswith("| off |") or line.startswith("| on |")]
    assert len(steps) == 2, table
