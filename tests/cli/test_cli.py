"""The `lorakit` command in-process (`main(argv)`): help, config errors with exit codes, and each
command on a tiny model folder."""

from __future__ import annotations

import io
import json

import pytest
import yaml

from lorakit import __version__
from lorakit.cli import main
from tiny_folders import save_tiny

COMMANDS = [
    "train",
    "validate",
    "quickstart",
    "generate",
    "chat",
    "eval",
    "merge",
    "inspect",
    "serve",
    "init",
    "data",
    "sweep",
    "ui",
    "estimate",
    "export",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    """A 2-step LoRA run through `lorakit train` (module-wide: the commands below use it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    config = write_config(tmp_path_factory.mktemp("cfg"), tiny_dir, out)
    assert main(["train", str(config), "train.save_every=1"]) == 0
    return out


def write_config(folder, model_dir, out, **train) -> str:
    data = {
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"dataset": "identity", "limit": 12, "max_length": 128},
        "eval": {"limit": 4, "exact_match": True, "max_new_tokens": 3},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 1e-2,
            "precision": "fp32",
            "progress": "none",
            "tensorboard": False,
            **train,
        },
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lorakit {__version__}"
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
    for command in COMMANDS:
        assert main([command, "--help"]) == 0, command
        assert "Usage" in capsys.readouterr().out
    assert main(["data", "inspect", "--help"]) == 0


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["trian"]) == 2
    assert "trian" in capsys.readouterr().err


def test_config_errors_exit_1_with_their_message(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  learning_rat: 0.001\n")
    assert main(["train", str(typo)]) == 1
    err = capsys.readouterr().err
    assert "unknown key `train.learning_rat` (did you mean `lr`?)" in err
    assert "Traceback" not in err and err.startswith("error: ")

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  max_steps: many\n")
    assert main(["train", str(wrong)]) == 1
    assert "`train.max_steps` = 'many' is invalid" in capsys.readouterr().err

    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml not found" in capsys.readouterr().err

    assert main(["validate", str(wrong), "train.max_steps=3", "lora.r=0"]) == 1
    assert "`lora.r` = 0 is invalid" in capsys.readouterr().err


def test_validate_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lora: {r: 4}\n")
    assert main(["validate", str(path), "train.lr=0.005"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["lora"]["r"] == 4 and resolved["train"]["lr"] == 0.005
    assert resolved["train"]["batch_size"] == 8  # defaults filled in


def test_validate_refuses_what_train_refuses(tiny_dir, run_dir, tmp_path, capsys):
    rows = [{"instruction": "hi", "output": "hello"}] * 3 + [{"instruction": "hi", "output": ""}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path, tiny_dir, tmp_path / "new")
    bad_row = [config, f"data.dataset={data}", "eval.exact_match=false"]
    for command in ("validate", "train"):  # a bad row after the first: refused by both
        assert main([command, *bad_row]) == 1
        assert "d.jsonl line 4: field `output` is empty" in capsys.readouterr().err
    # an output_dir holding a model (the tiny model folder), or an earlier run
    for out in (tiny_dir, run_dir):
        for command in ("validate", "train"):
            assert main([command, config, f"output_dir={out}"]) == 1
            err = capsys.readouterr().err
            assert "a new run would write over" in err or "checkpoints of an earlier run" in err
    assert main(["validate", config, f"output_dir={run_dir}", "--resume", "auto"]) == 0
    assert main(["validate", config, f"output_dir={run_dir}", "--overwrite"]) == 0
    assert main(["validate", config, f"output_dir={tiny_dir}", "--overwrite"]) == 1
    assert "not a run lorakit wrote" in capsys.readouterr().err
    assert (run_dir / "final").is_dir() and not (tmp_path / "new").exists()  # nothing deleted


def test_train_overwrite_starts_an_earlier_run_over(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_dir, out, max_steps=1)
    args = [config, "eval.exact_match=false"]
    assert main(["train", *args]) == 0
    first = (out / "metrics.jsonl").read_text()
    assert main(["train", *args]) == 1  # refused without a flag
    assert main(["train", *args, "--overwrite", "--resume", "auto"]) == 1
    assert "pass one" in capsys.readouterr().err
    assert main(["train", *args, "--overwrite"]) == 0
    assert f"deleted {out / 'final'}" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text().count("\n") == first.count("\n")  # not appended
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_train_writes_adapter_and_resolved_config(run_dir):
    final = run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert (final / "chat_template.jinja").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["train"]["save_every"] == 1
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert "q_proj" in adapter_config["target_modules"]  # the preset, spelled out
    assert (run_dir / "plots" / "loss.png").is_file()


def test_train_resume_auto(run_dir, tiny_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_dir, run_dir)
    assert main(["train", config]) == 1  # a fresh run refuses a directory with checkpoints
    assert "resume" in capsys.readouterr().err
    assert main(["train", config, "train.max_steps=3", "--resume", "auto", "--force"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_train_reports_on_rank_0_only(tiny_dir, tmp_path, monkeypatch, capsys, rank):
    # torchrun sets RANK in every process; in-process, with no WORLD_SIZE, training itself runs
    # as one process, so this checks the CLI's own lines only.
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_dir, out)
    assert main(["train", config, "eval.exact_match=false"]) == 0
    text = capsys.readouterr().out
    lines = ["LoRA: ", "rows used", "final model: ", "plots: ", f"run directory: {out}"]
    if rank == "0":
        assert all(line in text for line in lines), text
    else:
        assert not any(line in text for line in lines), text
    # errors still surface from every rank
    assert main(["train", config]) == 1
    assert "error: " in capsys.readouterr().err


def test_generate_streams_with_adapters_and_sampling(tiny_dir, run_dir, capsys):
    adapter = str(run_dir / "final")
    argv = [
        "generate",
        str(tiny_dir),
        "Who are you?",
        "--adapter",
        adapter,
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
        "--repetition-penalty",
        "1.1",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()
    argv = [
        "generate",
        str(tiny_dir),
        "hi",
        "--adapter",
        f"a={adapter}",
        "--adapter",
        f"b={adapter}",
        "--weights",
        "0.5,0.5",
        "--max-new-tokens",
        "3",
    ]
    assert main(argv) == 0
    assert main(["generate", str(tiny_dir), "hi", "--temperature", "-1"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_generate_merges_float32_adapters_only(tiny_dir, run_dir):
    """generate/chat merge adapters into a float32 base (the logits of the merged model equal the
    unmerged one's up to fp32 rounding), and keep them unmerged on a bf16 base."""
    import torch

    from lorakit.adapter_specs import parse_adapters
    from lorakit.cli.generate import prepare_model
    from lorakit.jobs.evaluation import load_with_adapters
    from lorakit.lora.layers import LoraLinear
    from lorakit.lora.model import LoraModel

    spec = [str(run_dir / "final")]
    merged, _, template = prepare_model(str(tiny_dir), spec, None, "float32", "cpu")
    assert not any(isinstance(m, (LoraModel, LoraLinear)) for m in merged.modules())
    assert template == (run_dir / "final" / "chat_template.jinja").read_text()
    unmerged, _ = load_with_adapters(str(tiny_dir), parse_adapters(spec), "float32", "cpu")
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        with unmerged.disable_adapter():
            base = unmerged(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    half, _, _ = prepare_model(str(tiny_dir), spec, None, "bfloat16", "cpu")
    assert isinstance(half, LoraModel)
    assert not any(layer.merged_adapters for _, layer in half.lora_layers())


def test_tied_or_half_precision_weights_are_not_merged_for_generation():
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.cli.generate import _merges_exactly

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tied = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    assert not _merges_exactly(tied)  # the update would reach the input embedding too
    qv = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    plain = lorakit.get_peft_model(LlamaForCausalLM(config), qv)
    assert _merges_exactly(plain)
    half = lorakit.get_peft_model(LlamaForCausalLM(config).bfloat16(), qv)
    assert not _merges_exactly(half)


def test_chat_keeps_the_conversation(tiny_dir, run_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand then?\n/reset\nhi\n/exit\n"))
    seen = []
    import lorakit.cli.generate as gen

    original = gen.encode_chat

    def spy(tokenizer, messages, template):
        seen.append([m["role"] for m in messages])
        assert template == (run_dir / "final" / "chat_template.jinja").read_text()
        return original(tokenizer, messages, template)

    monkeypatch.setattr(gen, "encode_chat", spy)
    argv = ["chat", str(tiny_dir), "--adapter", str(run_dir / "final"), "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert capsys.readouterr().out.count("assistant>") == 3


def test_eval_side_by_side(tiny_dir, run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        "--model",
        str(tiny_dir),
        "--adapter",
        f"tuned={run_dir / 'final'}",
        "--limit",
        "4",
        "--exact-match",
        "--max-new-tokens",
        "2",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "base + tuned" in text and "perplexity" in text
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["base", "base + tuned"]
    assert rows[0]["eval_loss"] != rows[1]["eval_loss"]
    assert {"exact_match", "name_rate"} <= set(rows[0])
    # every answer in --output; the misses (a random tiny model misses all 4) on the console
    for row in rows:
        answers = row["answer_rows"]
        assert [a["where"] for a in answers] == [
            f"identity_test.jsonl line {i}" for i in (1, 2, 3, 4)
        ]
        assert all(set(a) == {"where", "prompt", "expected", "got", "match"} for a in answers)
        assert row["exact_match"] == sum(a["match"] for a in answers) / 4
        misses = 4 - sum(a["match"] for a in answers)
        assert f"{row['model']}: {misses} of 4 answers missed" in text
    assert "expected" in text and "got" in text


def test_inspect_and_fit_check(tiny_dir, run_dir, tmp_path, capsys):
    adapter = str(run_dir / "final")
    assert main(["inspect", adapter]) == 0
    text = capsys.readouterr().out
    assert "r=4" in text and "q_proj" in text and "parameters:" in text
    assert main(["inspect", adapter, "--base", str(tiny_dir)]) == 0
    assert "fits" in capsys.readouterr().out
    other = save_tiny(tmp_path / "gpt2", family="gpt2")
    assert main(["inspect", adapter, "--base", str(other)]) == 1
    assert "error:" in capsys.readouterr().err


def test_merge_prints_the_difference(tiny_dir, run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_dir), str(run_dir / "final"), str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    assert main(["merge", str(tiny_dir), str(run_dir / "final"), str(out)]) == 1  # not empty


def test_data_inspect_marks_trained_tokens(tiny_dir, capsys):
    argv = ["data", "inspect", "model.name_or_path=" + str(tiny_dir), "data.limit=4", "-n", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "⟦" in text and "supervised" in text


def test_data_cache_lists_and_clears(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAKIT_DATA_CACHE", str(tmp_path / "cache"))
    assert main(["data", "cache"]) == 0
    assert capsys.readouterr().out.startswith("no cached stores in ")
    argv = ["data", "inspect", "model.name_or_path=" + str(tiny_dir), "data.limit=4", "-n", "0"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["data", "cache"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:3] == ["identity_train.jsonl", "4"] and len(lines) == 3
    key = lines[1].split()[0]
    assert main(["data", "cache", "--clear", "--key", "nope"]) == 1
    assert "no cached store nope" in capsys.readouterr().err
    assert main(["data", "cache", "--clear", "--key", key]) == 0
    assert capsys.readouterr().out.startswith("removed 1 cached store(s)")
    assert not (tmp_path / "cache" / key).exists()


def test_init_copies_configs(tmp_path, capsys):
    assert main(["init", str(tmp_path / "cfg")]) == 0
    assert (tmp_path / "cfg" / "smollm2-lora.yaml").is_file()
    assert main(["init", str(tmp_path / "cfg")]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "cfg" / "smollm2-qlora.yaml")]) == 0
    assert main(["sweep", str(tmp_path / "cfg" / "sweeps" / "ranks.yaml"), "--dry-run"]) == 0
    assert "14 variants" in capsys.readouterr().out


def test_serve_refuses_open_bind_without_key(capsys):
    argv = ["serve", "smollm2-135m-instruct", "--host", "0.0.0.0"]
    assert main(argv) == 1
    assert "API key" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [["model.quantization=nf4"], ["method=full"]])
def test_train_qlora_and_full(tiny_dir, tmp_path, overrides):
    config = write_config(tmp_path, tiny_dir, tmp_path / "out")
    assert main(["train", config, "eval.exact_match=false", *overrides]) == 0
    final = tmp_path / "out" / "final"
    expected = "model.safetensors" if "method=full" in overrides else "adapter_model.safetensors"
    assert (final / expected).is_file()
    if "method=full" in overrides:
        assert (final / "tokenizer.json").is_file()  # a complete model folder


def test_full_with_quantization_is_refused(tiny_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_dir, tmp_path / "out")
    assert main(["train", config, "method=full", "model.quantization=int8"]) == 1
    assert "quantized weights cannot be trained" in capsys.readouterr().err


TEMPLATES = {
    "not-utf8": (b"{{ messages }}\xff", "chat_template.jinja: not UTF-8 (byte 14"),
    "bad-jinja": (b"{% for m in messages %}", "chat_template.jinja: line 1: not a valid Jinja"),
    "raises": (b"{{ raise_exception('no system role') }}", "the chat template failed"),
    "too-long": (b"{% for i in range(300) %}word {% endfor %}", "this model's context is 256"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_bad_chat_templates_are_clear_errors(tiny_dir, run_dir, tmp_path, capsys, case):
    """An adapter's chat_template.jinja that is not UTF-8, not Jinja, fails on the conversation
    or renders past the context: exit 1 with the reason, no traceback."""
    content, says = TEMPLATES[case]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for item in (run_dir / "final").iterdir():
        if item.is_file():
            (adapter / item.name).write_bytes(item.read_bytes())
    (adapter / "chat_template.jinja").write_bytes(content)
    argv = ["generate", str(tiny_dir), "hi", "--adapter", str(adapter), "--max-new-tokens", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_train_with_dora_and_inspect(tiny_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_dir, tmp_path / "out")
    assert main(["train", config, "lora.use_dora=true", "eval.exact_match=false"]) == 0
    assert main(["inspect", str(tmp_path / "out" / "final"), "--base", str(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "variant:      DoRA (use_dora)" in text and "fits" in text


def test_train_with_pissa_writes_a_lora_for_the_original_base(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    import lorakit
    from lorakit.models import load_model

    config = write_config(tmp_path, tiny_dir, tmp_path / "out", save_every=1)
    assert main(["train", config, "lora.init_lora_weights=pissa", "eval.exact_match=false"]) == 0
    final = tmp_path / "out" / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # rank 2r, a plain LoRA
    # the reference: the residual base PiSSA leaves, with the trained (last checkpoint) adapter
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002" / "adapter"
    residual = lorakit.get_peft_model(
        load_model(str(tiny_dir)), lorakit.LoraConfig.load(checkpoint)
    )
    lorakit.set_peft_model_state_dict(residual, load_file(checkpoint / "adapter_model.safetensors"))
    converted = lorakit.LoraModel.from_pretrained(load_model(str(tiny_dir)), final)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = residual.eval()(input_ids=ids).logits
        torch.testing.assert_close(converted(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_inspect_reports_coverage_and_expert_layout_on_moe(tmp_path, capsys):
    import lorakit
    from moe_models import tiny_model

    base = tiny_model("qwen3_moe")
    base.save_pretrained(tmp_path / "base")
    full = lorakit.get_peft_model(base, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    full.save_pretrained(tmp_path / "full")
    attention = lorakit.get_peft_model(
        tiny_model("qwen3_moe"), lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    attention.save_pretrained(tmp_path / "attention")
    assert main(["inspect", str(tmp_path / "full"), "--base", str(tmp_path / "base")]) == 0
    text = capsys.readouterr().out
    assert "(100%)" in text and "current (peft >= 0.19.1) layout" in text
    assert "gate_up_proj" in text and "WARNING" not in text
    assert main(["inspect", str(tmp_path / "attention"), "--base", str(tmp_path / "base")]) == 0
    text = capsys.readouterr().out
    assert "leaves its experts out" in text and "(100%)" not in text


def test_each_commands_sampling_default_is_in_its_help(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0 (the default here): greedy" in text and "API defaults to 1.0" in text
    assert main(["serve", "--help"]) == 0
    assert "samples at 1.0" in " ".join(capsys.readouterr().out.split())
