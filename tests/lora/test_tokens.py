"""Trainable tokens (`trainable_token_indices`, `ensure_weight_tying`) against peft 0.22.0:
forward, gradients, merging, saved tensors, files both ways, tied heads."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.tokens import TrainableTokens

IDS = torch.tensor([[1, 3, 5, 7, 3, 60, 2], [5, 5, 9, 61, 0, 3, 4]])


def tiny(tie: bool, vocab: int = 64) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def twins(tie: bool, **fields):
    """(lorakit, peft) models with the same LoRA and token rows; the rows differ from the
    base's (random), so a test sees them."""
    kw = {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **fields}
    base = tiny(tie)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    torch.manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_()
            if param.requires_grad:
                mine[name].copy_(param)
    return ours, theirs


CASES = {
    "list": (False, {"trainable_token_indices": [3, 5, 60]}),
    "dict": (False, {"trainable_token_indices": {"embed_tokens": [3, 61]}}),
    "head": (False, {"trainable_token_indices": {"embed_tokens": [3], "lm_head": [5, 60]}}),
    "tied": (True, {"trainable_token_indices": [3, 5, 60]}),
    "tied-ensure": (True, {"trainable_token_indices": [3, 60], "ensure_weight_tying": True}),
    "tied-dict": (
        True,
        {"trainable_token_indices": {"embed_tokens": [3, 5], "lm_head": [3, 5]}},
    ),
    "tied-apart": (
        True,
        {"trainable_token_indices": {"embed_tokens": [3, 5], "lm_head": [7, 60]}},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_peft(case):
    tie, fields = CASES[case]
    ours, theirs = twins(tie, **fields)
    ours.train(), theirs.train()
    out, ref = ours(IDS, labels=IDS), theirs(IDS, labels=IDS)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    out.loss.backward(), ref.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(grads)
    assert any("trainable_tokens_delta" in n for n in mine)
    for name, grad in grads.items():
        assert torch.allclose(mine[name], grad, atol=1e-5), name


def test_only_the_chosen_rows_train():
    ours, _ = twins(True, trainable_token_indices=[3, 60])
    embedding = ours.get_base_model().model.embed_tokens
    before = embedding.base_layer.weight.detach().clone()
    assert not embedding.base_layer.weight.requires_grad
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0)
    ours.train()
    ours(IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert torch.equal(embedding.base_layer.weight, before)  # the base never changes
    effective = embedding.weight.detach()  # the weight the forward reads
    changed = (effective != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 60]
    head = ours.get_base_model().lm_head
    assert isinstance(head, TrainableTokens) and head.tied
    assert torch.equal(head.weight, effective)  # the tied head reads the same rows


@pytest.mark.parametrize("case", CASES)
def test_merged_weights_equal_peft(case):
    tie, fields = CASES[case]
    ours, theirs = twins(tie, **fields)
    with torch.no_grad():
        expected = ours(IDS).logits
    mine, ref = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(mine.model.embed_tokens) is torch.nn.Embedding
    assert type(mine.lm_head) is torch.nn.Linear
    assert torch.allclose(mine.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.allclose(mine.lm_head.weight, ref.lm_head.weight)
    with torch.no_grad():
        assert torch.allclose(mine(IDS).logits, ref(IDS).logits, atol=1e-5)
        if case != "tied-apart":  # rows written into one shared weight, as peft does
            assert torch.allclose(mine(IDS).logits, expected, atol=1e-5)


def test_merge_unmerge_and_disable():
    ours, _ = twins(False, trainable_token_indices={"embed_tokens": [3], "lm_head": [5]})
    base = tiny(False)
    with torch.no_grad():
        adapted = ours(IDS).logits
        with ours.disable_adapter():
            assert torch.allclose(ours(IDS).logits, base(IDS).logits, atol=1e-6)
        ours.merge_adapter()
        assert torch.allclose(ours(IDS).logits, adapted, atol=1e-5)
        ours.unmerge_adapter()
        embedding = ours.get_base_model().model.embed_tokens.base_layer
        assert torch.equal(embedding.weight, base.model.embed_tokens.weight)
        assert torch.allclose(ours(IDS).logits, adapted, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_saved_tensors_and_names_equal_peft(case, tmp_path):
    tie, fields = CASES[case]
    ours, theirs = twins(tie, **fields)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(ref)
    assert any(k.endswith("token_adapter.trainable_tokens_delta") for k in mine)
    for key, tensor in ref.items():
        assert torch.equal(mine[key], tensor), key


@pytest.mark.parametrize("case", CASES)
def test_files_move_both_ways(case, tmp_path):
    tie, fields = CASES[case]
    ours, theirs = twins(tie, **fields)
    with torch.no_grad():
        expected = theirs(IDS).logits
    theirs.save_pretrained(tmp_path / "from_peft")
    loaded = lorakit.PeftModel.from_pretrained(tiny(tie), tmp_path / "from_peft")
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5)
    ours.save_pretrained(tmp_path / "from_lorakit")
    back = peft.PeftModel.from_pretrained(tiny(tie), tmp_path / "from_lorakit")
    with torch.no_grad():
        assert torch.allclose(back(IDS).logits, ours(IDS).logits, atol=1e-5)
        assert not torch.allclose(back(IDS).logits, tiny(tie)(IDS).logits, atol=1e-3)


def test_config_round_trip(tmp_path):
    config = lorakit.LoraConfig(
        target_modules=["q_proj"],
        trainable_token_indices={"embed_tokens": [1, 2]},
        ensure_weight_tying=True,
    )
    config.save_pretrained(tmp_path)
    again = lorakit.LoraConfig.from_pretrained(tmp_path)
    assert again.trainable_token_indices == {"embed_tokens": [1, 2]}
    assert again.ensure_weight_tying is True
    assert peft.LoraConfig.from_pretrained(tmp_path).trainable_token_indices == {
        "embed_tokens": [1, 2]
    }


@pytest.mark.parametrize("value", [[-1], ["a"], {"embed_tokens": [1.5]}, {"": [1]}, 3, [True]])
def test_bad_indices_are_refused(value):
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)


def test_ids_beyond_the_embedding_say_resize():
    config = lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[64])
    with pytest.raises(ConfigError, match="resize_token_embeddings"):
        lorakit.get_peft_model(tiny(False), config)


def test_an_adapter_for_a_resized_vocabulary_needs_the_resized_base(tmp_path):
    base = tiny(False)
    base.resize_token_embeddings(66)
    config = lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[64, 65])
    lorakit.get_peft_model(base, config).save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="resize_token_embeddings"):
        lorakit.PeftModel.from_pretrained(tiny(False), tmp_path)
    bigger = tiny(False)
    bigger.resize_token_embeddings(66)
    lorakit.PeftModel.from_pretrained(bigger, tmp_path)


