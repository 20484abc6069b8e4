"""Preference losses against TRL 1.16 as the oracle: the same tiny model, adapter weights
(init_lora_weights=False, so the adapter is not zero), batch and beta give the same loss,
rewards, log-probabilities and gradients; the reference with the adapter off equals a frozen
copy of the base."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from builtin_model import builtin_tokenizer
from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.train.config import PreferenceConfig
from lorakit.train.preference import (
    batch_sizes,
    check_preference_model,
    combine,
    pair_losses,
    reference_logps,
    sequence_logps,
)

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

VOCAB = 49152
PAIRS = [
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Go away, I am busy today."},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5, probably"},
]
TARGETS = ["q_proj", "v_proj"]


def _peft_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


def _lorakit_twin(trl_model) -> torch.nn.Module:
    """A lorakit model with the same base and adapter weights as TRL's peft model."""
    base = make_tiny_llama(vocab_size=VOCAB)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config)
    missing, unexpected = model.load_state_dict(trl_model.state_dict(), strict=True), None
    assert unexpected is None and not missing.missing_keys
    return model.train()


def _args(cls, tmp_path, **kwargs):
    return cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        max_steps=1,
        save_strategy="no",
        **kwargs,
    )


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_equal(trl_model, model) -> None:
    theirs, ours = _grads(trl_model), _grads(model)
    assert theirs.keys() == ours.keys() and len(ours) == 8
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl_dpotrainer(tmp_path, loss_type):
    trainer = trl.DPOTrainer(
        model=make_tiny_llama(vocab_size=VOCAB).train(),
        args=_args(trl.DPOConfig, tmp_path, beta=0.1, loss_type=[loss_type]),
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=builtin_tokenizer(),
        peft_config=_peft_config(),  # TRL's reference: this adapter switched off
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = _lorakit_twin(trainer.model)
    ours = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
    }
    config = PreferenceConfig(method="dpo", beta=0.1, loss_type=loss_type)
    terms = pair_losses(model, ours, config)
    loss, sums = combine(terms, *batch_sizes([ours]))
    loss.backward()
    assert math.isclose(float(loss.detach()), float(trl_loss.detach()), abs_tol=1e-5)
    assert abs(logged["rewards/chosen"]) > 1e-3  # the adapter is not zero: a real reference
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert math.isclose(sums[name] / 2, logged[name], abs_tol=1e-5), name
    assert sums["rewards/accuracies"] / 2 == logged["rewards/accuracies"]
    _assert_grads_equal(trainer.model, model)


