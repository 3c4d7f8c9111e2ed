"""Tiny checkpoint loading and the hand-written LoRA (against independent computations)."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import chat
import data
import model
import shapes


def _batch(processor, net, n_images: int = 1, seed: int = 0):
    """A real forward batch: one prompt with images, built through the data pipeline."""
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(300 + 40 * i, 420, 3, generator=g) * 255).byte().numpy())
              for i in range(n_images)]
    messages = chat.answer_messages("What digit is inside the red frame?") if n_images == 2 else \
        chat.focus_messages("What digit is inside the red frame?")
    ids, labels = chat.encode(processor.tokenizer, processor.image_processor, messages,
                              [im.size for im in images], "7")
    pixels = processor.image_processor(images=images, return_tensors="pt")
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == net.config.image_token_id).int(),
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


@pytest.mark.parametrize("which", ["tiny_path", "tiny_qwen2_path", "tiny_qwen3_path", "tiny_qwen35_path"])
def test_tiny_checkpoint_reloads_like_a_real_one(which, request):
    path = request.getfixturevalue(which)
    net, processor = model.load_model(str(path))  # the loader a real checkpoint directory goes through
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] in model.ARCHS
    assert type(AutoProcessor.from_pretrained(path)) is type(processor)  # registered image-only class
    assert type(AutoModelForImageTextToText.from_pretrained(path)) is type(net)
    tok = processor.tokenizer
    for special in shapes.QWEN_SPECIAL_TOKENS:  # every Qwen special token is a single id
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    assert net.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert net.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    with torch.no_grad():
        logits = net(**_batch(processor, net, n_images=2)).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == net.config.text_config.vocab_size


def test_load_model_rejects_a_non_checkpoint(tmp_path):
    with pytest.raises(data.UserError, match="config.json"):
        model.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        model.load_model(str(tmp_path))


@pytest.fixture()
def tiny(tiny_path):
    net, processor = model.load_model(str(tiny_path))
    net.eval()
    return net, processor


def _logits(net, batch):
    with torch.no_grad():
        return net(**batch).logits


def test_lora_targets_every_language_linear_and_freezes_the_rest(tiny):
    net, _ = tiny
    names = model.add_lora(net, model.LoRAConfig(rank=4, alpha=8))
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[-1] for n in names} == per_layer
    assert len(names) == len(per_layer) * net.config.text_config.num_hidden_layers
    assert all(".language_model." in n for n in names)  # vision tower and merger untouched
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(n.startswith("model.visual") for n in trainable)
    only_q = model.lora_target_names(net, "q_proj")
    assert len(only_q) == net.config.text_config.num_hidden_layers


def test_zero_initialised_adapter_is_bit_identical(tiny):
    net, processor = tiny
    batch = _batch(processor, net)
    before = _logits(net, batch)
    model.add_lora(net, model.LoRAConfig(rank=8, alpha=16))
    assert torch.equal(_logits(net, batch), before)


def _perturb(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.lora_modules(net).values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.05


def test_adapters_off_equals_base_and_merge_equals_unmerged(tiny):
    net, processor = tiny
    batch = _batch(processor, net, n_images=2)
    base = _logits(net, batch)
    model.add_lora(net, model.LoRAConfig(rank=8, alpha=16))
    _perturb(net)
    adapted = _logits(net, batch)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter does change the model
    with model.adapters_disabled(net):
        assert torch.equal(_logits(net, batch), base)
    # Independent merge: W' = W + (alpha / r) B A, computed here from the raw tensors.
    name, lora = next(iter(model.lora_modules(net).items()))
    expected_w = lora.weight.detach() + (16 / 8) * lora.lora_B.weight.detach() @ lora.lora_A.weight.detach()
    model.merge_lora(net)
    assert not model.lora_modules(net)
    merged_linear = net.get_submodule(name)
    assert type(merged_linear) is torch.nn.Linear
    torch.testing.assert_close(merged_linear.weight, expected_w, rtol=0, atol=1e-6)
    # fp32: merging reorders the float sums, so logits agree to ~1e-5, not bit for bit.
    torch.testing.assert_close(_logits(net, batch), adapted, rtol=1e-4, atol=1e-4)


def test_adapter_save_load_round_trip(tiny, tiny_path, tmp_path):
    net, processor = tiny
    batch = _batch(processor, net)
    cfg = model.LoRAConfig(rank=4, alpha=8, targets="q_proj,v_proj,down_proj")
    model.add_lora(net, cfg)
    _perturb(net, seed=3)
    adapted = _logits(net, batch)
    model.save_adapter(net, tmp_path / "adapter", cfg)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter.safetensors", "adapter_config.json"}
    fresh, _ = model.load_model(str(tiny_path))
    fresh.eval()
    assert model.load_adapter(fresh, tmp_path / "adapter") == cfg
    assert torch.equal(_logits(fresh, batch), adapted)


def test_stacked_adapter_rebuilds_its_parent(tiny, tiny_path, tmp_path):
    net, processor = tiny
    batch = _batch(processor, net)
    first = model.LoRAConfig(rank=4, alpha=8)
    model.add_lora(net, first)
    _perturb(net, seed=5)
    model.save_adapter(net, tmp_path / "a1", first)
    model.merge_lora(net)
    second = model.LoRAConfig(rank=2, alpha=4, parent_adapter=str(tmp_path / "a1"))
    model.add_lora(net, second)
    _perturb(net, seed=6)
    stacked = _logits(net, batch)
    model.save_adapter(net, tmp_path / "a2", second)
    fresh, _ = model.load_model(str(tiny_path))
    fresh.eval()
    model.load_adapter(fresh, tmp_path / "a2")
    torch.testing.assert_close(_logits(fresh, batch), stacked, rtol=0, atol=0)


def test_load_adapter_rejects_mismatched_weights(tiny, tmp_path):
    net, _ = tiny
    cfg = model.LoRAConfig(rank=4, alpha=8)
    model.add_lora(net, cfg)
    model.save_adapter(net, tmp_path / "a", cfg)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg.__dict__, "rank": 2}))
    fresh, _ = model.load_model(str(net.name_or_path))
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(fresh, tmp_path / "a")


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-vl", "tiny-qwen3.5"])
def test_batched_left_padded_generation_equals_one_at_a_time(name, tiny, synth_dir):
    """Left padding changes no reply, Qwen3.5's linear-attention layers included (their padding mask zeroes the pad
    tokens' inputs, so the recurrent state starts at the first real token)."""
    net, processor = tiny if name == "tiny" else model.load_model(name)
    records = data.read_records(synth_dir / "val.jsonl")[:3]
    prompts = [(chat.focus_messages(r.question), [data.load_image(r)]) for r in records]
    image = data.load_image(records[0])
    prompts.append((chat.answer_messages(records[0].question), [image, image.crop(chat.crop_window(records[0].box, *image.size))]))
    greedy = model.Sampling(max_new_tokens=8)
    batched = model.sample(net, processor, prompts, greedy, batch_size=4)
    single = [model.sample(net, processor, [p], greedy)[0] for p in prompts]
    assert batched == single and all(batched)
    sampled = model.Sampling(max_new_tokens=8, temperature=2.0, top_p=0.7, top_k=50)
    assert model.sample(net, processor, prompts, sampled, seed=1) == model.sample(net, processor, prompts, sampled, seed=1)


