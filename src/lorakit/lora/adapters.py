"""The adapter directory, in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

File keys are `base_model.model.<module path>.lora_A.weight` (the adapter name dropped),
`<path>.lora_magnitude_vector` for DoRA, plus
`<path>.base_layer.bias` / `<path>.bias` when biases train and `<path>.<param>` for
`modules_to_save` copies. Loading is strict, checks everything against the base model before
touching it, and never unpickles.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.files import apply_umask, atomic_dir, other_than_file
from lorakit.lora import conv, mha, registry, replication
from lorakit.lora.config import CONFIG_NAME, LoraConfig
from lorakit.lora.experts import expert_factors
from lorakit.lora.inits import converted_to_lora
from lorakit.lora.inject import find_modules_to_save, find_targets, is_shared_bias, walk
from lorakit.lora.layers import (
    EMBEDDING,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    ModulesToSave,
    layer_kind,
)
from lorakit.lora.layouts import (
    WRITES_LAYOUT_OF,
    ParamSpec,
    expected_parameters,
    key_stems,
    param_stems,
    to_current,
)
from lorakit.lora.params import LoraParams
from lorakit.lora.token_files import (
    BASE_WEIGHT,
    refresh_originals,
    whole_copy_target,
    whole_layer_keys,
    whole_layers,
)
from lorakit.lora.tokens import DELTA, token_shapes, token_tensors

WEIGHTS_NAME = "adapter_model.safetensors"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
CARD_NAME = "README.md"


class LoadResult(NamedTuple):
    """Keys of the model's adapter that the given dict lacked, and keys it had that fit nothing."""

    missing_keys: list[str]
    unexpected_keys: list[str]


PREFIX = "base_model.model."
MAX_TEMPLATE_BYTES = 1 << 20
# Largest |scaling * B @ A| entry an adapter may add to a base weight: what float16 holds, so the
# adapter can run (and merge) in 16 bits. Trained adapters stay far below it (their updates are
# of the size of the base weights, about 1); values beyond it can only overflow.
MAX_UPDATE = float(torch.finfo(torch.float16).max)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


# ----------------------------------------------------------------- saving


