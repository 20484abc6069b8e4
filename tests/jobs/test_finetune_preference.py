"""`lorakit train` with method dpo / orpo / simpo end to end on a tiny model folder: the
metrics a DPO user reads in metrics.jsonl, an adapter peft loads, no second base model, and
the refusals found before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorakit.cli import main
from tiny_folders import save_tiny

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def write_config(folder: Path, model_dir: Path, out: Path, method: str = "dpo", **extra) -> str:
    data = {
        "method": method,
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"dataset": "concise", "limit": 8, "max_length": 96},
        "eval": {"dataset": "concise", "split": "test", "limit": 4},
        "preference": {"beta": 0.5},
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "grad_accum_steps": 2,
            "lr": 1e-2,
            "precision": "fp32",
            "progress": "plain",
            "tensorboard": False,
            "plots": False,
        },
        **extra,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lorakit_train_method_dpo(tiny_dir, tmp_path, monkeypatch):
    import transformers

    loads = []
    original = transformers.PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(
        transformers.PreTrainedModel,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)),
    )
    out = tmp_path / "run"
    assert main(["train", write_config(tmp_path, tiny_dir, out)]) == 0
    assert len(loads) == 1  # the base, once: the reference is the adapter switched off
    train = [r for r in rows(out) if r["kind"] == "train"]
    evals = [r for r in rows(out) if r["kind"] == "eval"]
    assert len(train) == 2 and len(evals) == 2  # before and after
    for name in (*REWARDS, "logps/chosen", "logps/rejected"):
        assert name in train[0] and f"eval_{name}" in evals[-1]
    # step 1 starts from a zero adapter: the policy is the reference, every reward is 0
    assert train[0]["rewards/chosen"] == 0 and abs(train[0]["loss"] - 0.6931472) < 1e-5
    assert train[1]["rewards/margins"] != 0
    assert evals[0]["eval_rewards/margins"] == 0 and evals[-1]["eval_rewards/margins"] != 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["preference"] == {
        "method": "dpo",
        "beta": 0.5,
        "loss_type": "sigmoid",
        "label_smoothing": 0.0,
        "simpo_gamma": 0.5,
        "cpo_alpha": 0.0,
    }
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    loaded = peft.PeftModel.from_pretrained(base, out / "final")
    assert any("lora_B" in n for n, _ in loaded.named_parameters())


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_lorakit_train_methods_without_a_reference(tiny_dir, tmp_path, method):
    out = tmp_path / "run"
    assert main(["train", write_config(tmp_path, tiny_dir, out, method=method)]) == 0
    train = [r for r in rows(out) if r["kind"] == "train"]
    assert len(train) == 2 and all(name in train[0] for name in REWARDS)
    assert train[0]["rewards/chosen"] != 0  # beta * mean log-prob, no reference
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.packing=true", "preference pairs are scored as whole sequences"),
        ("eval.exact_match=true", "pairs have no single reference answer"),
        ("data.dataset=identity", "is a usable preference pair"),
        ("preference.beta=0", "preference.beta"),
    ],
)
def test_refusals_before_any_model_loads(tiny_dir, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["train", write_config(tmp_path, tiny_dir, out), override]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_the_shipped_dpo_config_runs_on_a_tiny_model(tiny_dir, tmp_path):
    config = Path(__file__).parents[2] / "configs" / "smollm2-dpo.yaml"
    out = tmp_path / "run"
    overrides = [
        f"model.name_or_path={tiny_dir}",
        f"output_dir={out}",
        "train.max_steps=1",
        "data.limit=4",
        "eval.limit=2",
        "train.eval_max_new_tokens=2",
        "train.progress=plain",
        "train.tensorboard=false",
        "train.plots=false",
    ]
    assert main(["train", str(config), *overrides]) == 0
    last = rows(out)[-1]
    assert last["kind"] == "eval" and "eval_rewards/accuracies" in last


@pytest.mark.slow
def test_the_dpo_demo_on_the_builtin_model(tmp_path):
    """configs/smollm2-dpo.yaml, its first 8 steps (the README quotes step 8 of the shipped
    run): the held-out pairs go from no preference (every reward 0 against the reference) to
    the concise answer preferred in nearly every pair."""
    config = Path(__file__).parents[2] / "configs" / "smollm2-dpo.yaml"
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "train.progress=plain", "train.tensorboard=false"]
    overrides += ["train.max_steps=8", "train.eval_every=8"]
    assert main(["train", str(config), *overrides]) == 0
    evals = [r for r in rows(out) if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/accuracies"] == 0
    assert evals[-1]["eval_rewards/accuracies"] >= 0.875
    assert evals[-1]["eval_rewards/margins"] > 1.0
    assert (out / "plots" / "rewards.png").is_file()
