"""Verified merge and export: the folder loads with plain transformers (no lorakit) and gives the
logits of base + adapter; non-finite merges are refused; a quantized base is dequantized first.

Tolerance: fp32 merged vs unmerged logits agree to 1e-4 here (only the summation order differs).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.errors import AdapterError, ConfigError
from lorakit.jobs.merge import encode_prompts, logits_of, merge_and_export
from lorakit.models import load_model, load_tokenizer
from tiny_folders import save_tiny

TOL = 1e-4


def make_adapter(base_dir, out, targets=None, quantization=None, scale=1.0):
    """An adapter with random (non-zero) A and B on the tiny model in `base_dir`."""
    model = load_model(str(base_dir), quantization=quantization)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets or "all-linear", init_lora_weights=False
    )
    lora = get_peft_model(model, config)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for param in layer.lora_weights("default"):
                param.mul_(scale)
    lora.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    lora.save_pretrained(out)
    return out


def reference_logits(base_dir, adapter, quantization=None):
    tokenizer = load_tokenizer(str(base_dir))
    model = load_model(str(base_dir), quantization=quantization)
    lora = LoraModel.from_pretrained(model, adapter)
    batch = encode_prompts(tokenizer, ["Who are you?", "Tell me a story about a cat."], None)
    return batch, logits_of(lora, batch)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_folder_matches_base_plus_adapter(tmp_path, family):
    base = save_tiny(tmp_path / "base", family)
    adapter = make_adapter(base, tmp_path / "adapter")
    report = merge_and_export(str(base), adapter, tmp_path / "merged")
    assert report.max_abs_diff < TOL and report.reload_max_abs_diff < TOL
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any(n.endswith((".bin", ".pt")) or n.startswith("adapter") for n in names)
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == (
        adapter / "chat_template.jinja"
    ).read_text()
    keys = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in keys)

    from transformers import AutoModelForCausalLM

    batch, expected = reference_logits(base, adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits_of(merged, batch) - expected).abs().max() < TOL
    base_logits = logits_of(load_model(str(base)), batch)
    assert (base_logits - expected).abs().max() > 1e-3  # the adapter changes something


def test_merged_folder_loads_without_lorakit(tmp_path):
    base = save_tiny(tmp_path / "base")
    merged = tmp_path / "merged"
    merge_and_export(str(base), make_adapter(base, tmp_path / "adapter"), merged)
    script = (
        "import sys; sys.modules['lorakit'] = None\n"  # any lorakit import would fail
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "print(model(ids).logits.shape[-1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("49152")


def test_non_finite_merge_is_refused(tmp_path):
    base = save_tiny(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", targets=["q_proj"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights = {k: torch.full_like(v, 1e30) for k, v in weights.items()}  # finite, B @ A is not
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"update of .*q_proj .* is not finite"):
        merge_and_export(str(base), adapter, tmp_path / "merged")  # refused when loading
    assert not (tmp_path / "merged").exists()


def test_quantized_base_is_dequantized_first(tmp_path):
    base = save_tiny(tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "adapter", targets=["q_proj", "v_proj"], quantization="int8"
    )
    report = merge_and_export(str(base), adapter, tmp_path / "merged", quantization="int8")
    assert report.dequantized and "dequantized" in report.dequantized
    assert "quantized base" in report.lines()[0]
    batch, expected = reference_logits(base, adapter, quantization="int8")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits_of(merged, batch) - expected).abs().max() < 1e-3
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "make_out, says",
    [
        (lambda tmp: (tmp / "file").write_text("mine") and tmp / "file", "is not a folder"),
        (lambda tmp: (tmp / "link").symlink_to(tmp / "adapter") or tmp / "link", "is a symlink"),
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f" / "out", "f is a file"),
        (lambda tmp: tmp / "adapter", "is the adapter folder the merge reads"),
        (lambda tmp: tmp / "base", "is the base model folder the merge reads"),
        (lambda tmp: tmp, "holds the base model folder the merge reads"),
    ],
    ids=["file", "symlink", "under-a-file", "adapter", "base", "parent"],
)
def test_bad_outputs_are_refused_before_any_work(tmp_path, make_out, says):
    """Even with --overwrite: the user's files stay byte-identical and nothing is loaded."""
    from lorakit.cli.main import main

    for name in ("base", "adapter"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    out = make_out(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=says):
        merge_and_export(str(tmp_path / "base"), tmp_path / "adapter", out, overwrite=True)
    assert _snapshot(tmp_path) == before
    argv = ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(out), "--overwrite"]
    assert main(argv) == 1


def test_an_unwritable_output_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("lorakit.jobs.merge.staging_dir", read_only)
    with pytest.raises(ConfigError, match=r"cannot write OUT .*out: Read-only file system in"):
        merge_and_export("no-such-base", tmp_path / "adapter", tmp_path / "out")


def test_overwriting_swaps_the_folders_so_out_never_goes_missing(tmp_path, monkeypatch):
    from lorakit import files
    from lorakit.jobs.merge import save_folder

    base = save_tiny(tmp_path / "base", "llama")
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "old" / "config.json").write_text("{}")
    seen = []
    real_rmtree = files.shutil.rmtree
    monkeypatch.setattr(
        files.shutil, "rmtree", lambda p, **kw: seen.append(out.is_dir()) or real_rmtree(p, **kw)
    )
    save_folder(load_model(str(base)), load_tokenizer(str(base)), None, out)
    assert seen and all(seen)  # the old folder is removed only once the new one is in place
    assert (out / "config.json").is_file() and not (out / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]


def test_a_moe_adapter_on_nf4_experts_merges_into_a_dequantized_copy(tmp_path):
    from transformers import AutoModelForCausalLM

    from moe_support import save_tiny_moe

    base = save_tiny_moe(tmp_path / "base")
    model = load_model(str(base), quantization="nf4")
    config = LoraConfig(
        r=4,
        target_modules=["q_proj"],
        target_parameters=["gate_up_proj", "down_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    report = merge_and_export(
        str(base), tmp_path / "adapter", tmp_path / "merged", quantization="nf4"
    )
    assert report.max_abs_diff < TOL and report.reload_max_abs_diff < TOL
    assert "4 expert tensors" in report.dequantized
    batch, expected = reference_logits(base, tmp_path / "adapter", quantization="nf4")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits_of(merged, batch) - expected).abs().max() < 1e-3
    # the adapter changes something
    assert (
        logits_of(load_model(str(base), quantization="nf4"), batch) - expected
    ).abs().max() > 1e-3