def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under peft's file key names."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.r:
            a, b = module.lora_weights(adapter_name)
            stem = "lora_embedding_" if module.kind == EMBEDDING else "lora_"
            suffix = "" if module.kind == EMBEDDING else ".weight"
            out[f"{path}.{stem}A{suffix}"] = a
            out[f"{path}.{stem}B{suffix}"] = b
            if adapter_name in module.lora_magnitude_vector:
                out[f"{path}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name]
            if module.lora_b_bias(adapter_name) is not None:
                out[f"{path}.lora_B.bias"] = module.lora_b_bias(adapter_name)
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = module.base_layer.bias
        elif registry.is_custom(module) and adapter_name in module.r:
            for key, tensor in registry.adapter_tensors(module, adapter_name).items():
                out[f"{path}.{key}"] = tensor
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{path}.{key}"] = tensor
        elif isinstance(module, LoraParams) and adapter_name in module.r:
            for param, stem in key_stems(path, module.param_names(adapter_name)).items():
                a, b = module.lora_weights(adapter_name, param)
                out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = a, b
    out.update(token_tensors(model, adapter_name))
    if bias == "all":
        for name, param in model.named_parameters():
            if is_shared_bias(name):
                out[name] = param
    return {PREFIX + k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str,
    config: LoraConfig,
    chat_template: str | None = None,
    convert_from: str | Path | None = None,
    embedding_layers: str | bool = "auto",
) -> Path:
    """Write one adapter atomically (`files.atomic_dir`): the whole folder is staged, fsynced
    and renamed into place, so `directory` holds the old adapter or the new one, never a mix.
    Other files already in the folder (a README the user wrote, other adapters' subfolders) are
    carried into the new one; a chat template left from an earlier save is not.

    `convert_from`: the adapter saved right after a PiSSA / OLoRA initialisation; the adapter is
    then written as the equivalent plain LoRA for the original base (`inits.converted_to_lora`),
    and that folder's config gets init_lora_weights=True, as peft does. `embedding_layers`:
    peft's `save_embedding_layers` (`tokens.whole_layers`).
    """
    directory = Path(directory)
    tensors = adapter_state_dict(model, adapter_name, config.bias)
    whole = whole_layers(model, config, adapter_name, embedding_layers)
    tensors.update({PREFIX + k: v.detach().cpu().clone() for k, v in whole.items()})
    if config.target_parameters:  # readers tell the expert layout by it (`layouts`)
        config = copy.copy(config)
        config.extra = {**config.extra, "peft_version": WRITES_LAYOUT_OF}
    if convert_from is not None:
        initial = read_adapter(convert_from)
        tensors, config = converted_to_lora(tensors, config, initial.tensors)
        initial.config.init_lora_weights = True
        initial.config.save(initial.directory)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(
            f"refusing to save adapter `{adapter_name}`: non-finite values in {bad[0]}"
        )
    # a template from an earlier save would not belong to this adapter
    with atomic_dir(directory, keep=lambda name: name != CHAT_TEMPLATE_NAME) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(staging)
        if not (directory / CARD_NAME).exists():  # a card the user wrote is kept
            (staging / CARD_NAME).write_text(model_card(model, config), encoding="utf-8")
        if chat_template:
            (staging / CHAT_TEMPLATE_NAME).write_text(chat_template)
        apply_umask(staging)
    return directory


def model_card(model: nn.Module, config: LoraConfig) -> str:
    """The adapter's `README.md`: the Hub's metadata block (peft's library name, so the Hub and
    peft's tools recognise a LoRA adapter) and a short description."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    meta: dict = {"base_model": name} if name else {}
    meta.update({"library_name": "peft", "tags": ["lora", "lorakit"]})
    targets = config.target_modules
    shown = ", ".join(targets) if isinstance(targets, list) else str(targets)
    base = f" for `{name}`" if name else ""
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# LoRA adapter{base}\n\n"
        f"Rank {config.rank_for('')}, alpha {config.alpha_for('')}, on: {shown}.\n\n"
        "Written by lorakit in peft's format: load it with `PeftModel.from_pretrained(base, "
        "folder)` from lorakit or from peft.\n"
    )


# ----------------------------------------------------------------- reading


@dataclass
class AdapterFiles:
    """What an adapter directory holds, read and validated as files (not yet against a base)."""

    directory: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    chat_template: str | None = None
    layout: str | None = None  # of expert tensors (`layouts`), known once checked against a base


def read_adapter(directory: str | Path) -> AdapterFiles:
    """Read config, tensors and chat template; refuse pickle, name the file on any corruption."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory not found")
    weights = directory / WEIGHTS_NAME
    if other_than_file(weights):
        raise AdapterError(
            f"{weights}: is {other_than_file(weights)}, not a regular file; an adapter's weights "
            f"are a regular {WEIGHTS_NAME} file, as save_pretrained writes it"
        )
    if not weights.is_file():
        pickled = [name for name in _PICKLE_NAMES if (directory / name).exists()]
        if pickled:
            raise AdapterError(
                f"{directory / pickled[0]}: pickle adapter files can run code when loaded and are "
                "refused. Convert it where you trust it: `from safetensors.torch import save_file; "
                f"save_file(torch.load(path, weights_only=True), '{WEIGHTS_NAME}')`"
            )
        raise AdapterError(f"{weights}: not found (an adapter needs {WEIGHTS_NAME})")
    config = LoraConfig.load(directory)
    if config.target_modules == "all-linear" and config.target_parameters is None:
        config.target_parameters = []  # written before lorakit adapted experts: layers only
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(
            f"{weights}: not a readable safetensors file ({error}); the file is truncated or "
            "corrupt: save the adapter again"
        ) from None
    check_tensors(weights, config, tensors)
    return AdapterFiles(directory, config, tensors, read_chat_template(directory))


