"""TRL's own programs with a lorakit model: `DPOTrainer(model=lora_model,
ref_model=reference_model(lora_model))` trains against the adapter switched off (the same
metrics as a separately kept frozen copy of the base) without a second base, for a model built
in memory; `ORPOTrainer` and `GRPOTrainer` train a lorakit model; every saved adapter loads in
peft."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from builtin_model import builtin_tokenizer
from conftest import make_tiny_llama
from lorakit.lora.compat.reference import ReferenceModel

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

VOCAB = 49152
PAIRS = [
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Go away, I am busy today."},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5, probably"},
] * 2
METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def _lora(base=None):
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return lorakit.get_peft_model(base or make_tiny_llama(vocab_size=VOCAB), config).train()


def _common(tmp_path, **kwargs):
    return dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        **kwargs,
    )


def _no_second_model(monkeypatch):
    import trl.trainer.dpo_trainer as dpo

    def refuse(*args, **kwargs):
        raise AssertionError(f"DPOTrainer loaded a second model: {args}")

    monkeypatch.setattr(dpo, "create_model_from_path", refuse)


def _first_metrics(model, ref_model, tmp_path) -> dict[str, float]:
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=trl.DPOConfig(**_common(tmp_path, beta=0.1, max_steps=1)),
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=builtin_tokenizer(),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    return {k: trainer._metrics["train"][k][-1] for k in METRICS}


def test_dpotrainer_reference_is_the_adapter_off(tmp_path, monkeypatch):
    base = make_tiny_llama(vocab_size=VOCAB)
    frozen = copy.deepcopy(base).eval()
    model = _lora(base)
    kept = _first_metrics(model, frozen, tmp_path / "kept")  # TRL's own ref_model route
    _no_second_model(monkeypatch)
    ours = _first_metrics(model, lorakit.reference_model(model), tmp_path / "view")
    assert abs(kept["rewards/chosen"]) > 1e-3  # the adapter is not zero: a real reference
    for name in METRICS:
        assert ours[name] == pytest.approx(kept[name], abs=1e-5), name


def test_dpotrainer_trains_a_model_built_in_memory_with_no_second_base(tmp_path, monkeypatch):
    _no_second_model(monkeypatch)
    model = _lora()
    assert not model.config._name_or_path  # nothing TRL could load a reference from
    reference = lorakit.reference_model(model)
    assert isinstance(reference, ReferenceModel) and list(reference.parameters()) == []
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=reference,
        args=trl.DPOConfig(**_common(tmp_path, beta=0.1, max_steps=2, learning_rate=1e-2)),
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=builtin_tokenizer(),
    )
    trainer.train()
    assert trainer.ref_model is reference and model.training
    changed = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(before[n], model.get_parameter(n)) for n in changed)
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(history) == 2 and history[-1]["rewards/margins"] != 0
    _saved_adapter_loads_in_peft(trainer, model, tmp_path / "adapter")


def _saved_adapter_loads_in_peft(trainer, model, folder) -> None:
    trainer.save_model(str(folder))
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(vocab_size=VOCAB), folder)
    theirs = peft.get_peft_model_state_dict(loaded)
    ours = lorakit.get_peft_model_state_dict(model)
    assert theirs.keys() == ours.keys() and ours
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_the_reference_view_calls_with_the_adapter_off():
    base = make_tiny_llama(vocab_size=128)
    frozen = copy.deepcopy(base)
    model = _lora(base)
    reference = lorakit.reference_model(model)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        expected = frozen(input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)
        torch.testing.assert_close(reference(input_ids=ids).logits, expected)
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    reference.eval()  # its mode is its own: the policy keeps training
    assert model.training and reference.config is base.config
    with pytest.raises(TypeError, match="needs a LoraModel"):
        lorakit.reference_model(frozen)


def test_orpotrainer_trains_a_lorakit_model(tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = _lora()
    trainer = ORPOTrainer(
        model=model,
        args=ORPOConfig(**_common(tmp_path, beta=0.1, max_steps=2, learning_rate=1e-2)),
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=builtin_tokenizer(),
    )
    trainer.train()
    assert len([h for h in trainer.state.log_history if "rewards/margins" in h]) == 2
    _saved_adapter_loads_in_peft(trainer, model, tmp_path / "adapter")


def test_grpotrainer_trains_a_lorakit_model(tmp_path):
    model = _lora()
    tokenizer = builtin_tokenizer()

    def shorter_is_better(completions, **kwargs):
        return [-float(len(c)) for c in completions]

    args = trl.GRPOConfig(
        **_common(tmp_path, max_steps=1, learning_rate=1e-2),
        num_generations=2,
        max_completion_length=4,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=shorter_is_better,
        args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": p["prompt"]} for p in PAIRS]),
        processing_class=tokenizer,
    )
    trainer.train()
    assert any("reward" in h for h in trainer.state.log_history)
    _saved_adapter_loads_in_peft(trainer, model, tmp_path / "adapter")
