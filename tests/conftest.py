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
