"""`lorakit export`: GGUF files read back, refusals before any work, the Ollama folder; and
llama.cpp itself (llama-cpp-python) loading the files and computing lorakit's logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from builtin_model import builtin_tokenizer
from gguf_support import (
    FAMILIES,
    llama_cpp,
    llama_cpp_logits,
    save_family,
    torch_logits,
)
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError, ModelError
from lorakit.jobs.export import export_gguf
from lorakit.models import load_model
from lorakit.models.gguf_arch import interleave_rows
from tiny_folders import save_tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [1, 4093, 198, 504, 5248, 314, 253, 1789, 30, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _adapter(base_dir, path, scale=0.05, **kwargs):
    """A random adapter (B not zero) on every linear layer, saved to `path`."""
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kwargs
    )
    lora = get_peft_model(load_model(str(base_dir)), config)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for weight in layer.lora_weights("default"):
                weight.mul_(scale)
    lora.save_pretrained(path)
    return path


def test_merged_export_reads_back(tiny_dir, tmp_path):
    adapter = _adapter(tiny_dir, tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    report = export_gguf(str(tiny_dir), out, [adapter], progress=False)
    assert report.merges[0][1] < 1e-3 and out.stat().st_size == report.size
    reader = gguf.GGUFReader(out)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["tokenizer.chat_template"].contents() == builtin_tokenizer().chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    stored = {t.name: t for t in reader.tensors}
    from lorakit.lora.model import LoraModel

    expected = LoraModel.from_pretrained(load_model(str(tiny_dir)), adapter).merge_and_unload()
    q = expected.model.layers[1].self_attn.q_proj.weight.detach()
    got = np.array(stored["blk.1.attn_q.weight"].data).reshape(q.shape)
    np.testing.assert_array_equal(got, interleave_rows(q, 4).numpy())
    v = expected.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.array(stored["blk.0.attn_v.weight"].data).reshape(v.shape), v)
    assert any("tolerance" in line for line in report.lines())


def test_adapter_only_and_the_ollama_folder(tiny_dir, tmp_path):
    adapter = _adapter(tiny_dir, tmp_path / "adapter", use_rslora=True)
    out = tmp_path / "adapter.gguf"
    report = export_gguf(
        str(tiny_dir), out, [adapter], adapter_only=True, ollama=tmp_path / "ol", progress=False
    )
    fields = gguf.GGUFReader(out).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 0.0
    assert report.tensors == 2 * 7 * 2 and report.folded_error < 1e-5
    folder = sorted(p.name for p in (tmp_path / "ol").iterdir())
    assert folder == ["Modelfile", "adapter.gguf", "base.gguf"]
    modelfile = (tmp_path / "ol" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE")
    base = gguf.GGUFReader(tmp_path / "ol" / "base.gguf")
    assert base.fields["general.type"].contents() == "model"


def test_refusals_come_before_any_work(tiny_dir, tmp_path, tiny_gpt2):
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        export_gguf(str(tiny_dir), tmp_path / "dir.gguf")
    (tmp_path / "old.gguf").write_bytes(b"x")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export_gguf(str(tiny_dir), tmp_path / "old.gguf")
    with pytest.raises(ConfigError, match="--adapter-only writes one adapter's LoRA file; got 0"):
        export_gguf(str(tiny_dir), tmp_path / "a.gguf", adapter_only=True)
    with pytest.raises(ConfigError, match="--dtype 'q4'"):
        export_gguf(str(tiny_dir), tmp_path / "a.gguf", dtype="q4")
    tiny_gpt2.save_pretrained(tmp_path / "gpt2")
    builtin_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match="architecture `gpt2`"):
        export_gguf(str(tmp_path / "gpt2"), tmp_path / "g.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "g.gguf").exists()


def test_the_command(tiny_dir, tmp_path, capsys):
    from lorakit.cli.main import main

    assert main(["export", str(tiny_dir), str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    assert "llama.cpp architecture llama, q8_0" in capsys.readouterr().out
    assert main(["export", str(tiny_dir), str(tmp_path / "m.gguf")]) == 1  # exists


# ---------------------------------------------------------------- llama.cpp itself


def _close(ours: np.ndarray, theirs: np.ndarray, bound: float) -> float:
    diff = float(np.abs(ours - theirs).max())
    assert diff <= bound * max(1.0, float(np.abs(ours).max())), diff
    return diff


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_computes_lorakits_logits(family, tmp_path):
    llama_cpp()
    # (not named after the family: llama.cpp looks for Phi-3's own tokens in a model named phi3)
    folder = save_family(tmp_path / "model", family)
    model = load_model(str(folder))
    out = tmp_path / f"{family}.gguf"
    export_gguf(str(folder), out, progress=False)
    _close(torch_logits(model, IDS), llama_cpp_logits(out, IDS), 1e-3)
    export_gguf(str(folder), tmp_path / "f16.gguf", dtype="f16", progress=False)
    _close(torch_logits(model, IDS), llama_cpp_logits(tmp_path / "f16.gguf", IDS), 2e-2)


def test_llama_cpp_applies_the_lora_file_with_lorakits_scales(tiny_dir, tmp_path):
    llama_cpp()
    from lorakit.lora.model import LoraModel

    adapter = _adapter(
        tiny_dir,
        tmp_path / "adapter",
        scale=0.3,
        use_rslora=True,
        rank_pattern={"k_proj": 2},
        alpha_pattern={"v_proj": 3, "down_proj": 12},
    )
    base_file, lora_file = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    export_gguf(str(tiny_dir), base_file, progress=False)
    export_gguf(str(tiny_dir), lora_file, [adapter], adapter_only=True, progress=False)
    lora = LoraModel.from_pretrained(load_model(str(tiny_dir)), adapter)
    ours = torch_logits(lora, IDS)
    base = torch_logits(load_model(str(tiny_dir)), IDS)
    assert np.abs(ours - base).max() > 0.05  # the adapter changes the logits
    _close(ours, llama_cpp_logits(base_file, IDS, lora=lora_file), 1e-3)


# ---------------------------------------------------------------- the built-in model, slow

LLAMA_ARGS = {"n_ctx": 256, "logits_all": True, "verbose": False, "n_threads": 2}
CHAT_PROMPTS = ["Who are you?", "Write one sentence about the sea.", "What is 12 times 7?"]


def _builtin_adapter(path):
    """A random adapter on the built-in model, large enough to change its answers."""
    from lorakit.models import BUILTIN_MODEL

    return _adapter(BUILTIN_MODEL, path, scale=0.15, use_rslora=True, alpha_pattern={"o_proj": 4})


def _llama_cpp_greedy(llm, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def _file_prompt_ids(llm, prompt: str) -> list[int]:
    """The prompt rendered by the chat template stored in the GGUF file, tokenized by llama.cpp."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    text = formatter(messages=[{"role": "user", "content": prompt}]).prompt
    return llm.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.slow