def check_tensors(where: Path, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that are not floating point or not finite, and LoRA pairs whose update
    `scaling * B @ A` reaches past MAX_UPDATE; AdapterError names the file and the key."""
    for key, tensor in tensors.items():
        _check_values(where, key, tensor)
    for key in tensors:
        for a_suffix, b_suffix in (
            (".lora_A.weight", ".lora_B.weight"),
            (".lora_embedding_A", ".lora_embedding_B"),
        ):
            stem = key.removesuffix(a_suffix)
            if stem != key and stem + b_suffix in tensors:
                name = stem.removeprefix(PREFIX)
                a, b = tensors[key], tensors[stem + b_suffix]
                if a.dim() == 2 and a.shape[0] != config.rank_for(name):
                    continue  # a stack of experts: checked per expert by `check_adapter`
                _check_update(where, name, a, b, config.scaling_for(name))


def read_chat_template(directory: str | Path) -> str | None:
    """The adapter's `chat_template.jinja` (None if absent), checked: at most 1 MiB, UTF-8, and
    a template Jinja can parse; otherwise an AdapterError naming the file and the problem."""
    path = Path(directory) / CHAT_TEMPLATE_NAME
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MAX_TEMPLATE_BYTES:
        raise AdapterError(
            f"{path}: {size:,} bytes; a chat template may have at most {MAX_TEMPLATE_BYTES:,} "
            "(a template this large would not fit any context): fix or delete the file"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterError(
            f"{path}: not UTF-8 (byte {error.start} is {raw[error.start : error.start + 1]!r}); "
            "save the template as UTF-8"
        ) from None
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as error:
        raise AdapterError(
            f"{path}: line {error.lineno}: not a valid Jinja template ({error.message})"
        ) from None
    return text


# ----------------------------------------------------------------- checking against a base


@dataclass
class AdapterCheck:
    """The result of checking an adapter against a base model: expected keys and shapes."""

    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    target_names: list[str] = field(default_factory=list)
    to_save_names: list[str] = field(default_factory=list)
    base_copies: list[str] = field(default_factory=list)  # whole base weights that differ
    param_specs: list[ParamSpec] = field(default_factory=list)  # adapted parameters
    optional: dict[str, tuple[int, ...]] = field(default_factory=dict)  # whole vocab layers


def expected_shapes(model: nn.Module, config: LoraConfig) -> AdapterCheck:
    """File keys and shapes an adapter with `config` must have for `model` (model untouched;
    with `layer_replication`, a replicated copy is read unless `model` is replicated so)."""
    check = AdapterCheck()
    wanted = config.layer_replication
    if wanted and replication.replicated_map(model) != wanted:
        model = copy.deepcopy(model)
        replication.replicate(model, wanted)
    for name, module in find_targets(model, config):
        r = config.rank_for(name)
        kind = layer_kind(module)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        layer_cls = registry.layer_class(module, config, registry.parent_of(model, name))
        if layer_cls in _FILE_SHAPES:
            for suffix, shape in _FILE_SHAPES[layer_cls](base, r, config.use_dora).items():
                check.expected[f"{name}.{suffix}"] = shape
        elif layer_cls not in _OWN_LINEAR:
            check.expected.update(_custom_shapes(base, name, config))
        elif kind == EMBEDDING:
            n_in, n_out = base.num_embeddings, base.embedding_dim
            check.expected[f"{name}.lora_embedding_A"] = (r, n_in)
            check.expected[f"{name}.lora_embedding_B"] = (n_out, r)
            if config.use_dora:
                check.expected[f"{name}.lora_magnitude_vector"] = (n_out,)
        else:
            n_in, n_out = _in_out(base, kind)
            check.expected[f"{name}.lora_A.weight"] = (r, n_in)
            check.expected[f"{name}.lora_B.weight"] = (n_out, r)
            if config.use_dora:
                check.expected[f"{name}.lora_magnitude_vector"] = (n_out,)
            if config.lora_bias:
                check.expected[f"{name}.lora_B.bias"] = (n_out,)
        if config.bias == "lora_only" and getattr(base, "bias", None) is not None:
            check.expected[f"{name}.base_layer.bias"] = tuple(base.bias.shape)
        check.target_names.append(name)
    params, check.param_specs = expected_parameters(model, config)
    check.expected.update(params)
    for name, module in find_modules_to_save(model, config):
        source = module.original_module if isinstance(module, ModulesToSave) else module
        for key, tensor in source.state_dict().items():
            check.expected[f"{name}.{key}"] = tuple(tensor.shape)
        check.to_save_names.append(name)
    check.expected.update(token_shapes(model, config))
    if config.bias == "all":
        targets = set(check.target_names)
        for pname, param in model.named_parameters():
            if not is_shared_bias(pname):
                continue
            owner = pname.rsplit(".", 1)[0].removesuffix(".base_layer")
            key = f"{owner}.base_layer.bias" if owner in targets else pname
            check.expected[key] = tuple(param.shape)
    check.expected = {PREFIX + k: v for k, v in check.expected.items()}
    check.optional = {PREFIX + k: v for k, v in whole_layer_keys(model, config).items()}
    return check


def _custom_shapes(base: nn.Module, name: str, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The file keys and shapes of a registered layer class's adapter on `base`: the class
    made on a copy of `base`, its adapter tensors read (`registry.adapter_tensors`)."""
    layer = registry.wrap(copy.deepcopy(base), "default", config, name)
    return {
        f"{name}.{k}": tuple(t.shape) for k, t in registry.adapter_tensors(layer, "default").items()
    }


# lorakit's layer classes whose file keys are not the linear ones -> (base, r, dora) -> shapes
_FILE_SHAPES = {conv.LoraConv: conv.file_shapes, mha.LoraMHA: mha.file_shapes}
_OWN_LINEAR = (LoraLinear, LoraEmbedding, mha.LoraOutProj)  # their keys are read below


def _in_out(base: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        n_in, n_out = base.weight.shape
        return n_in, n_out
    return base.in_features, base.out_features


def normalise_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the extra copies some writers add (`original_module`, `modules_to_save` aliases)."""
    return {
        k: v
        for k, v in tensors.items()
        if ".original_module." not in k and (".modules_to_save." not in k)
    }


def check_adapter(model: nn.Module, adapter: str | Path | AdapterFiles) -> AdapterCheck:
    """Raise `AdapterError` unless the adapter fits `model` exactly: keys and shapes (values and
    dtypes were checked by `read_adapter`). The error lists every missing, unexpected or
    mis-shaped tensor, one line each. Warns about entries of `target_modules` the base does not
    have."""
    files = adapter if isinstance(adapter, AdapterFiles) else read_adapter(adapter)
    where = files.directory / WEIGHTS_NAME
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    try:
        check = expected_shapes(base, files.config)
    except ConfigError as error:
        raise AdapterError(
            f"{files.directory}: the adapter does not fit this base: {error}"
        ) from None
    files.tensors, files.layout = to_current(
        files.tensors, check.param_specs, files.config.peft_version
    )
    _check_expert_updates(where, files, check.param_specs)
    tensors = normalise_keys(files.tensors)
    problems: list[str] = []
    check.base_copies = _base_copies(base, check, tensors, where, problems)
    for key, shape in check.expected.items():
        if key not in tensors:
            problems.append(f"missing key {key} (expected shape {list(shape)})")
        else:
            problems += _shape_problem(key, tensors[key], shape)
    for key, shape in check.optional.items():
        if key.endswith(DELTA) or key not in tensors:  # a tied head's copy of the rows
            problems += _shape_problem(key, tensors[key], shape) if key in tensors else []
        elif not _shape_problem(key, tensors[key], shape):
            weight = whole_copy_target(base, key.removeprefix(PREFIX))
            if not torch.equal(tensors[key].to(weight.dtype), weight.detach()):
                check.base_copies.append(key)
        else:
            problems += _shape_problem(key, tensors[key], shape)
    known = set(check.expected) | set(_base_copy_keys(check)) | set(check.optional)
    unexpected = sorted(set(tensors) - known)
    problems += [f"unexpected key {key}: the base has no such module" for key in unexpected]
    if problems:
        raise AdapterError(
            f"{where}: the adapter does not fit this base ({len(problems)} "
            f"{'tensor' if len(problems) == 1 else 'tensors'}):\n"
            + "".join(f"  {line}\n" for line in problems)
            + "it was saved for another base model or rank, the file is incomplete, or its "
            "config and weights disagree"
        )
    missing = unmatched_targets(base, files.config)
    if missing:
        warnings.warn(
            f"{files.directory / CONFIG_NAME}: target_modules {missing} match no module of this "
            "base; the adapter adapts only the modules that exist",
            stacklevel=2,
        )
    return check


def _check_expert_updates(where: Path, files: AdapterFiles, specs: list[ParamSpec]) -> None:
    """The float16 bound of `_check_update` for every expert of every adapted stack."""
    for spec in (s for s in specs if s.stack):
        a, b = (files.tensors.get(f"{spec.stem}.lora_{x}.weight") for x in "AB")
        if a is not None and b is not None and (a.shape, b.shape) == (spec.a_shape, spec.b_shape):
            name = spec.stem.removeprefix(PREFIX)
            a3, b3 = expert_factors(a, b, spec.experts)
            for e in range(spec.experts):
                scale = files.config.scaling_for(name)
                _check_update(where, f"{name} (expert {e})", a3[e], b3[e], scale)


def _shape_problem(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> list[str]:
    """The line saying `key` has the wrong shape, or nothing."""
    got = tuple(tensor.shape)
    if got == shape:
        return []
    return [f"{key} has shape {list(got)} but this base needs {list(shape)}"]


def _check_values(where: Path, key: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise AdapterError(
            f"{where}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; adapter "
            f"weights must be floating point ({allowed}): the file was not written by a LoRA "
            "trainer, or was converted wrongly"
        )
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"{where}: {key} holds non-finite values (NaN/inf)")


def _check_update(where: Path, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """Refuse a LoRA update scaling * B @ A with an entry beyond MAX_UPDATE (or non-finite)."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        return  # shapes are checked against the base later, with a better message
    a, b = a.float(), b.float()  # A (r, in), B (out, r)
    # max |(B @ A)_ij| <= sum_k max_i |B_ik| * max_j |A_kj|: exact products only when needed
    largest = abs(scaling) * float((b.abs().amax(0) * a.abs().amax(1)).sum()) if a.numel() else 0
    if largest > MAX_UPDATE:
        largest = max(
            float((b @ a[:, start : start + 4096]).abs().amax()) * abs(scaling)
            for start in range(0, a.shape[1], 4096)
        )
    if not largest <= MAX_UPDATE:
        size = (
            "is not finite in float32" if not math.isfinite(largest) else f"reaches {largest:.3g}"
        )
        raise AdapterError(
            f"{where}: the update of {name} (lora_alpha / r * B @ A) {size}; an adapter may add at "
            f"most {MAX_UPDATE:g} to a weight (what float16 holds). The adapter's weights or "
            "lora_alpha are corrupt or diverged: retrain it or fix its adapter_config.json"
        )


def _base_copy_keys(check: AdapterCheck) -> list[str]:
    return [f"{PREFIX}{name}.base_layer.weight" for name in check.target_names]


def _base_copies(
    model: nn.Module,
    check: AdapterCheck,
    tensors: dict[str, torch.Tensor],
    where: Path,
    problems: list[str],
) -> list[str]:
    """The target base weights the file carries whole (peft saves embeddings it adapts this way:
    `<path>.base_layer.weight`); returns those that differ from the base's, and adds those of
    the wrong shape to `problems`."""
    differ = []
    modules = dict(model.named_modules())
    for name, key in zip(check.target_names, _base_copy_keys(check), strict=True):
        if key not in tensors:
            continue
        module = modules[name]
        owner = module.base_layer if isinstance(module, LoraLayer) else module
        weight = getattr(owner, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise AdapterError(
                f"{where}: {key} is a whole copy of {name}'s weight, but this base stores that "
                "weight quantized; load the base without quantization"
            )
        wrong_shape = _shape_problem(key, tensors[key], tuple(weight.shape))
        problems += wrong_shape
        if not wrong_shape and not torch.equal(tensors[key].to(weight.dtype), weight.detach()):
            differ.append(key)
    return differ


def unmatched_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Entries of a list `target_modules` that name no module of `model` (by path or class)."""
    if not isinstance(config.target_modules, list):
        return []
    found = set()
    for name, module in walk(model):
        cls = type(module.base_layer if isinstance(module, LoraLayer) else module).__name__
        found.update(e for e in config.target_modules if e in (name, cls) or name.endswith("." + e))
    return [e for e in config.target_modules if e not in found and e != "preset"]


@torch.no_grad()
def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy tensors under peft's file key names into adapter `adapter_name` of `model` (the
    wrapped model, its LoRA layers injected); the keys were checked (`check_adapter`)."""
    tensors = normalise_keys(tensors)
    modules = dict(model.named_modules())
    stems = param_stems(model, adapter_name)
    custom = {p: m for p, m in modules.items() if registry.is_custom(m)}
    for key, tensor in tensors.items():
        path = key.removeprefix(PREFIX)
        owner, _, leaf = path.rpartition(".")
        layer, _, which = owner.rpartition(".")
        holder = next((p for p in custom if path.startswith(p + ".lora_")), None)
        if holder is not None:
            own = registry.adapter_tensors(custom[holder], adapter_name)
            target = own[path.removeprefix(holder + ".")]
        elif layer in stems and which in ("lora_A", "lora_B"):
            module, param = stems[layer]
            target = getattr(module, which)[param][adapter_name]
        elif leaf in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            target = getattr(modules[owner], leaf)[adapter_name]
        elif path.endswith("." + DELTA):
            target = modules[owner].trainable_tokens_delta[adapter_name]
        elif path.endswith("." + BASE_WEIGHT):
            target = whole_copy_target(model, path)
        elif owner.endswith((".lora_A", ".lora_B")):
            layer, _, which = owner.rpartition(".")
            target = getattr(getattr(modules[layer], which)[adapter_name], leaf)
        else:
            target = _module_to_save_param(modules, path, adapter_name)
            target = model.get_parameter(path) if target is None else target
        target.copy_(tensor.to(target.dtype))
    refresh_originals(model, adapter_name)


def _module_to_save_param(modules: dict, path: str, adapter_name: str) -> torch.Tensor | None:
    """The parameter at `path` inside a ModulesToSave's copy for `adapter_name`, or None."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = modules.get(".".join(parts[:cut]))
        if isinstance(module, ModulesToSave):
            copy_ = module.modules_to_save[adapter_name]
            return copy_.get_parameter(".".join(parts[cut:])) if parts[cut:] else None
    return None
