"""What Hugging Face `Trainer` sees of a `LoraModel` (lorakit.lora.compat.hf_face): a
`PreTrainedModel` in type whose attributes and forward are the wrapped model's."""

from __future__ import annotations

import inspect

import torch
from test_peft_programs import _args, _identity_rows, _qwen2, _tokenizer
from torch import nn
from transformers import PreTrainedModel, Trainer

import lorakit
from conftest import make_tiny_llama
from lorakit.lora.compat.hf_face import HFFace


def test_trainer_keeps_the_columns_the_base_model_takes(tmp_path):
    tokenizer = _tokenizer()
    model = lorakit.get_peft_model(_qwen2(tokenizer), lorakit.LoraConfig(target_modules=["q_proj"]))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_identity_rows(tokenizer))
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert "question" not in trainer._signature_columns
    assert trainer.label_names == ["labels"]


def test_a_lora_model_is_a_pretrained_model_whose_attributes_are_the_wrapped_ones():
    base = make_tiny_llama()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"]))
    assert isinstance(model, PreTrainedModel) and isinstance(model, HFFace)
    assert model.config is base.config and model.generation_config is base.generation_config
    assert model.can_generate() == base.can_generate()
    assert HFFace.parameters is nn.Module.parameters  # nn.Module's methods stay nn.Module's


def test_forward_reads_and_writes_the_wrapped_models_forward():
    base = make_tiny_llama()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"]))
    assert model.forward == base.forward  # the bound method, with its signature
    assert "labels" in inspect.signature(type(model).forward).parameters
    calls = []

    def patched(self, *args, **kwargs):  # as TRL and accelerate patch a model's forward
        calls.append(self)
        return type(base).forward(self, *args, **kwargs)

    model.forward = patched.__get__(model)  # bound to the wrapper: re-bound to the wrapped model
    ids = torch.tensor([[1, 2, 3]])
    model(input_ids=ids)
    assert calls == [base]
    del model.forward  # back to the class's forward
    model(input_ids=ids)
    assert calls == [base] and "forward" not in vars(base)