def test_builtin_model_greedy_tokens_in_llama_cpp(tmp_path):
    module = llama_cpp()
    from lorakit.lora.model import LoraModel
    from lorakit.models import BUILTIN_MODEL, load_tokenizer

    adapter = _builtin_adapter(tmp_path / "adapter")
    merged, base_file, lora_file = (tmp_path / n for n in ("m.gguf", "b.gguf", "a.gguf"))
    export_gguf(BUILTIN_MODEL, merged, [adapter], progress=False)
    export_gguf(BUILTIN_MODEL, base_file, progress=False)
    export_gguf(BUILTIN_MODEL, lora_file, [adapter], adapter_only=True, progress=False)
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    lora = LoraModel.from_pretrained(load_model(BUILTIN_MODEL), adapter).eval()
    runs = {
        "merged": module.Llama(str(merged), **LLAMA_ARGS),
        "adapter-only": module.Llama(str(base_file), lora_path=str(lora_file), **LLAMA_ARGS),
    }
    changed = 0
    for prompt in CHAT_PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            ours = lora.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)[
                0, len(ids) :
            ].tolist()
            with lora.disable_adapter():
                base = lora.generate(
                    input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False
                )[0, len(ids) :].tolist()
        changed += ours != base
        for name, llm in runs.items():
            assert _file_prompt_ids(llm, prompt) == ids, name
            theirs = _llama_cpp_greedy(llm, ids, 16, tokenizer.eos_token_id)
            print(f"{name}: {prompt!r} -> {tokenizer.decode(theirs)!r}")
            assert theirs == ours, (name, prompt, tokenizer.decode(theirs), tokenizer.decode(ours))
    assert changed >= 1  # the adapter changes at least one answer


HELD_OUT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. From the lantern "
    "room he could see the fishing boats returning to the harbour, their lights bobbing on the "
    "dark water. In winter the storms came from the north, and the waves broke against the "
    "rocks below with a sound like distant thunder. He kept a log of every ship that passed, "
    "writing the names in a leather notebook that had belonged to his grandfather."
)


def _weights_from_file(model, path):
    """The model with every weight replaced by the (dequantized) one stored in a GGUF file."""
    from lorakit.models.gguf_arch import gguf_tensor_name, layout

    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("lm_head.") and config.tie_word_embeddings:
                continue
            tensor = stored[gguf_tensor_name(config, name)]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            values = torch.from_numpy(values.reshape(param.shape).copy())
            rows = torch.arange(param.shape[0], dtype=torch.float64).reshape(-1, 1)
            order = layout(config, name, rows.expand(-1, 2))[:, 0].long()
            if param.dim() == 2:
                param[order] = values  # stored row i holds the original row order[i]
            else:
                param.copy_(values)
    return model


@pytest.mark.slow
def test_q8_0_against_f32(tmp_path):
    """The q8_0 file's weights (read back from the file) against f32 on a held-out paragraph.
    (llama.cpp itself is not used here: the llama-cpp-python build this was written with
    crashes on every quantized file, its own package's Q4_1 file included.)"""
    from lorakit.models import BUILTIN_MODEL, load_tokenizer

    ids = load_tokenizer(BUILTIN_MODEL)(HELD_OUT)["input_ids"]
    f32, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    size32 = export_gguf(BUILTIN_MODEL, f32, progress=False).size
    size8 = export_gguf(BUILTIN_MODEL, q8, dtype="q8_0", progress=False).size
    a = torch_logits(load_model(BUILTIN_MODEL), ids)
    roundtrip = torch_logits(_weights_from_file(load_model(BUILTIN_MODEL), f32), ids)
    np.testing.assert_array_equal(roundtrip, a)  # the f32 file holds exactly the weights
    b = torch_logits(_weights_from_file(load_model(BUILTIN_MODEL), q8), ids)

    def perplexity(logits):
        logp = torch.log_softmax(torch.tensor(logits[:-1]), -1)
        return float(torch.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))

    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    print(
        f"q8_0 {size8 / 2**20:.1f} MiB / f32 {size32 / 2**20:.1f} MiB = {size8 / size32:.3f}; "
        f"top-1 agreement {agree:.3f} on {len(ids)} tokens; perplexity f32 {perplexity(a):.3f} "
        f"q8_0 {perplexity(b):.3f}"
    )
    assert 0.25 < size8 / size32 < 0.3
    assert agree >= 0.95 and perplexity(b) < 1.02 * perplexity(a)