def _orpo_batch(batch) -> dict[str, torch.Tensor]:
    """TRL's ORPO / CPO batch (chosen_*, rejected_* tensors) as lorakit's 2B rows."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    rows = {}
    for key, value in (("input_ids", 2), ("attention_mask", 0), ("labels", -100)):
        rows[key] = torch.cat(
            [pad(batch[f"chosen_{key}"], value), pad(batch[f"rejected_{key}"], value)]
        )
    return rows


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl(tmp_path, method):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    if method == "orpo":
        cls, args = ORPOTrainer, _args(ORPOConfig, tmp_path, beta=0.25)
        config = PreferenceConfig(method="orpo", beta=0.25)
    else:
        extra = {"loss_type": "simpo", "cpo_alpha": 0.5, "simpo_gamma": 0.7}
        cls, args = CPOTrainer, _args(CPOConfig, tmp_path, beta=2.0, **extra)
        config = PreferenceConfig(method="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=0.5)
    trainer = cls(
        model=make_tiny_llama(vocab_size=VOCAB).train(),
        args=args,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=builtin_tokenizer(),
        peft_config=_peft_config(),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, logged = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_loss.backward()

    model = _lorakit_twin(trainer.model)
    ours = _orpo_batch(batch)
    loss, sums = combine(pair_losses(model, ours, config), *batch_sizes([ours], method))
    loss.backward()
    assert math.isclose(float(loss.detach()), float(trl_loss.detach()), abs_tol=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert math.isclose(sums[name] / 2, logged[name], abs_tol=1e-5), name
    _assert_grads_equal(trainer.model, model)


def _pair_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (4, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100  # a shorter answer, padded
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_the_reference_is_the_base_with_the_adapter_off():
    base = make_tiny_llama()
    frozen = copy.deepcopy(base)
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config).train()
    batch = _pair_batch()
    with torch.no_grad():
        expected = sequence_logps(frozen, batch)[0]
        adapted = sequence_logps(model, batch)[0]
    assert not torch.allclose(adapted, expected, atol=1e-4)  # the adapter matters here
    torch.testing.assert_close(reference_logps(model, batch), expected, atol=1e-6, rtol=0)
    assert model.training  # its mode is restored


def test_sequence_logps_sums_the_answer_tokens():
    model = make_tiny_llama()
    batch = _pair_batch()
    sums, counts = sequence_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = batch["labels"][:, 1:]
    for row in range(4):
        keep = targets[row] != -100
        picked = logps[row, keep].gather(1, targets[row, keep, None]).sum()
        torch.testing.assert_close(sums[row], picked, atol=1e-5, rtol=0)
        assert counts[row] == int(keep.sum())
    assert counts.tolist() == [5, 3, 5, 5]


def test_dpo_on_a_model_without_an_adapter_is_refused():
    with pytest.raises(ConfigError, match="needs a LoRA model"):
        check_preference_model(make_tiny_llama(), PreferenceConfig(method="dpo"))
    check_preference_model(make_tiny_llama(), PreferenceConfig(method="orpo"))


def test_label_smoothing_is_conservative_dpo():
    model = get_peft_model(
        make_tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    )
    batch = _pair_batch()
    plain = pair_losses(model, batch, PreferenceConfig(beta=0.5))
    smooth = pair_losses(model, batch, PreferenceConfig(beta=0.5, label_smoothing=0.2))
    z = plain.metrics["rewards/margins"]
    expected = -0.8 * torch.nn.functional.logsigmoid(z) - 0.2 * torch.nn.functional.logsigmoid(-z)
    torch.testing.assert_close(smooth.pairs.detach(), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- in the loop


def _pairs_dataset(tmp_path, n: int = 8):
    import json

    from lorakit.data.pipeline import DataConfig
    from lorakit.data.preference import build_preference_dataset

    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"Well, um, no {i}, sorry."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_preference_dataset(DataConfig(dataset=str(path)), builtin_tokenizer())


def _run(tmp_path, name, method="dpo", resume=None, crash_after=None, **train_kwargs):
    from lorakit.train import TrainConfig, train

    torch.manual_seed(0)
    base = make_tiny_llama(vocab_size=VOCAB)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    settings = {
        "precision": "fp32",
        "lr": 1e-2,
        "max_steps": 2,
        "progress": "none",
        "tensorboard": False,
        "plots": False,
        "preference": PreferenceConfig(method=method, beta=0.5),
        **train_kwargs,
    }
    data = _pairs_dataset(tmp_path)
    if crash_after is not None:
        calls = {"n": 0}

        def crash(module, args, kwargs):
            calls["n"] += 1
            if calls["n"] > crash_after:
                raise RuntimeError("simulated crash")

        model.base_model.model.model.register_forward_pre_hook(crash, with_kwargs=True)
    result = train(model, None, data, data, TrainConfig(**settings), tmp_path / name, resume=resume)
    return model, result


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_accumulation_changes_nothing_but_speed(tmp_path, method):
    whole, a = _run(tmp_path, "a", method, batch_size=4, shuffle=False, eval_every=None)
    split, b = _run(tmp_path, "b", method, batch_size=2, grad_accum_steps=2, shuffle=False)
    assert [r["kind"] for r in a.history].count("train") == 2  # 8 pairs, 4 a step: 2 steps
    for x, y in zip(a.history, b.history, strict=True):
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5), key
    for name, value in _trainable(whole).items():
        torch.testing.assert_close(value, _trainable(split)[name], atol=1e-6, rtol=1e-5)


def test_an_interrupted_dpo_run_resumes_exactly(tmp_path):
    settings = dict(batch_size=4, max_steps=4, save_every=2)
    straight, expected = _run(tmp_path, "a", **settings)
    # a dpo step is 2 forwards (policy, reference); the eval before the run: 2 batches x 2;
    # the crash comes in step 3, after the checkpoint of step 2 (and its eval)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, "b", crash_after=4 + 2 * 2 + 1, **settings)
    resumed, got = _run(tmp_path, "b", resume="auto", **settings)
    assert got.losses == expected.losses
    for name, value in _trainable(straight).items():
        assert torch.equal(value, _trainable(resumed)[name]), name