def test_decoding_is_upstream_s_fresh_config_whatever_the_checkpoint_ships(tiny_path, synth_dir, tmp_path):
    """LLaMA-Factory's hf engine (src/visrl/chat/hf_engine.py, `_process_args`) decodes with a GenerationConfig built
    from its generating arguments alone (repetition_penalty 1.0) and `eos_token_id=[tokenizer.eos_token_id] +
    tokenizer.additional_special_tokens_ids`: a checkpoint's generation_config.json changes nothing (Qwen2-VL-7B-Instruct
    ships repetition_penalty 1.05), and the reply ends at any special token but <|endoftext|> (not in that list)."""
    import shutil
    shipped = tmp_path / "ckpt"
    shutil.copytree(tiny_path, shipped)
    (shipped / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 50.0, "no_repeat_ngram_size": 1, "max_new_tokens": 2, "eos_token_id": 5}))
    records = data.read_records(synth_dir / "val.jsonl")[:4]
    prompts = [(chat.focus_messages(r.question), [data.load_image(r)]) for r in records]
    greedy = model.Sampling(max_new_tokens=12)
    plain_net, processor = model.load_model(str(tiny_path))
    shipped_net, _ = model.load_model(str(shipped))
    assert shipped_net.generation_config.repetition_penalty == 50.0  # what the old call inherited
    plain = model.sample(plain_net, processor, prompts, greedy)
    assert model.sample(shipped_net, processor, prompts, greedy) == plain
    assert [r.completion_tokens for r in plain] == [r.completion_tokens for r in model.sample(shipped_net, processor,
                                                                                               prompts, greedy)]
    tokenizer = processor.tokenizer
    record = model.decoding_record(tokenizer, greedy)
    assert record["eos_token_id"] == ["<|im_end|>"] + [t for t in shapes.QWEN_SPECIAL_TOKENS if t not in
                                                        ("<|endoftext|>", "<|im_end|>")]
    assert record["repetition_penalty"] == 1.0 and "temperature" not in record  # greedy: no sampling fields
    sampled = model.decoding_record(tokenizer, model.Sampling(12, 2.0, 0.7, 50))
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["do_sample"]) == (2.0, 0.7, 50, True)

    def forced(token):  # the lm head prefers `token` above all: each reply's first token
        bump = tokenizer.convert_tokens_to_ids(token)
        hook = plain_net.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
            -1, torch.tensor([bump]), torch.full((*out.shape[:-1], 1), 1e4)))
        try:
            return model.sample(plain_net, processor, prompts[:1], greedy)[0]
        finally:
            hook.remove()

    box_start = forced("<|box_start|>")  # a special token: the reply ends there
    assert (str(box_start), box_start.completion_tokens, box_start.finish_reason) == ("", 1, "stop")
    end_of_text = forced("<|endoftext|>")  # not in upstream's list: decoding goes on to the limit
    assert (str(end_of_text), end_of_text.completion_tokens, end_of_text.finish_reason) == ("", 12, "length")


def test_an_adapter_loaded_onto_another_base_is_an_error(tiny_path, tmp_path):
    import shutil

    net, _ = model.load_model(str(tiny_path))
    model.add_lora(net, model.LoRAConfig(rank=2, alpha=4))
    cfg = model.LoRAConfig(rank=2, alpha=4, base_model=str(tiny_path), base_sha256=model.base_fingerprint(tiny_path))
    model.save_adapter(net, tmp_path / "a", cfg)
    model.load_adapter(model.load_model(str(tiny_path))[0], tmp_path / "a")  # its own base: fine
    other = tmp_path / "other"  # same shapes, another tokenizer (as a rebuilt tiny model would have)
    shutil.copytree(tiny_path, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1234}))
    with pytest.raises(data.UserError, match="trained on another base model"):
        model.load_adapter(model.load_model(str(other))[0], tmp_path / "a")
