"""lorakit.quant.load: quantizing while loading gives exactly the model that loading in full
precision and then quantizing gives, ties included, at a fraction of the memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_gpt2
from lorakit.errors import ConfigError
from lorakit.models import load_model
from lorakit.quant import QuantLinear, quantize_model
from lorakit.quant.load import StreamingUnsupported, load_quantized

# (method, double_quant): int8 has no block scales, so double_quant does not apply to it.
METHODS = [("int8", False), ("nf4", True), ("nf4", False), ("fp4", True)]


def tiny_llama(tied: bool = False, **sizes: int) -> LlamaForCausalLM:
    """2 layers, width 32, 4 heads / 2 KV heads unless `sizes` says otherwise."""
    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **sizes,
    }
    config = LlamaConfig(
        vocab_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        **sizes,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_load")
    models = {"llama": tiny_llama(), "llama-tied": tiny_llama(tied=True)}
    models["gpt2"] = make_tiny_gpt2()  # Conv1D layers (weights stored (in, out)), wte tied
    models["llama-bf16"] = tiny_llama().to(torch.bfloat16)  # a bf16 checkpoint, for dtype=auto
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}


def reference(folder: Path, method: str, dtype: str = "float32", **options) -> torch.nn.Module:
    """The load-then-quantize path: from_pretrained in full precision, then quantize_model."""
    return quantize_model(load_model(str(folder), dtype=dtype), method, **options)


def assert_same_model(streamed: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Same modules, same tensors (values, dtypes, devices), same configs, same logits,
    bit for bit."""
    assert str(streamed) == str(loaded)
    ours, theirs = streamed.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and ours[key].device == theirs[key].device, key
        assert torch.equal(ours[key], theirs[key]), key
    buffers = dict(loaded.named_buffers())  # the non-persistent ones too (rotary inv_freq)
    for name, buffer in streamed.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    requires_grad = {name: p.requires_grad for name, p in loaded.named_parameters()}
    assert {name: p.requires_grad for name, p in streamed.named_parameters()} == requires_grad
    assert streamed.config.to_dict() == loaded.config.to_dict()
    assert streamed.generation_config.to_dict() == loaded.generation_config.to_dict()
    assert not streamed.training and not loaded.training
    ids = torch.randint(0, 128, (2, 11), device=loaded.device)
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("method, double_quant", METHODS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streaming_equals_load_then_quantize(folders, family, method, double_quant):
    folder = folders[family]
    streamed = load_model(str(folder), quantization=method, double_quant=double_quant)
    assert_same_model(streamed, reference(folder, method, double_quant=double_quant))
    assert any(isinstance(m, QuantLinear) for m in streamed.modules())


@pytest.mark.parametrize(
    "folder, dtype", [("llama", "bfloat16"), ("llama-bf16", "auto"), ("llama-bf16", "float32")]
)
def test_streaming_casts_as_from_pretrained(folders, folder, dtype):
    streamed = load_model(str(folders[folder]), dtype=dtype, quantization="nf4")
    assert_same_model(streamed, reference(folders[folder], "nf4", dtype=dtype))
    expected = torch.float32 if dtype == "float32" else torch.bfloat16
    assert streamed.model.embed_tokens.weight.dtype == expected
    assert streamed.model.layers[0].mlp.up_proj.compute_dtype == expected


@pytest.mark.parametrize("family", ["llama-tied", "gpt2"])
def test_tied_weights_stay_tied_and_unquantized(folders, family):
    # skip=[] would quantize lm_head, but its weight is the embedding's: it stays shared.
    streamed = load_model(str(folders[family]), quantization="int8", skip=[])
    embedding = streamed.get_input_embeddings().weight
    assert streamed.lm_head.weight is embedding
    assert type(streamed.lm_head) is torch.nn.Linear
    assert_same_model(streamed, reference(folders[family], "int8", skip=[]))


def test_options_pass_through(folders):
    folder = folders["llama"]
    options = {"double_quant": False, "skip": ["down_proj"], "compute_dtype": "bfloat16"}
    streamed = load_model(str(folder), quantization="nf4", **options)
    kinds = {name: type(m).__name__ for name, m in streamed.named_modules()}
    assert kinds["model.layers.1.mlp.down_proj"] == "Linear"
    assert kinds["lm_head"] == "QuantLinear"  # an explicit skip list replaces the default
    layers = [m for m in streamed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 6 + 1
    assert all(m.compute_dtype == torch.bfloat16 and not m.double_quant for m in layers)
    assert streamed.model.embed_tokens.weight.dtype == torch.float32  # the load dtype
    loaded = quantize_model(
        load_model(str(folder)), "nf4", False, ["down_proj"], compute_dtype=torch.bfloat16
    )
    assert_same_model(streamed, loaded)


def test_skip_entry_naming_no_linear_layer_is_an_error(folders):
    with pytest.raises(ConfigError, match=r"skip entry `dwn_proj`.*did you mean `down_proj`"):
        load_model(str(folders["llama"]), quantization="nf4", skip=["dwn_proj"])
    with pytest.raises(ConfigError, match="skip entry `mlp` names no linear layer"):
        load_model(str(folders["llama"]), quantization="nf4", skip="mlp")  # a parent module


def test_safetensors_missing_falls_back_with_the_reason(tmp_path, caplog):
    tiny_llama().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"  # rewritten as the older pytorch_model.bin
    torch.save(load_file(weights), tmp_path / "pytorch_model.bin")
    weights.unlink()
    with caplog.at_level("WARNING", logger="lorakit"):
        model = load_model(str(tmp_path), quantization="nf4")
    assert "no safetensors weights" in caplog.text and "full precision" in caplog.text
    assert_same_model(model, reference(tmp_path, "nf4"))


def test_checkpoints_it_cannot_reproduce_are_refused(folders, tmp_path):
    """Refused before any weight is read; load_model then loads in float and quantizes."""

    def refusal(folder: Path, tensors: dict, **config_changes) -> str:
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = LlamaConfig.from_pretrained(folders["llama-tied"])
        for name, value in config_changes.items():
            setattr(config, name, value)
        with pytest.raises(StreamingUnsupported) as info:
            load_quantized(folder, config, method="nf4")
        return str(info.value)

    tensors = load_file(folders["llama-tied"] / "model.safetensors")
    assert "lm_head.weight" not in tensors  # save_pretrained stores a tied tensor once
    renamed = {k.replace("model.norm.weight", "model.norm.gamma"): v for k, v in tensors.items()}
    assert "no tensor named model.norm.weight" in refusal(tmp_path / "renamed", renamed)
    twice = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    assert "stores the tied tensors" in refusal(tmp_path / "twice", twice)
    quantized = {"quant_method": "fp8"}
    message = refusal(tmp_path / "quantized", tensors, quantization_config=quantized)
    assert "quantized already" in message


def test_sharded_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 1
    streamed = load_model(str(tmp_path), quantization="nf4")
    assert_same_model(streamed, reference(tmp_path, "nf4"))


@pytest.mark.slow
def test_builtin_model_streams_to_the_same_nf4_model():
    # SmolLM2 ties lm_head to the embedding; its folder is the cached GGUF conversion.
    streamed = load_model("smollm2-135m-instruct", quantization="nf4")
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    assert_same_model(streamed, quantize_model(load_model("smollm2-135m-instruct"), "nf4"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_to_cuda_equals_load_then_quantize(folders):
    # Cast on the CPU, then moved, then quantized on the GPU: the order from_pretrained + .to() has.
    folder = str(folders["llama"])
    streamed = load_model(folder, dtype="bfloat16", device="cuda", quantization="nf4")
    assert streamed.model.layers[0].mlp.up_proj.weight_packed.is_cuda
    loaded = quantize_model(load_model(folder, dtype="bfloat16", device="cuda"), "nf4")
    assert_same_model(streamed, loaded)


# Measured in a fresh interpreter, after the imports and a first load of a tiny model; the
# peak (VmHWM) is reset before each load (`clear_refs` 5), so only the load itself counts.
# glibc's malloc would keep the freed 16 MiB weights in its heap and RSS would count that free
# memory too; a fixed mmap threshold makes RSS follow the live tensors (the CLI runs on
# tcmalloc, which behaves alike). Streaming is measured first: were memory from the first load
# still held, it would lower the second load's growth, the load-then-quantize one.
PEAK_SCRIPT = """
import gc, sys
from lorakit.models import load_model
from lorakit.quant import model_nbytes, quantize_model

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def load(folder, path):
    if path == "streaming":
        return load_model(folder, quantization="nf4")
    return quantize_model(load_model(folder), "nf4")

def measure(path):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status("VmRSS")
    model = load(sys.argv[1], path)
    return status("VmHWM") - before, model_nbytes(model)

for path in ("streaming", "load-then-quantize"):
    load(sys.argv[2], path)
print(*measure("streaming"), *measure("load-then-quantize"))
"""


def write_random_llama(folder: Path, **sizes: int) -> int:
    """Write a Llama checkpoint of N(0, 0.02) fp32 weights without running the model's init;
    return its size in bytes."""
    with torch.device("meta"):
        model = tiny_llama(**sizes)
    model.config.save_pretrained(folder)
    tensors = {name: torch.randn(t.shape) * 0.02 for name, t in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc")
def test_streaming_peak_is_the_quantized_model_plus_one_layer(folders, tmp_path):
    """A Llama of width 2048 (MLP 2048, 2 layers, vocab 128) has 14 linear layers of
    2048 x 2048 = 4 Mi weights: 224 MiB in fp32, 16 MiB each, and 29 MiB in NF4 with double
    quant (4.13 bits a weight); the embedding, norms and lm_head (kept in float) add 2 MiB.

    Load then quantize: from_pretrained holds all 224 MiB before the first layer is quantized,
    so the peak is at least that. Streaming: the quantized layers so far, one fp32 layer being
    read (16 MiB) and quantize_4bit's temporaries on 1 Mi weights at a time (~30 MiB) ->
    ~80 MiB. Measured on the dev machine: 280 MiB vs 76 MiB.
    """
    folder = tmp_path / "wide"
    full = write_random_llama(
        folder,
        hidden_size=2048,
        intermediate_size=2048,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-c", PEAK_SCRIPT, str(folder), str(folders["llama"])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    new_peak, new_bytes, old_peak, old_bytes = map(int, done.stdout.split())
    print(
        f"fp32 {full >> 20} MiB, NF4 {new_bytes >> 20} MiB; peak: streaming "
        f"{new_peak >> 20} MiB, load then quantize {old_peak >> 20} MiB"
    )
    assert new_bytes == old_bytes < 32 * 2**20
    assert old_peak > 0.9 * full
    assert new_peak < new_bytes + 16 * 2**20 + 64 * 2**20 < full / 2
