"""Quantize while loading: the model is built with empty weights, then the checkpoint is read
one tensor at a time and each linear layer is quantized as soon as its weight is read.

Loading first and quantizing after (`from_pretrained` + `quantize_model`) holds the whole model
in its float dtype at once. Here the peak is the quantized layers, the tensors kept in float
(embeddings, norms, `lm_head`), and one layer's float weight with its quantization temporaries.
The model is the same bit for bit: the layers are chosen by the same rule
(`quant.quantization_targets`) and quantized by the same code (`quant.quantize_layer`) from the
same values (each tensor cast to the load dtype on the CPU, then moved to the device, as
`from_pretrained(...).to(device)` does); tied tensors are read once and stay one tensor.

Each tensor is read through its own `safe_open`: one mapping of a file kept open for the whole
load would keep every page read so far resident, which brings the process's memory back to the
size of the checkpoint. A checkpoint this module cannot reproduce exactly raises
`StreamingUnsupported`, with the reason, before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorakit.errors import ModelError
from lorakit.quant.experts import expert_targets, quantize_expert
from lorakit.quant.layer import DEFAULT_SKIP, check_skip, quantization_targets, quantize_layer

_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

# key -> (file, shape, safetensors dtype name)
Index = dict[str, tuple[Path, tuple[int, ...], str]]


class StreamingUnsupported(Exception):
    """This checkpoint cannot be quantized while loading; the message says why."""


def load_quantized(
    folder: str | Path,
    config: Any,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    method: str = "nf4",
    double_quant: bool = True,
    skip: Iterable[str] | None = None,
    compute_dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The causal LM in `folder` (safetensors) with its linear layers quantized as they load.

    `config` is the model's transformers config; `skip` None means `quant.DEFAULT_SKIP`, and
    given entries must each name a linear layer. Raises StreamingUnsupported before reading
    any weight when the result could differ from `from_pretrained` + `quantize_model`.
    """
    folder = Path(folder)
    index = checkpoint_index(folder)
    load_dtype = resolve_dtype(dtype, config, index)
    model = _empty_model(config, load_dtype, trust_remote_code, attn_implementation)
    check_skip(model, skip)
    keys, groups = _checkpoint_keys(model, index)
    targets = set(quantization_targets(model, DEFAULT_SKIP if skip is None else skip))
    experts = set(expert_targets(model, DEFAULT_SKIP if skip is None else skip))
    loaded: set[str] = set()
    for name in [name for name, _ in model.named_modules()]:  # names only: no float layer kept
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, tensor in own:
            key = keys.get(prefix + attr)
            if key is None:  # a non-persistent buffer, computed when the model was built
                setattr(module, attr, tensor.to(device))
            elif key not in loaded:
                _load(model, groups[key], index[key][0], key, tensor, device)
                loaded.add(key)
            if (name, attr) in experts:  # a fused expert tensor: quantized as soon as it is read
                quantize_expert(model, name, attr, method, double_quant, compute_dtype)
        if name in targets:
            quantize_layer(model, name, method, double_quant, compute_dtype)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "unloaded tensor"
    if model.can_generate() and (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def checkpoint_index(folder: Path) -> Index:
    """Every tensor of the folder's safetensors checkpoint (one file or shards): file, shape,
    dtype."""
    listing = folder / "model.safetensors.index.json"
    if listing.is_file():
        shards = sorted(set(json.loads(listing.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise StreamingUnsupported("the folder has no safetensors weights (model.safetensors)")
    index: Index = {}
    for shard in shards:
        path = folder / shard
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (not a dict) sorted, as transformers reads
                    view = handle.get_slice(key)
                    index[key] = (path, tuple(view.get_shape()), view.get_dtype())
        except (OSError, SafetensorError) as err:
            raise ModelError(f"cannot read the checkpoint file {path}: {err}") from err
    return index


def resolve_dtype(dtype: str, config: Any, index: Index) -> torch.dtype:
    """The load dtype as from_pretrained picks it: the name given; for 'auto' the config's
    dtype, else the first float tensor's of the first file, else float32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return getattr(torch, configured) if isinstance(configured, str) else configured
    first = min(path for path, _, _ in index.values()) if index else None
    for path, _, name in index.values():
        if path == first and name in _FLOAT_DTYPES:
            return _FLOAT_DTYPES[name]
    return torch.float32


def _empty_model(
    config: Any, dtype: torch.dtype, trust_remote_code: bool, attn_implementation: str | None
) -> nn.Module:
    """The model with every parameter on the meta device (buffers real), tied as transformers
    ties."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if getattr(config, "quantization_config", None):  # a pre-quantized (GPTQ, fp8, ...) checkpoint
        raise StreamingUnsupported("the checkpoint is quantized already (quantization_config)")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # transformers ties after loading; the tensor identity is needed now
    if dtype in (torch.float16, torch.bfloat16) and (
        getattr(model, "_keep_in_fp32_modules", None)
        or getattr(model, "_keep_in_fp32_modules_strict", None)
    ):
        raise StreamingUnsupported(
            f"{type(model).__name__} keeps some modules in float32 when loaded in {dtype}"
        )
    return model


def _checkpoint_keys(model: nn.Module, index: Index) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(state-dict name -> checkpoint key, checkpoint key -> every state-dict name sharing it).

    Every parameter and persistent buffer must be in the checkpoint under its own name (or a
    tied partner's), with its shape; anything else is for from_pretrained to sort out.
    """
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    keys: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    missing = []
    for ident, group in names.items():
        stored = [name for name in group if name in index]
        if len(stored) > 1:
            raise StreamingUnsupported(
                f"the checkpoint stores the tied tensors {', '.join(stored)} separately"
            )
        if not stored:
            missing.append(group[0])
            continue
        shape = tuple(tensors[ident].shape)
        if index[stored[0]][1] != shape:
            raise StreamingUnsupported(
                f"`{stored[0]}` has shape {index[stored[0]][1]} in the checkpoint, {shape} in "
                "the model"
            )
        groups[stored[0]] = group
        keys.update(dict.fromkeys(group, stored[0]))
    if missing:
        raise StreamingUnsupported(
            f"the checkpoint has no tensor named {', '.join(missing[:3])}"
            f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}: its names need "
            "transformers' conversion, or weights are missing"
        )
    return keys, groups


def _load(
    model: nn.Module, names: list[str], path: Path, key: str, empty: torch.Tensor, device: str
) -> None:
    """Read `key` and put it in place of `empty` under every name in `names` (tied: one tensor).

    Floats are cast to `empty`'s dtype on the CPU, then moved to `device`; a parameter stays
    a parameter."""
    with safe_open(path, framework="pt") as handle:  # the mapping closes with this tensor read
        value = handle.get_tensor(key)
        value = value.to(empty.dtype, copy=True) if value.is_floating_point() else value.clone()
    value = value.to(device)
    if isinstance(empty, nn.Parameter):
        value = nn.Parameter(value, requires_grad=empty.requires_grad)
    for name in names:
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, value)
