"""The built-in checkpoints: real Qwen-VL shapes against their published numbers, and one run on the 7B shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import chat
import model
import shapes
from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent

# Each Instruct checkpoint's parameter count on the Hugging Face hub: model.safetensors.index.json's total_size / 2
# (bf16), e.g. 16,584,333,312 bytes for Qwen2.5-VL-7B-Instruct.
PUBLISHED_PARAMETERS = {"qwen2.5-vl-3b": 3_754_622_976, "qwen2.5-vl-7b": 8_292_166_656,
                        "qwen2.5-vl-72b": 73_410_777_344, "qwen2-vl-7b": 8_291_375_616}


@pytest.fixture(scope="module")
def tokenizer():
    return shapes.build_tokenizer()


@pytest.mark.parametrize("shape", sorted(PUBLISHED_PARAMETERS))
def test_a_real_shape_has_the_published_parameter_count(shape, tokenizer):
    config = shapes.shape_config(shape, tokenizer)
    cls = model.ARCHS[config.model_type][1]
    with torch.device("meta"):  # no memory: shapes only
        net = cls(config)
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMETERS[shape]


# The Qwen3 shapes, against counts published to 4 digits (the hub's index files were not readable here): Qwen3-VL-8B-
# Instruct 8.767B of which the vision tower 576.4M (huggingface.co/OpenExplorer/Qwen3-VL-8B-Instruct, counted from
# Qwen's tensors); Qwen3.5-9B 9.41B without the multi-token-prediction layer transformers does not load (a 19.3 GB
# bf16 repository holds about 0.2B more), its vision tower 456.0M.
PUBLISHED_ROUNDED = {"qwen3-vl-8b": (8.767e9, 576.4e6), "qwen3.5-9b": (9.41e9, 456.0e6)}


@pytest.mark.parametrize("shape", sorted(PUBLISHED_ROUNDED))
def test_a_qwen3_shape_has_the_published_parameter_counts(shape):
    arch = shapes.REAL_SHAPES[shape][0]
    config = shapes.shape_config(shape, shapes.build_tokenizer(arch=arch))
    with torch.device("meta"):
        net = model.ARCHS[config.model_type][1](config)
    total, vision = PUBLISHED_ROUNDED[shape]
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(total, abs=0.0005e9 if total < 9e9 else 0.005e9)
    assert sum(p.numel() for p in net.model.visual.parameters()) == pytest.approx(vision, abs=0.05e6)
    text = config.text_config
    if arch == "qwen3-vl":  # the tower's DeepStack blocks feed the first decoder layers
        assert config.vision_config.deepstack_visual_indexes == [8, 16, 24] and text.head_dim == 128
    else:  # 8 x (3 linear-attention layers, 1 full-attention one)
        assert text.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 8
        short = shapes.shape_config(shape, shapes.build_tokenizer(arch=arch), layers=2)
        assert short.text_config.layer_types == ["linear_attention", "full_attention"]  # both kinds, still


def test_the_7b_shape_has_qwen25_vl_7b_widths(tokenizer):
    config = shapes.shape_config("qwen2.5-vl-7b", tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 28)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and not config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert (vision.out_hidden_size, vision.window_size, vision.fullatt_block_indexes) == (3584, 112, [7, 15, 23, 31])
    with torch.device("meta"):
        net = model.ARCHS["qwen2_5_vl"][1](config)
    layer = model.language_model(net).layers[0]
    assert layer.self_attn.k_proj.weight.shape == (512, 3584)  # 4 kv heads x 128
    assert layer.mlp.down_proj.weight.shape == (3584, 18944)
    # the tiny tokenizer inside: its special tokens are the config's
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_a_shortened_shape_keeps_its_widths_and_a_full_attention_block(tokenizer):
    config = shapes.shape_config("qwen2.5-vl-7b", tokenizer, layers=2, vision_depth=4)
    assert config.text_config.num_hidden_layers == 2 and config.text_config.hidden_size == 3584
    assert config.vision_config.depth == 4 and config.vision_config.fullatt_block_indexes == [3]
    half = shapes.shape_config("qwen2.5-vl-7b", tokenizer, vision_depth=16)
    assert half.vision_config.fullatt_block_indexes == [7, 15]


def test_tiny_writes_a_real_shape_that_loads(tmp_path):
    out = tmp_path / "q3b"
    model.tiny_command(model.TinyArgs(out=str(out), shape="qwen2.5-vl-3b", layers=1, vision_depth=1))
    about = json.loads((out / "visrl_shape.json").read_text())
    assert about == {"shape": "qwen2.5-vl-3b", "layers": 1, "vision_depth": 1, "dtype": "bfloat16", "seed": 0,
                     "config_only": False}
    net, processor = model.load_model(str(out), dtype=torch.bfloat16)
    assert net.config.text_config.hidden_size == 2048 and len(model.language_model(net).layers) == 1
    assert net.lm_head.weight is net.get_input_embeddings().weight  # the 3B ties them, as published
    assert net.dtype == torch.bfloat16 and "<|video_pad|>" in processor.tokenizer.get_vocab()


def test_the_72b_is_config_only_unless_shortened(tmp_path):
    result = subprocess.run([sys.executable, "visrl.py", "tiny", "--shape", "qwen2.5-vl-72b", "--out",
                             str(tmp_path / "big")], cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(result.returncode, result.stderr, "--config-only")
    model.tiny_command(model.TinyArgs(out=str(tmp_path / "cfg"), shape="qwen2.5-vl-72b", config_only=True))
    assert not list((tmp_path / "cfg").glob("*.safetensors"))
    config = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 8192 and config["text_config"]["num_hidden_layers"] == 80


def test_building_the_tiny_model_leaves_the_random_stream_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.make_tiny(tmp_path / "tiny", shapes.TinyConfig(num_layers=1, hidden_size=64, intermediate_size=64))
    assert torch.equal(torch.rand(3), expected)


def test_tiny_view_of_a_square_does_not_depend_on_a_pixel_of_its_size():
    # at max_pixels = 112 * 112 exactly, smart_resize turned a 288 px crop into 84 px and a 286 px one into 112
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = shapes.TinyConfig()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)  # as make_tiny
    assert {chat.model_view_size(side, side, image_processor) for side in range(200, 1400)} == {(112, 112)}


def test_the_tiny_cache_key_changes_with_everything_that_builds_the_model(monkeypatch):
    base = shapes.tiny_cache_key(shapes.TinyConfig())
    assert shapes.tiny_cache_key(shapes.TinyConfig()) == base  # deterministic
    assert shapes.tiny_cache_key(shapes.TinyConfig(hidden_size=64)) != base
    assert shapes.tiny_cache_key(shapes.TinyConfig(seed=1)) != base
    real_corpus = shapes._tokenizer_corpus
    monkeypatch.setattr(shapes, "_tokenizer_corpus", lambda: real_corpus() + ["one more line"])
    assert shapes.tiny_cache_key(shapes.TinyConfig()) != base
    monkeypatch.setattr(shapes, "_tokenizer_corpus", real_corpus)
    # transformers 5 swaps its lazy module in sys.modules on `from transformers import ...`, so a fresh
    # `import transformers` here may be another object than the one shapes.py reads: patch that one
    monkeypatch.setattr(shapes.transformers, "__version__", "0.0.0")
    assert shapes.tiny_cache_key(shapes.TinyConfig()) != base
    monkeypatch.undo()

    def build_tiny(out_dir, cfg, model_cls, processor_cls):  # the builder's code itself
        return out_dir

    monkeypatch.setattr(shapes, "build_tiny", build_tiny)
    assert shapes.tiny_cache_key(shapes.TinyConfig()) != base


@pytest.mark.slow
def test_sft_dpo_stage_2_and_eval_run_on_the_7b_shape_at_one_layer(synth_dir, pairs_file, tmp_path):
    """The 7B shape's widths (1 layer, vision depth 1, bf16: 1.4 B parameters) through sft, dpo stage 2 and eval as a
    user with a 7B directory runs them. Minutes on 2 cores: `python -m pytest -m slow`."""
    checkpoint = tmp_path / "q7b"
    model.tiny_command(model.TinyArgs(out=str(checkpoint), shape="qwen2.5-vl-7b", layers=1, vision_depth=1))
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    common = ["--model", str(checkpoint), "--dtype", "bfloat16", "--max-steps", "1", "--grad-accum", "1",
              "--val-fraction", "0"]
    sft = run("visrl.py", "sft", "--data", str(synth_dir / "train.jsonl"), "--out", str(tmp_path / "sft"),
              "--limit", "4", "--batch-size", "2", *common)
    assert sft.returncode == 0, sft.stderr[-2000:]
    dpo = run("visrl.py", "dpo", "--stage", "2", "--data", str(pairs_file), "--init-adapter",
              str(tmp_path / "sft" / "adapter"), "--out", str(tmp_path / "dpo2"), "--limit", "3", *common)
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "dpo2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and all(torch.isfinite(torch.tensor(rows[0][k])) for k in ("loss", "grad_norm"))
    ev = run("evaluate.py", "--model", str(checkpoint), "--adapter", str(tmp_path / "dpo2" / "adapter"), "--data",
             str(synth_dir), "--out", str(tmp_path / "eval"), "--limit", "2", "--max-new-tokens", "8", "--dtype",
             "bfloat16")
    assert ev.returncode == 0, ev.stderr[-2000:]
    predictions = (tmp_path / "eval").glob("**/predictions*.jsonl")
    assert sum(len(p.read_text().splitlines()) for p in predictions) == 2


def test_a_rank_whose_copy_has_no_model_takes_rank_0s(tmp_path):
    # under a process group transformers saves a model on rank 0 only: rank 1's copy must never become the cache
    import threading
    import time

    class NothingSaved:  # what save_pretrained does on rank 1
        def save_pretrained(self, path):
            pass

    class Saved:
        def save_pretrained(self, path):
            (Path(path) / "config.json").write_text("{}")

    out = tmp_path / "cache" / "tiny"
    rank1 = threading.Thread(target=shapes.write_checkpoint, args=(out, NothingSaved(), NothingSaved(), "a.json", {}))
    rank1.start()
    time.sleep(0.5)  # rank 1 first: it waits, and leaves nothing of its own
    assert rank1.is_alive() and not out.exists()
    shapes.write_checkpoint(out, Saved(), NothingSaved(), "a.json", {"rank": 0})
    rank1.join(timeout=10)
    assert not rank1.is_alive() and (out / "config.json").exists()
    assert json.loads((out / "a.json").read_text()) == {"rank": 0}
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary copy left
    # a copy an older version left without its model is replaced, not kept forever
    (out / "config.json").unlink()
    shapes.write_checkpoint(out, Saved(), NothingSaved(), "a.json", {"rank": 0, "again": True})
    assert (out / "config.json").exists() and json.loads((out / "a.json").read_text())["again"]


@pytest.mark.parametrize("name", ["tiny-qwen3-vl", "tiny-qwen3.5"])
def test_the_chain_runs_on_each_qwen3_family_in_its_own_box_language(name, synth_dir, tmp_path):
    """sft -> generate -> dpo 1 -> dpo 2 -> eval -> export -> infer on the family's tiny model with boxes written as
    Qwen3-VL grounds them (--box-form rel1000, recorded by SFT and inherited by every later stage), the exported
    checkpoint loading back as the family's class with the same replies."""
    import data
    import dpo
    import evaluate
    import export
    import generate
    import runs
    import visrl

    common = dict(max_steps=2, grad_accum=1, batch_size=2, val_fraction=0.0)
    sft = visrl.train(visrl.SFTConfig(model=name, data=str(synth_dir / "train.jsonl"), out=str(tmp_path / "sft"),
                                      limit=6, box_form="rel1000", **common))
    assert json.loads((sft / "adapter_config.json").read_text())["convention"]["box_form"] == "rel1000"
    summary = generate.generate(generate.GenerateConfig(
        model=name, adapter=str(sft), data=str(synth_dir / "val.jsonl"), out=str(tmp_path / "gen"), limit=3,
        attempts=1, max_new_tokens=12, batch_size=6))
    assert summary["candidates"] == 6 and json.loads((tmp_path / "gen" / "config.json").read_text())["box_form"] == \
        "rel1000"
    # pairs in the chain's box language (a random SFT model rarely keeps one): the true box and a corner
    records = data.read_records(synth_dir / "train.jsonl")[:4]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for r in records:
            chosen, rejected = chat.box_to_text(r.box, r.width, r.height, "rel1000"), "[0, 0, 100, 100]"
            pair = data.Pair(r, chosen, rejected, r.answer, "wrong", box_form="rel1000")
            f.write(json.dumps(data.pair_json(pair, synth_dir)) + "\n")
    dpo1 = visrl.train(dpo.DPOConfig(model=name, adapter=str(sft), data=str(tmp_path / "pairs.jsonl"), stage=1,
                                     out=str(tmp_path / "dpo1"), **common))
    dpo2 = visrl.train(dpo.DPOConfig(model=name, adapter=str(dpo1), data=str(tmp_path / "pairs.jsonl"), stage=2,
                                     out=str(tmp_path / "dpo2"), **common))
    rows = [json.loads(line) for line in (tmp_path / "dpo2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    results = evaluate.evaluate(evaluate.EvalConfig(model=name, adapter=str(dpo2), data=str(synth_dir),
                                                    out=str(tmp_path / "eval"), limit=2, max_new_tokens=12))
    assert results is not None
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and {p["box_form"] for p in predictions} == {"rel1000"}
    merged = export.export_command(export.ExportConfig(adapter=str(dpo2), out=str(tmp_path / "export")))
    net, processor = model.load_model(str(merged))
    assert type(net).__name__ == model.ARCHS[shapes.TINY_ARCHS[model.TINY_NAMES[name]]][1].__name__
    image = Image.open(data.read_records(synth_dir / "test.jsonl")[0].image).convert("RGB")
    question = data.read_records(synth_dir / "test.jsonl")[0].question
    row = evaluate.infer_command(evaluate.InferConfig(image=str(data.read_records(synth_dir / "test.jsonl")[0].image),
                                                      question=question, model=str(merged),
                                                      out=str(tmp_path / "infer.png"), max_new_tokens=12))
    assert (tmp_path / "infer.png").exists()
    assert json.loads((merged / runs.CONVENTION_FILE).read_text())["box_form"] == "rel1000"  # infer reads it back
    again = evaluate.infer_command(evaluate.InferConfig(image=str(data.read_records(synth_dir / "test.jsonl")[0].image),
                                                        question=question, model=name, adapter=str(dpo2),
                                                        out=str(tmp_path / "infer2.png"), max_new_tokens=12))
    assert (row["box_text"], row["answer"]) == (again["box_text"], again["answer"]) and image.size
