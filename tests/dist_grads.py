"""Worker for test_distributed.py: one SFT step's gradients after the cross-rank reduction.

Run as `python tests/dist_grads.py OUT DATA BATCH` (1 process) or under torchrun (N processes, BATCH
per rank, sharded with FSDP2 as training shards it); writes the LoRA gradients of the first optimizer
step, summed over ranks and gathered whole, to OUT (rank 0).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
import runs  # noqa: E402
import visrl  # noqa: E402

out, data_path, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
world = model.setup_distributed("cpu")
torch.manual_seed(0)
cfg = visrl.SFTConfig(data=data_path, batch_size=batch_size)
net, processor = visrl.prepare_model("tiny", None, model.LoRAConfig(rank=4, alpha=8), world, "float32", False)
for m in model.lora_modules(net).values():  # non-zero B so every factor has a gradient
    torch.nn.init.normal_(m.lora_B.weight, std=0.02)
names = [n for n, p in net.named_parameters() if p.requires_grad]
objective = visrl.SFTObjective(net)
if world.world_size > 1:
    model.shard(objective, net, mixed_precision=False)
records = data.read_records(data_path)
samples = visrl.build_sft_samples(cfg, records, processor, world)
indices = next(visrl.batch_stream(len(samples), batch_size, world, seed=0, start=0))
batch = chat.collate([samples[i] for i in indices], processor.image_processor, processor.tokenizer.pad_token_id,
                     net.config.image_token_id)
n_tokens = model.all_reduce_sum(torch.tensor(float(len(batch["response_targets"]))), world)
objective(batch, n_tokens)[0].backward()
grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in model.trainable_parameters(net)]
if world.is_main:
    save_file({n: g.contiguous() for n, g in zip(names, grads)}, out)
runs.leave_process_group()  # finished: no interpreter teardown under torchrun (see there)