def test_tied_apart_with_ensure_weight_tying_is_refused():
    indices = {"embed_tokens": [1, 2], "lm_head": [3, 4]}
    kw = {"target_modules": ["q_proj"], "trainable_token_indices": indices}
    with pytest.raises(ConfigError, match="Cannot ensure weight tying"):
        lorakit.get_peft_model(tiny(True), lorakit.LoraConfig(**kw, ensure_weight_tying=True))
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):
        peft.get_peft_model(tiny(True), peft.LoraConfig(**kw, ensure_weight_tying=True))


def test_ensure_weight_tying_on_an_untied_model_warns():
    config = lorakit.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices=[1], ensure_weight_tying=True
    )
    with pytest.warns(UserWarning, match="does not have tied weights"):
        model = lorakit.get_peft_model(tiny(False), config)
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)


def test_a_layer_trained_twice_is_refused():
    base = tiny(False)
    with pytest.raises(ConfigError, match="modules_to_save"):
        lorakit.get_peft_model(
            copy.deepcopy(base),
            lorakit.LoraConfig(
                target_modules=["q_proj"],
                modules_to_save=["embed_tokens"],
                trainable_token_indices=[1],
            ),
        )
    with pytest.raises(ConfigError, match="not supported by lorakit"):
        lorakit.get_peft_model(
            copy.deepcopy(base),
            lorakit.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]),
        )
    # nothing was wrapped by the refused calls
    assert type(base.model.embed_tokens) is torch.nn.Embedding


def test_two_adapters_and_mixed_batches():
    ours, _ = twins(False, trainable_token_indices=[3, 5])
    ours.add_adapter(
        "other",
        lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 7]),
    )
    with torch.no_grad():
        for param in ours.get_base_model().model.embed_tokens.trainable_tokens_delta.values():
            param.normal_()
        alone = {}
        for name in ("default", "other"):
            ours.set_adapter(name)
            alone[name] = ours(IDS).logits
        mixed = ours(IDS, adapter_names=["other", "default"]).logits
    assert torch.allclose(mixed[0], alone["other"][0], atol=1e-5)
    assert torch.allclose(mixed[1], alone["default"][1], atol=1e-5)
    ours.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="disjunct"):
        ours(IDS)
    ours.delete_adapter("other")
    assert list(ours.get_base_model().model.embed_tokens.trainable_tokens_delta) == ["default"]


def test_weight_attribute_is_the_adapted_weight():
    ours, theirs = twins(False, trainable_token_indices=[3])
    mine = ours.get_base_model().model.embed_tokens
    ref = theirs.get_base_model().model.embed_tokens
    assert torch.equal(mine.weight, ref.weight)
    assert mine.num_embeddings == 64 and mine.embedding_dim == 16


def test_warnings_free_on_a_plain_config():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.get_peft_model(
            tiny(True), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1])
        )
