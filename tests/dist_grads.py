"""Worker for test_distributed.py: one SFT step's gradients after the cross-rank reduction.

Run as `python tests/dist_grads.py OUT DATA BATCH` (1 process) or under torchrun (N processes, BATCH
per rank); writes the summed, reduced LoRA gradients of the first optimizer step to OUT (rank 0).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
import visrl  # noqa: E402

out, data_path, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
world = model.setup_distributed("cpu")
torch.manual_seed(0)
cfg = visrl.SFTConfig(data=data_path, batch_size=batch_size)
net, processor = visrl.prepare_model("tiny", None, model.LoRAConfig(rank=4, alpha=8), world, "float32", False)
for m in model.lora_modules(net).values():  # non-zero B so every factor has a gradient
    torch.nn.init.normal_(m.lora_B.weight, std=0.02)
records = data.read_records(data_path)
samples = visrl.build_sft_samples(cfg, records, processor, world)
indices = next(visrl.batch_stream(len(samples), batch_size, world, seed=0, start=0))
batch = chat.collate([samples[i] for i in indices], processor.image_processor, processor.tokenizer.pad_token_id,
                     net.config.image_token_id)
n_tokens = model.all_reduce_sum(torch.tensor(float(len(batch["response_targets"]))), world)
visrl.sft_loss(net, batch, n_tokens).backward()
params = model.trainable_parameters(net)
visrl.reduce_gradients(params, world)
if world.is_main:
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    save_file({n: p.grad.contiguous() for n, p in zip(names, params)}, out)
