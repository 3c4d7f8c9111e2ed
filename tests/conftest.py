"""Shared fixtures: one tiny checkpoint per architecture and a small synthetic set per test session."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session", autouse=True)
def visrl_cache(tmp_path_factory):
    """Built-in assets go to a temporary cache, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("visrl-cache")
    os.environ["VISRL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_path(visrl_cache):
    import model

    return model.resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_qwen2_path(visrl_cache):
    import model

    return model.resolve_model_path("tiny-qwen2-vl")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    import synth

    root = tmp_path_factory.mktemp("synth")
    synth.make_synth(root, n_train=48, n_val=8, n_test=8, seed=0)
    return root


def write_pairs(records, path, seed=0):
    """Hand-made preference pairs from annotated records: the true box and answer are chosen; a
    random box elsewhere and a wrong digit are rejected."""
    import json
    import random

    import data

    rng = random.Random(seed)
    with open(path, "w") as f:
        for r in records:
            wrong = str((int(r.answer) + rng.randint(1, 9)) % 10) if r.answer.isdigit() else r.answer + "?"
            pair = data.Pair(r, data.box_to_text(r.box, r.width, r.height),
                             data.box_to_text(data.random_box(r.width, r.height, rng), r.width, r.height),
                             r.answer, wrong)
            f.write(json.dumps(data.pair_json(pair, path.parent)) + "\n")
    return path


@pytest.fixture(scope="session")
def pairs_file(synth_dir):
    import data

    return write_pairs(data.read_records(synth_dir / "train.jsonl")[:16], synth_dir / "pairs.jsonl")
