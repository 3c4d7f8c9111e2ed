"""Worker for test_distributed.py: greedy generation with an FSDP2-sharded model.

Run under torchrun; rank 0 writes the replies (JSON) to OUT. The model is sharded exactly as
training shards it (decoder layers, the vision tower, the objective as root).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
import runs  # noqa: E402
import visrl  # noqa: E402


def main(out: str, data_path: str) -> None:
    world = model.setup_distributed("cpu")
    net, processor = model.load_model("tiny")
    objective = visrl.SFTObjective(net)
    if world.world_size > 1:
        model.shard(objective, net, mixed_precision=False)
    records = data.read_records(data_path)[:2]
    prompts = [(chat.focus_messages(r.question), [data.load_image(r)]) for r in records]
    with model.unsharded(objective):
        replies = model.sample(net, processor, prompts, model.Sampling(max_new_tokens=6))
    if world.is_main:
        Path(out).write_text(json.dumps(replies))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    runs.leave_process_group()  # finished: no interpreter teardown under torchrun (see there)
