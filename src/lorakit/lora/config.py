"""`LoraConfig`: what to adapt and how, with peft's field names and `adapter_config.json` format.

The scaling of an adapter of rank r is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
`use_rslora`. `use_dora` makes it a DoRA adapter (`dora.py`); `init_lora_weights` picks the
initialisation: True (kaiming A, zero B), 'gaussian', or one from the base weight, 'pissa',
'pissa_niter_N', 'olora', 'loftq' (with `loftq_config`), which also change the base (`inits.py`).
`rank_pattern` / `alpha_pattern` map a regex on the module name to a per-module
rank / alpha; the first pattern that matches the end of the name wins. `lora_bias` gives each
adapter a trainable bias on lora_B (merged into the base layer's bias); `layer_replication`
stacks repeated decoder layers that share their weights (`replication.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterError, ConfigError, closest
from lorakit.files import other_than_file
from lorakit.lora.compat.fields import (
    DESCRIPTIVE,
    INSTEAD,
    PEFT_INIT,
    TASK_TYPES,
    UNSUPPORTED_FEATURES,
    PeftConfigNames,
)
from lorakit.lora.inits import check_loftq_config, is_pissa
from lorakit.lora.replication import check_layer_map

CONFIG_NAME = "adapter_config.json"


_BIAS = ("none", "all", "lora_only")


@dataclass
class _LoraFields:
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    init_lora_weights: bool | str = True
    loftq_config: dict[str, int] = field(default_factory=dict)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    layer_replication: list[list[int]] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


class LoraConfig(_LoraFields, PeftConfigNames):
    """Configuration of one LoRA adapter (peft's `LoraConfig` fields and meanings)."""

    def __init__(self, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(_LoraFields)]
        extra = {}
        for key in list(kwargs):
            if key in UNSUPPORTED_FEATURES:
                _refuse_feature(key, kwargs.pop(key), ConfigError, "LoraConfig")
            elif key in DESCRIPTIVE:
                extra[key] = kwargs.pop(key)
            elif key not in names:
                raise ConfigError(
                    f"LoraConfig got an unknown argument `{key}`{closest(key, names)}; "
                    f"allowed: {', '.join(n for n in names if n != 'extra')}"
                )
        super().__init__(**kwargs)
        self.extra = {k: v for k, v in {**self.extra, **extra}.items() if k != "peft_type"}
        self._custom_modules: dict[type, type] | None = None  # see _register_custom_module
        self._validate()

    def _register_custom_module(self, mapping: dict[type, type]) -> None:
        """Wrap modules of a type with a LoRA layer class of one's own: `{nn.LSTM: MyLora}`
        (peft's call; the protocol is in `lorakit.lora.registry`). Checked before the first
        one is kept; not saved in adapter_config.json, so register it again before loading."""
        from lorakit.lora.registry import check_mapping

        self._custom_modules = {**(self._custom_modules or {}), **check_mapping(mapping)}

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write `adapter_config.json` into `save_directory` (made if missing), as peft does."""
        directory = Path(save_directory)
        if directory.is_file():
            raise ConfigError(f"{directory}: is a file; save_pretrained needs a directory")
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **kwargs: Any
    ) -> LoraConfig:
        """Read `adapter_config.json` from a local adapter folder (lorakit does not download)."""
        directory = Path(pretrained_model_name_or_path)
        if subfolder:
            directory = directory / subfolder
        if not directory.is_dir():
            raise ConfigError(
                f"{directory}: no such folder; LoraConfig.from_pretrained reads a local adapter "
                "folder (downloading from a model hub is not supported by lorakit: download the "
                "folder first, e.g. with huggingface_hub.snapshot_download)"
            )
        return cls.load(directory)

    def _validate(self) -> None:
        """Check every field's type and value; the error names the field, the value and what is
        allowed. Sets and tuples become lists, and an int `layers_to_transform` a list."""
        for name in (
            "target_modules",
            "target_parameters",
            "exclude_modules",
            "modules_to_save",
            "layers_pattern",
        ):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value) if _all_str(value) else list(value))
        if _is_int(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layer_replication, (list, tuple)) and check_layer_map(
            self.layer_replication
        ):
            self.layer_replication = [list(pair) for pair in self.layer_replication]
        for name, check, allowed in _FIELD_RULES:
            if not check(getattr(self, name)):
                raise self._bad(name, allowed)
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            for pattern in _as_patterns(name, getattr(self, name)):
                _check_regex(name, pattern)
        for name, check, allowed in _PATTERN_RULES:
            for pattern, value in getattr(self, name).items():
                _check_regex(name, pattern)
                if not check(value):
                    raise ConfigError(
                        f"LoraConfig.{name}[{pattern!r}]={_shown(value)} is invalid: expected "
                        + allowed
                    )
        problem = check_loftq_config(self.init_lora_weights, self.loftq_config)
        if problem:
            raise ConfigError(f"LoraConfig: {problem}")
        if (
            (
                self.init_lora_weights in ("pissa", "olora")
                or str(self.init_lora_weights).startswith("pissa_niter_")
            )
            and self.use_rslora
            and (self.rank_pattern or self.alpha_pattern)
        ):
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training "
                "conversion of the changed base weights (PiSSA, OLoRA): such an adapter cannot be "
                "converted with save_pretrained(path_initial_model_for_weight_conversion=...); "
                "save it as it is, or drop use_rslora or the patterns",
                stacklevel=3,
            )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                "LoraConfig: lora_bias=True works only with init_lora_weights=True or False (as "
                f"in peft), got init_lora_weights={self.init_lora_weights!r}"
            )
        if self.lora_bias and self.use_dora:
            raise ConfigError(
                "LoraConfig: lora_bias=True is not supported with DoRA (nor by peft); set "
                "use_dora=False or lora_bias=False"
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "LoraConfig: layers_to_transform works with a list of target_modules, not a regex "
                "string; put the layer indices in the regex instead"
            )

    def _bad(self, name: str, allowed: str) -> ConfigError:
        shown = _shown(getattr(self, name))
        return ConfigError(f"LoraConfig.{name}={shown} is invalid: expected {allowed}")

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on `module_name` (rank_pattern, else r)."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The lora_alpha of the adapter on `module_name` (alpha_pattern, else lora_alpha)."""
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """The scaling of the adapter on `module_name` (see `scaling`)."""
        return scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content, peft's layout."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(_LoraFields)}
        data.pop("extra")
        data = {**UNSUPPORTED_FEATURES, **self.extra, **data}
        data["peft_type"] = "LORA"
        for key in ("target_modules", "target_parameters", "exclude_modules"):
            if isinstance(data[key], list):
                data[key] = sorted(data[key])
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> LoraConfig:
        """Build from a peft-style dict; unknown non-default peft features are refused."""
        known = {f.name for f in dataclasses.fields(_LoraFields)} - {"extra"}
        kwargs, extra, ignored = {}, {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in UNSUPPORTED_FEATURES:
                _refuse_feature(key, value, AdapterError, source)
            elif key in DESCRIPTIVE:
                extra[key] = value
            else:
                ignored.append(key)
        if "peft_type" not in data:
            raise AdapterError(
                f"{source}: no `peft_type`; this is not an adapter config written by peft or "
                "lorakit (they write peft_type: LORA)"
            )
        if data["peft_type"] != "LORA":
            raise AdapterError(f"{source}: peft_type={data['peft_type']!r}; lorakit reads LORA")
        if ignored:
            warnings.warn(
                f"Unexpected keyword arguments {sorted(ignored)} for class LoraConfig, these are "
                f"ignored ({source}: fields neither peft nor lorakit knows)",
                stacklevel=2,
            )
        try:
            config = cls(**kwargs)
        except ConfigError as error:
            raise AdapterError(f"{source}: {error}") from None
        config.extra = {k: v for k, v in extra.items() if k not in ("peft_type",)}
        return config

    def save(self, directory: str | Path) -> Path:
        """Write `adapter_config.json` into `directory`."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LoraConfig:
        """Read `adapter_config.json` from an adapter directory, with errors naming the file."""
        path = Path(directory) / CONFIG_NAME
        if other_than_file(path):
            raise AdapterError(f"{path}: is {other_than_file(path)}, not a regular file")
        if not path.is_file():
            raise AdapterError(
                f"{path}: not found; an adapter directory holds {CONFIG_NAME} and "
                "adapter_model.safetensors (as written by save_pretrained)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AdapterError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))


def _refuse_feature(key: str, value: Any, kind: type[Exception], where: str) -> None:
    """Raise `kind` when `value` asks for peft feature `key`, which lorakit does not have."""
    if value in (UNSUPPORTED_FEATURES[key], None, False, {}, []):
        return
    instead = INSTEAD.get(key, f"leave `{key}` at {UNSUPPORTED_FEATURES[key]!r}")
    raise kind(f"{where}: `{key}`={_shown(value)} is not supported by lorakit; {instead}")


def _valid_task_type(value: Any) -> bool:
    if value is None:
        return True
    if str(getattr(value, "value", value)) not in TASK_TYPES:
        raise ConfigError(
            f"Invalid task type: {value!r}. Must be one of the following task types: "
            f"{', '.join(TASK_TYPES)}. (LoraConfig.task_type)"
        )
    return True


def _valid_init(value: Any) -> bool:
    if isinstance(value, bool) or value in ("gaussian", "olora", "loftq") or is_pissa(value):
        return True
    if isinstance(value, str) and value.split("_niter_")[0] in PEFT_INIT:
        raise ConfigError(
            f"LoraConfig.init_lora_weights={value!r} is not supported by lorakit; use True "
            "(kaiming A, zero B), 'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq' or False"
        )
    return False


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _all_str(values: Any) -> bool:
    return all(isinstance(v, str) for v in values)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(i) and i >= 0 for i in value)


def _token_map(value: dict) -> bool:
    return all(isinstance(k, str) and k and _token_ids(v) for k, v in value.items())


def _names(value: Any, allow_string: bool = True) -> bool:
    """None, a string (when allowed) or a list of non-empty strings."""
    if value is None or (allow_string and isinstance(value, str)):
        return True
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _as_patterns(name: str, value: Any) -> list[str]:
    """The regular expressions a field holds: a target / exclude string, every layers_pattern."""
    if name == "layers_pattern":
        return [value] if isinstance(value, str) else list(value or [])
    return [value] if isinstance(value, str) else []


_NAMES = "a list of module names, a regex string, or 'all-linear'"
# (field, check, what is allowed) for every field of adapter_config.json lorakit reads
_FIELD_RULES: list[tuple[str, Any, str]] = [
    ("r", lambda v: _is_int(v) and v > 0, "a positive integer rank such as 8 or 16"),
    ("lora_alpha", lambda v: _is_number(v) and v > 0, "a positive number such as 16 or 32"),
    ("lora_dropout", lambda v: _is_number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    ("target_modules", _names, _NAMES),
    (
        "target_parameters",
        lambda v: _names(v, allow_string=False),
        "a list of parameter names such as ['gate_up_proj', 'down_proj', 'mlp.gate.weight']",
    ),
    ("exclude_modules", _names, _NAMES),
    ("bias", lambda v: v in _BIAS, f"one of {_BIAS}"),
    ("modules_to_save", lambda v: _names(v, allow_string=False), "a list of module names"),
    ("fan_in_fan_out", lambda v: isinstance(v, bool), "true or false"),
    ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
    (
        "init_lora_weights",
        _valid_init,
        "True (kaiming A, zero B), 'gaussian', 'pissa', 'pissa_niter_N' (N >= 1), 'olora', "
        "'loftq' or False",
    ),
    ("use_dora", lambda v: isinstance(v, bool), "true or false"),
    ("lora_bias", lambda v: isinstance(v, bool), "true or false"),
    ("loftq_config", lambda v: isinstance(v, dict), "a mapping {'loftq_bits': 4, 'loftq_iter': 1}"),
    (
        "trainable_token_indices",
        lambda v: v is None or _token_ids(v) or (isinstance(v, dict) and _token_map(v)),
        "a list of token ids (rows of the input embedding) or {layer name: [token ids]}",
    ),
    ("ensure_weight_tying", lambda v: isinstance(v, bool), "true or false"),
    (
        "layers_to_transform",
        lambda v: v is None or (isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)),
        "a layer index or a list of layer indices (integers >= 0)",
    ),
    ("layers_pattern", _names, "a name such as 'layers' or a list of such names"),
    (
        "layer_replication",
        check_layer_map,
        "a list of [start, end) layer ranges with 0 <= start < end, e.g. [[0, 4], [2, 5]]",
    ),
    ("rank_pattern", lambda v: isinstance(v, dict), "a mapping {module regex: rank}"),
    ("alpha_pattern", lambda v: isinstance(v, dict), "a mapping {module regex: lora_alpha}"),
    ("task_type", lambda v: _valid_task_type(v), "a string such as 'CAUSAL_LM'"),
    ("base_model_name_or_path", lambda v: v is None or isinstance(v, str), "a string"),
    ("inference_mode", lambda v: isinstance(v, bool), "true or false"),
]
_PATTERN_RULES: list[tuple[str, Any, str]] = [
    ("rank_pattern", lambda v: _is_int(v) and v > 0, "a positive integer rank"),
    ("alpha_pattern", lambda v: _is_number(v) and v > 0, "a positive number"),
]


def _check_regex(field_name: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise ConfigError(
            f"LoraConfig.{field_name}: {pattern!r} is not a string; give module names or "
            "regular expressions as strings"
        )
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(
            f"LoraConfig.{field_name}: {pattern!r} is not a valid regular expression ({error})"
        ) from None


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name):
            return value
    return default


def scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's factor on B @ A: lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised
    LoRA (`use_rslora`)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)
