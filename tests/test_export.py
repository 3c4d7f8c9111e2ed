"""`visrl.py export`: merged checkpoints and PEFT adapters of a two-level adapter chain, checked
against the chain loaded by model.load_adapter (unmerged) and by independent computations.

Tolerance: every comparison of logits is float32 with atol = rtol = 1e-4. The merged weight
W0 + d1 + d2 and the unmerged chain ((W0 + d1) x + s2 B2 A2 x) sum the same terms in a different
order, so they differ by float32 rounding (~1e-6 relative per layer), not bit for bit; a wrong
merge (a missing adapter, a wrong scaling) moves logits by more than 1e-2 here.
"""

import json
import subprocess
import sys

import pytest
import torch
import tyro
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import chat
import data
import export
import model

TOL = dict(atol=1e-4, rtol=1e-4)
RESPONSE = "[0.100, 0.200, 0.300, 0.400]"
A1 = model.LoRAConfig(rank=4, alpha=8, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj")
A2 = model.LoRAConfig(rank=2, alpha=6, targets="q_proj,down_proj")  # down_proj: only the child; k..up: only the parent


def _randomise_b(net, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.lora_modules(net).values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.05


@pytest.fixture(scope="module")
def chain(tiny_path, tmp_path_factory):
    """SFT-like adapter a1, then a2 trained (here: randomised) on top of a1 merged: a 2-level chain."""
    root = tmp_path_factory.mktemp("chain")
    net, _ = model.load_model(str(tiny_path))
    a1 = model.LoRAConfig(**{**A1.__dict__, "base_model": str(tiny_path)})
    with torch.random.fork_rng(devices=[]):  # lora_A's kaiming init draws from the global stream
        torch.manual_seed(0)
        model.add_lora(net, a1)
    _randomise_b(net, 1)
    model.save_adapter(net, root / "a1", a1)
    model.merge_lora(net)
    a2 = model.LoRAConfig(**{**A2.__dict__, "base_model": str(tiny_path), "parent_adapter": str(root / "a1")})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model.add_lora(net, a2)
    _randomise_b(net, 2)
    model.save_adapter(net, root / "a2", a2)
    return root


def _inputs(processor, net, image):
    """A real multimodal batch (image + focus prompt + response) through our processor."""
    messages = chat.focus_messages("What digit is inside the red frame?")
    ids, _ = chat.encode(processor.tokenizer, processor.image_processor, messages, [image.size], RESPONSE)
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    input_ids = torch.tensor([ids])
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "mm_token_type_ids": (input_ids == net.config.image_token_id).int(), **pixels}
    return batch, chat.render_chat(messages)


@pytest.fixture(scope="module")
def reference(tiny_path, chain, tmp_path_factory):
    """Logits of the chain loaded by model.load_adapter, no final merge (a2 runs as a LoRA)."""
    image = Image.fromarray((torch.rand(300, 420, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    image_path = tmp_path_factory.mktemp("image") / "image.png"
    image.save(image_path)
    net, processor = model.load_model(str(tiny_path))
    net.eval()
    batch, prompt = _inputs(processor, net, image)
    with torch.no_grad():
        base = net(**batch).logits
        model.load_adapter(net, chain / "a2")
        assert len(model.lora_modules(net)) == 2 * 4  # q_proj and down_proj of 4 layers: a2 is not merged
        logits = net(**batch).logits
    assert not torch.allclose(logits, base, atol=1e-2)  # the chain does change the model
    return {"logits": logits, "batch": batch, "prompt": prompt, "image": image_path}


@pytest.fixture(scope="module")
def merged(chain, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "merged"
    return export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(out)))


# Runs with `python -I`: no cwd or PYTHONPATH on sys.path, so nothing of visrl can be imported; only
# stock transformers components build the inputs (from the prompt text and the PNG) and the logits.
STOCK_SCRIPT = r"""
import importlib.util, json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
out, work = sys.argv[1], sys.argv[2]
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("export") is None
job = json.load(open(work + "/job.json"))
net = AutoModelForImageTextToText.from_pretrained(out).eval()
tok = AutoTokenizer.from_pretrained(out)
image_processor = AutoImageProcessor.from_pretrained(out, backend="pil")
pixels = image_processor(images=[Image.open(job["image"])], return_tensors="pt")
n_pad = int(pixels["image_grid_thw"].prod()) // image_processor.merge_size ** 2
prompt = job["prompt"].replace("<|image_pad|>", "<|image_pad|>" * n_pad)
ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(job["response"], add_special_tokens=False)["input_ids"]
input_ids = torch.tensor([ids])
with torch.no_grad():
    logits = net(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels["pixel_values"],
                 image_grid_thw=pixels["image_grid_thw"],
                 mm_token_type_ids=(input_ids == net.config.image_token_id).int()).logits
try:
    processor = type(AutoProcessor.from_pretrained(out)).__name__
except Exception as e:  # the stock Qwen-VL processor needs torchvision for its video processor
    processor = f"{type(e).__name__}: {e}"
torch.save({"logits": logits, "input_ids": input_ids, "pixel_values": pixels["pixel_values"]}, work + "/result.pt")
print(json.dumps({"model": type(net).__name__, "tokenizer": type(tok).__name__,
                  "image_processor": type(image_processor).__name__, "processor": processor,
                  "chat": tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)}))
"""


def test_merged_export_loads_in_stock_transformers_without_visrl(merged, reference, chain, tmp_path):
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processor_config.json", "visrl_export.json"} <= files
    for name in ("processor_config.json", "tokenizer_config.json"):  # our image-only class -> the stock one
        assert json.loads((merged / name).read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    provenance = json.loads((merged / "visrl_export.json").read_text())
    assert [a["path"] for a in provenance["adapters"]] == [str((chain / "a1").resolve()), str((chain / "a2").resolve())]
    assert provenance["dtype"] == "float32" and provenance["format"] == "merged"
    (tmp_path / "job.json").write_text(json.dumps({"prompt": reference["prompt"], "response": RESPONSE + "<|im_end|>",
                                                   "image": str(reference["image"])}))
    proc = subprocess.run([sys.executable, "-I", "-c", STOCK_SCRIPT, str(merged), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["model"] == "Qwen2_5_VLForConditionalGeneration"
    assert loaded["image_processor"] == "Qwen2VLImageProcessorPil"
    assert loaded["chat"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    # Stock AutoProcessor: the full processor with torchvision; without it, only torchvision is missing.
    assert loaded["processor"] == "Qwen2_5_VLProcessor" or "orchvision" in loaded["processor"], loaded["processor"]
    result = torch.load(tmp_path / "result.pt")
    assert torch.equal(result["input_ids"], reference["batch"]["input_ids"])  # same tokens as our pipeline
    assert torch.equal(result["pixel_values"], reference["batch"]["pixel_values"])
    torch.testing.assert_close(result["logits"], reference["logits"], **TOL)


def test_sharded_export_writes_an_index_and_reloads_to_the_same_logits(chain, reference, tmp_path):
    out = export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(tmp_path / "sharded"),
                                                    max_shard_size="200KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    net = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(**reference["batch"]).logits, reference["logits"], **TOL)


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_bfloat16_export_is_the_float32_merge_cast_once(chain, merged, tmp_path):
    out = export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(tmp_path / "bf16"),
                                                    dtype="bfloat16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    fp32, bf16 = _tensors(merged), _tensors(out)
    assert fp32.keys() == bf16.keys()
    for key, value in fp32.items():
        assert value.dtype == torch.float32 and bf16[key].dtype == torch.bfloat16, key
        assert torch.equal(bf16[key], value.to(torch.bfloat16)), key  # one rounding, after the fp32 merge


def _peft_matches(name, config):
    """PEFT's rule for a list of target/exclude names: exact, or a suffix after a dot."""
    def match(names):
        return any(name == t or name.endswith("." + t) for t in names or [])
    return match(config["target_modules"]) and not match(config["exclude_modules"])


def test_peft_export_is_one_lora_equal_to_the_merged_weights(chain, merged, tiny_path, tmp_path):
    out = export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(tmp_path / "peft"), format="peft"))
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "visrl_export.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    rank = A1.rank + A2.rank
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == rank  # scaling 1: each adapter's alpha/r is folded into B
    assert config["base_model_name_or_path"] == str(tiny_path.resolve())
    assert sorted(config["target_modules"]) == sorted({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"})
    assert (config["bias"], config["fan_in_fan_out"], config["use_rslora"], config["use_dora"]) == ("none", False, False, False)
    assert config["modules_to_save"] is None and config["inference_mode"] is True
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["lora_dropout"] == 0.0

    base = AutoModelForImageTextToText.from_pretrained(tiny_path)
    full = AutoModelForImageTextToText.from_pretrained(merged)
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = load_file(str(out / "adapter_model.safetensors"))
    modules = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in weights if k.endswith("lora_A.weight")}
    assert set(weights) == {f"base_model.model.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    # PEFT would wrap exactly the adapted linears (not Qwen2.5-VL's same-named vision MLP layers)
    assert {n for n in linears if _peft_matches(n, config)} == modules == set(model.lora_target_names(base, "all"))
    assert any(".visual." in n for n in config["exclude_modules"])
    scaling = config["lora_alpha"] / config["r"]
    for name in modules:
        a, b = weights[f"base_model.model.{name}.lora_A.weight"], weights[f"base_model.model.{name}.lora_B.weight"]
        w0 = linears[name].weight.detach()
        assert a.shape == (rank, w0.shape[1]) and b.shape == (w0.shape[0], rank)
        # Independent check: W0 + (alpha / r) B A, from the file alone, is the merged export's weight.
        torch.testing.assert_close(w0 + scaling * b @ a, full.get_submodule(name).weight.detach(), rtol=0, atol=1e-6)
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in A2.targets.split(","):  # zero block where the child adapter has no factors
            assert not a[A1.rank:].any() and not b[:, A1.rank:].any(), name
        if leaf not in A1.targets.split(","):
            assert not a[:A1.rank].any() and not b[:, :A1.rank].any(), name
    base_state, full_state = base.state_dict(), full.state_dict()  # every other weight is the base's
    for key, value in base_state.items():
        if key.removesuffix(".weight") not in modules:
            assert torch.equal(full_state[key], value), key


def test_peft_export_loads_in_peft(chain, reference, tiny_path, tmp_path):
    peft = pytest.importorskip("peft")  # not a dependency: runs only where peft is installed
    out = export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(tmp_path / "peft"), format="peft"))
    net = peft.PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_path), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(**reference["batch"]).logits, reference["logits"], **TOL)


def test_bad_inputs_are_refused_with_clear_errors(chain, tmp_path):
    with pytest.raises(data.UserError, match="not an adapter directory"):
        export.export_command(export.ExportConfig(adapter=str(tmp_path / "missing"), out=str(tmp_path / "x")))
    orphan = tmp_path / "orphan"  # a child whose parent has gone
    orphan.mkdir()
    (orphan / "adapter.safetensors").write_bytes((chain / "a2" / "adapter.safetensors").read_bytes())
    (orphan / "adapter_config.json").write_text(json.dumps({**A2.__dict__, "parent_adapter": str(tmp_path / "gone")}))
    with pytest.raises(data.UserError, match="parent_adapter of"):
        export.export_command(export.ExportConfig(adapter=str(orphan), out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="no base_model"):  # nothing names the base, and no --model
        export.export_command(export.ExportConfig(adapter=str(_no_base(chain, tmp_path)), out=str(tmp_path / "x")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(data.UserError, match="--overwrite"):
        export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(busy)))
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="overlaps the input"):  # --overwrite must never delete the adapter itself
        export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(chain), overwrite=True))
    assert (chain / "a1" / "adapter.safetensors").exists()


def _no_base(chain, tmp_path):
    """a1 copied with an empty base_model (no parent), so only --model could name the base."""
    path = tmp_path / "no-base"
    path.mkdir()
    (path / "adapter.safetensors").write_bytes((chain / "a1" / "adapter.safetensors").read_bytes())
    (path / "adapter_config.json").write_text(json.dumps(A1.__dict__))
    return path


def test_export_is_atomic_and_overwrite_replaces(chain, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def crash(*args):
        raise KeyboardInterrupt  # an interruption half-way through writing

    monkeypatch.setattr(export, "copy_base_files", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(out), overwrite=True))
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    monkeypatch.undo()
    export.export_command(export.ExportConfig(adapter=str(chain / "a2"), out=str(out), format="peft", overwrite=True))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old directory left behind
    assert not (out / "old.txt").exists() and (out / "adapter_model.safetensors").exists()


def test_cli_flags():
    cfg = tyro.cli(export.ExportConfig, args=["--adapter", "a", "--out", "o", "--format", "peft", "--max-shard-size",
                                              "1GB", "--dtype", "bfloat16", "--overwrite", "--model", "tiny"])
    assert cfg == export.ExportConfig(adapter="a", out="o", model="tiny", format="peft", max_shard_size="1GB",
                                      dtype="bfloat16", overwrite=True)
    with pytest.raises(SystemExit):  # --adapter and --out are required
        tyro.cli(export.ExportConfig, args=["--out", "o"])
