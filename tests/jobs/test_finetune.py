"""What `lorakit train` runs (lorakit.jobs.finetune): a run config to a trained model, with its
lines of progress, exact match at the end, the refusals made before any model loads. The command
itself, and QLoRA, full fine-tuning and PiSSA through it: tests/cli/test_cli.py."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError, DataError
from lorakit.jobs import finetune
from lorakit.jobs.finetune import build_model, run_training
from lorakit.jobs.run_config import validate_run_config
from tiny_folders import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def run_config(model_dir, out, **sections):
    """A 2-step LoRA run on q_proj and v_proj of the tiny model (r=4)."""
    data = {
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"dataset": "identity", "limit": 8, "max_length": 128},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 1e-2,
            "precision": "fp32",
            "progress": "none",
            "tensorboard": False,
            "plots": False,
        },
        **sections,
    }
    return validate_run_config(data)


def test_build_model_wraps_the_targets_and_reports_the_count(tiny_dir, tmp_path):
    lines = []
    model, tokenizer = build_model(run_config(tiny_dir, tmp_path / "out"), lines.append)
    # the tiny Llama: width 32, 4 heads of 8, 2 KV heads, so q_proj is 32 -> 32, v_proj 32 -> 16;
    # r=4 per layer: q 4*32 + 32*4 = 256, v 4*32 + 16*4 = 192; 2 layers: 2 * 448 = 896
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 896
    assert lines == [f"LoRA: 896 trainable of {total:,} parameters ({100 * 896 / total:.2f}%)"]
    assert model.chat_template  # the prompt template the adapter is saved with
    assert tokenizer.eos_token is not None


def test_full_fine_tuning_of_quantized_weights_is_refused_before_loading(tiny_dir, tmp_path):
    run = run_config(
        tiny_dir,
        tmp_path / "out",
        method="full",
        model={"name_or_path": str(tmp_path / "not-loaded"), "quantization": "int8"},
    )
    with pytest.raises(ConfigError, match="quantized weights cannot be trained"):
        build_model(run)


def test_run_training_trains_scores_and_says_where_the_results_are(tiny_dir, tmp_path):
    out = tmp_path / "out"
    run = run_config(tiny_dir, out, eval={"limit": 2, "exact_match": True, "max_new_tokens": 2})
    lines = []
    result = run_training(run, show=lines.append)
    assert (result.steps, result.final_dir) == (2, out / "final")
    assert (out / "final" / "adapter_model.safetensors").is_file()
    exact = [line for line in lines if line.startswith("exact match: ")]
    assert len(exact) == 1 and exact[0].endswith(" of 2 answers")  # eval.limit=2
    assert lines[-2:] == [
        f"final model: {out / 'final'}",
        f"plots: {out / 'plots'}; metrics: {out / 'metrics.jsonl'}",
    ]


def test_a_run_folder_and_missing_data_are_refused_before_the_model_loads(
    tiny_dir, tmp_path, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finetune, "build_model", no_loading)
    missing = run_config(tiny_dir, tmp_path / "a", data={"dataset": str(tmp_path / "no.jsonl")})
    with pytest.raises(DataError, match="no.jsonl"):
        run_training(missing, show=lambda _: None)
    done = tmp_path / "b" / "checkpoints" / "step-00000002"
    done.mkdir(parents=True)
    (done / "state.json").write_text("{}")
    (done / "COMPLETE").write_text("ok\n")
    with pytest.raises(ConfigError, match="--resume auto"):
        run_training(run_config(tiny_dir, tmp_path / "b"), show=lambda _: None)


def test_added_tokens_train_only_their_rows_and_travel_with_the_adapter(tiny_dir, tmp_path):
    import peft
    import torch
    from safetensors.torch import load_file

    from lorakit.jobs.evaluation import load_with_adapters
    from lorakit.models import load_model

    out = tmp_path / "out"
    run = run_config(
        tiny_dir, out, model={"name_or_path": str(tiny_dir), "add_tokens": ["<a>", "<b>"]}
    )
    lines = []
    result = run_training(run, show=lines.append)
    assert "added tokens: <a>=49152, <b>=49153; vocabulary 49,154" in lines
    final = result.final_dir
    tensors = load_file(final / "adapter_model.safetensors")
    rows = {k: v.shape for k, v in tensors.items() if "token_adapter" in k}
    assert rows == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (2, 32),
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta": (2, 32),
    }
    model, tokenizer = load_with_adapters(str(tiny_dir), {"run": final})
    assert tokenizer.convert_tokens_to_ids(["<a>", "<b>"]) == [49152, 49153]
    ids = tokenizer("x <a> y <b>", return_tensors="pt").input_ids
    assert 49152 in ids[0] and 49153 in ids[0]
    base = load_model(str(tiny_dir))
    base.resize_token_embeddings(len(tokenizer))
    theirs = peft.PeftModel.from_pretrained(base, str(final)).eval()
    with torch.no_grad():
        ours = model(ids).logits
        assert torch.allclose(ours, theirs(ids).logits, atol=1e-5)
        plain = load_model(str(tiny_dir))
        plain.resize_token_embeddings(len(tokenizer))
        assert not torch.allclose(ours[..., -2:], plain(ids).logits[..., -2:], atol=1e-4)
