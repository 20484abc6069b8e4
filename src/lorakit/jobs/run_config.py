"""The run config: one YAML file (model, LoRA, data, training, eval, output) as typed data.

`load_run_config(path, overrides)` reads the YAML, applies `key.path=value` overrides (values
parsed as YAML scalars), and validates everything before any work starts. Every error names the
key path, the value given, what is allowed and, for a typo, the closest valid key.
"""

from __future__ import annotations

import difflib
import types
import typing
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorakit.data.mixing import DatasetSource
from lorakit.data.pipeline import DataConfig
from lorakit.errors import ConfigError, DataError, LorakitError, closest
from lorakit.lora import inits
from lorakit.lora.config import LoraConfig
from lorakit.models import ModelConfig
from lorakit.train.config import PreferenceConfig, PreferenceSettings, TrainConfig


class LoraSection(BaseModel):
    """The LoRA adapter to train (the fields of `lorakit.LoraConfig`, peft's names)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="Rank of the update B @ A.")
    lora_alpha: float = Field(32, gt=0, description="Scaling numerator: scaling = lora_alpha / r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "preset",
        description="Layers to adapt: names or suffixes, a regex, 'all-linear', or 'preset' "
        "(the architecture's usual projections).",
    )
    target_parameters: list[str] | None = Field(
        None,
        description="Parameters to adapt (peft's names): a mixture of experts' fused expert "
        "tensors ('gate_up_proj', 'down_proj') or a router's weight ('gate.weight').",
    )
    exclude_modules: list[str] | str | None = Field(
        None, description="Layers never to adapt (same matching rules)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    modules_to_save: list[str] | None = Field(
        None, description="Whole modules to train and save next to the adapter (e.g. lm_head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling lora_alpha / sqrt(r).")
    use_dora: bool = Field(
        False, description="DoRA: a trained magnitude per output row times the normalised W + BA."
    )
    init_lora_weights: bool | str = Field(
        True,
        description="True: kaiming A, zero B; 'gaussian'; 'pissa' / 'pissa_niter_N' / 'olora' / "
        "'loftq' start from the base weight and change it; False: random B (tests only).",
    )
    loftq_config: dict[str, int] = Field(
        default_factory=dict,
        description="With init_lora_weights 'loftq': {loftq_bits: 4 or 8, loftq_iter: rounds}.",
    )
    layers_to_transform: list[int] | None = Field(
        None, description="Only these layer indices (None: all layers)."
    )
    layers_pattern: list[str] | str | None = Field(
        None, description="Name of the layer list used with layers_to_transform (e.g. 'layers')."
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Regex on the layer name -> rank for that layer."
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Regex on the layer name -> lora_alpha for that layer."
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = Field(
        None,
        description="Token ids whose embedding rows train (only those rows are saved), or "
        "{layer: ids}; model.add_tokens sets it to the added tokens' ids.",
    )
    ensure_weight_tying: bool = Field(
        False, description="Keep a head tied to the embedding tied (peft's meaning)."
    )

    def to_lora_config(self) -> LoraConfig:
        """The `lorakit.LoraConfig` this section describes ('preset' is resolved on injection)."""
        if self.init_lora_weights == "loftq":
            raise ConfigError(
                "init_lora_weights='loftq' in `lorakit train` is not supported by lorakit: the "
                "adapter fits only the LoftQ-changed base, which a run does not save; use the "
                "Python API (get_peft_model on the full-precision model, then quantize_model)"
            )
        if self.use_dora and inits.is_mutating(self.init_lora_weights):
            raise ConfigError(
                f"use_dora with init_lora_weights={self.init_lora_weights!r} in `lorakit train` "
                "is not supported by lorakit: a run writes its adapter for the original base, "
                "and a DoRA adapter trained on the changed base cannot be converted to it"
            )
        return LoraConfig(**self.model_dump())


class EvalSection(BaseModel):
    """What to evaluate on: a held-out dataset for loss and perplexity, and exact match."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(
        None,
        description="Eval dataset file or built-in name; None: the train dataset's `test` split "
        "for a built-in dataset, else no evaluation.",
    )
    split: str = Field("test", description="Split of a built-in eval dataset.")
    datasets: list[DatasetSource] = Field(
        default_factory=list,
        description="Several eval datasets mixed into one (as data.datasets); None with "
        "data.datasets: the `test` split of its built-in datasets.",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N eval rows.")
    exact_match: bool = Field(
        False, description="Also generate answers to the eval prompts and score exact match."
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per exact-match answer.")


# Sections that do not change the result: train's fields are compared one by one by the loop
# (with its own exceptions); eval and output_dir not at all.
RUN_FREE = {"train", "eval", "output_dir"}
# data settings that change how the tokens are made, never which: a resume may change them
DATA_RUN_FREE = {"num_proc", "cache"}
# data keys added after runs were first checkpointed: a checkpoint written before them, resumed
# with them at these defaults, finds its settings unchanged
LATER_DATA_KEYS: dict[str, Any] = {"datasets": [], "mix_seed": 0}


class RunConfig(BaseModel):
    """A whole run: `lorakit train CONFIG.yaml` validates and runs this."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "full", "dpo", "orpo", "simpo"] = Field(
        "lora",
        description="lora: train an adapter (QLoRA with model.quantization); full: all "
        "weights; dpo / orpo / simpo: preference tuning of an adapter on chosen / rejected "
        "pairs (settings in `preference`).",
    )
    output_dir: str = Field(
        "runs/lorakit", description="Run directory: checkpoints, adapter, logs."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalSection = Field(default_factory=EvalSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings)

    @property
    def preference_tuning(self) -> bool:
        """True for method dpo, orpo or simpo."""
        return self.method in PREFERENCE_METHODS

    def train_config(self) -> TrainConfig:
        """The loop's settings: `train`, with the preference method and its settings."""
        if not self.preference_tuning:
            return self.train
        preference = PreferenceConfig(method=self.method, **self.preference.model_dump())
        return self.train.model_copy(update={"preference": preference})

    def resume_settings(self) -> dict[str, Any]:
        """The sections a resumed run must share with its checkpoint, beside train's fields."""
        run = self.model_dump(mode="json")
        run["data"] = {k: v for k, v in run["data"].items() if k not in DATA_RUN_FREE}
        for key, default in LATER_DATA_KEYS.items():  # at their defaults: as before they existed
            if run["data"].get(key) == default:
                del run["data"][key]
        return {f"run.{k}": v for k, v in run.items() if k not in RUN_FREE}

    def eval_data_config(self) -> DataConfig | None:
        """The DataConfig of the eval set, or None when the run has none."""
        from lorakit.data.builtin import BUILTIN_DATASETS

        update: dict[str, Any] = {"split": self.eval.split, "limit": self.eval.limit}
        update.update(packing=False, datasets=[])
        if self.eval.datasets:
            return self.data.model_copy(update={**update, "datasets": self.eval.datasets})
        if self.eval.dataset is not None:
            return self.data.model_copy(update={**update, "dataset": self.eval.dataset})
        if self.data.datasets:  # the held-out split of the mix's built-in datasets
            held_out = [
                source.model_copy(update={"split": self.eval.split, "weight": None, "rows": None})
                for source in self.data.datasets
                if source.path in BUILTIN_DATASETS
            ]
            return (
                self.data.model_copy(update={**update, "datasets": held_out}) if held_out else None
            )
        if self.data.dataset not in BUILTIN_DATASETS:
            return None
        return self.data.model_copy(update=update)


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "lora": LoraSection,
    "data": DataConfig,
    "eval": EvalSection,
    "train": TrainConfig,
    "preference": PreferenceSettings,
}
PREFERENCE_METHODS = ("dpo", "orpo", "simpo")


# ---------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; `lorakit init` writes example configs")
    try:
        with path.open(encoding="utf-8") as stream:  # a named stream: marks name the file
            data = yaml.safe_load(stream)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override `{item}` is not `key.path=value` (e.g. train.lr=1e-4, lora.r=8)"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override `{item}`: `{where}` is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raises ConfigError naming the bad key."""
    data = read_yaml(path) if path is not None else {}
    if path is not None:
        resolve_paths(data, Path(path).parent)
    overrides = list(overrides or [])
    apply_overrides(data, overrides)
    source = str(path) if path is not None else "config"
    given = {item.partition("=")[0].strip(): item for item in overrides}
    return validate_run_config(data, source, given)


def resolve_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the config file's relative dataset paths (a name with a dataset file's suffix) and
    model paths (starting with ./ or ../) relative to the file's folder, in place. Built-in
    names, hub ids and output_dir (relative to the working directory) are left alone."""
    from lorakit.data.formats import FILE_TYPES

    def dataset(value: Any) -> Any:
        is_file = isinstance(value, str) and Path(value).suffix.lower() in FILE_TYPES
        if is_file and not Path(value).expanduser().is_absolute():
            return str((folder / value).absolute())
        return value

    for section in ("data", "eval"):
        part = data.get(section)
        if not isinstance(part, dict):
            continue
        if "dataset" in part:
            part["dataset"] = dataset(part["dataset"])
        for entry in part.get("datasets") or []:
            if isinstance(entry, dict) and "path" in entry:
                entry["path"] = dataset(entry["path"])
    model = data.get("model")
    name = model.get("name_or_path") if isinstance(model, dict) else None
    if isinstance(name, str) and name.startswith(("./", "../")):
        model["name_or_path"] = str((folder / name).absolute())


def validate_run_config(
    data: dict[str, Any], source: str = "config", overrides: dict[str, str] | None = None
) -> RunConfig:
    """Validate a nested dict as a RunConfig, converting pydantic errors to one ConfigError.

    `overrides` ({key path: "key=value"}) names the command-line overrides, so that an error in
    one is blamed on the override, not on the file."""
    try:
        config = RunConfig.model_validate(data)
        if config.method != "full":
            config.lora.to_lora_config()
    except ValidationError as error:
        parts = [
            f"override `{item}`: {text}"
            if (item := _override_of(path, overrides))
            else f"{source}: {text}"
            for path, text in _describe_all(error, data)
        ]
        raise ConfigError("; ".join(parts)) from None
    except ConfigError as error:
        raise ConfigError(f"{source}: lora: {error}") from None
    if config.train.optimizer == "adamw_8bit" and find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{source}: train.optimizer: adamw_8bit needs bitsandbytes; install it with "
            "`pip install 'lorakit[optim8bit]'`, or use train.optimizer: adamw"
        )
    _check_fsdp(config, source)
    _check_preference(config, source)
    return config


def _check_preference(run: RunConfig, source: str) -> None:
    """What preference tuning refuses, found before any model loads."""
    if run.train.preference is not None:
        raise ConfigError(
            f"{source}: train.preference is set by `method` and the `preference` section; "
            "write method: dpo (or orpo, simpo) and preference: {beta: ...} instead"
        )
    if run.preference_tuning and run.data.packing:
        raise ConfigError(
            f"{source}: method={run.method} with data.packing: preference pairs are scored "
            "as whole sequences and are not packed; set data.packing: false"
        )
    if run.preference_tuning and run.eval.exact_match:
        raise ConfigError(
            f"{source}: eval.exact_match with method={run.method}: pairs have no single "
            "reference answer; read eval_rewards/accuracies in metrics.jsonl instead"
        )


def _check_fsdp(run: RunConfig, source: str) -> None:
    """What train.distributed='fsdp' refuses, found before any model loads."""
    if run.train.distributed != "fsdp":
        return
    why = None
    if run.model.quantization:
        why = (
            f"model.quantization={run.model.quantization!r}: the quantized codes are buffers, "
            "which FSDP2 does not shard; QLoRA runs with train.distributed=ddp"
        )
    elif run.method == "full":
        why = "method=full: fsdp checkpoints gather the trainable tensors, here the whole model"
    elif run.train.precision == "fp16":
        why = "precision='fp16': its loss scaling is not run on sharded gradients; use bf16"
    elif run.eval.exact_match:
        why = "eval.exact_match: answers are generated after training, from the sharded model"
    if why:
        raise ConfigError(
            f"{source}: train.distributed='fsdp' with {why}. This combination is not supported "
            "by lorakit; use train.distributed=ddp, or drop the setting"
        )


def _override_of(path: str, overrides: dict[str, str] | None) -> str | None:
    """The override that set the key at `path` (or a section above it), if any."""
    for key, item in (overrides or {}).items():
        if path == key or path.startswith(key + "."):
            return item
    return None


def check_data(run: RunConfig) -> None:
    """Check that the datasets the run names exist, are readable and have a detectable format
    (before any model loads); the error names the key (`data.dataset`, `eval.dataset`)."""
    from lorakit.data.pipeline import check_dataset
    from lorakit.data.preference import check_pairs

    check = check_pairs if run.preference_tuning else check_dataset
    checks = [("data", run.data), ("eval", run.eval_data_config())]
    for key, config in checks:
        if config is None:
            continue
        try:
            check(config)
        except LorakitError as error:
            where = f"{key}.datasets" if config.datasets else f"{key}.dataset = {config.dataset!r}"
            split = f" (split {config.split!r})" if config.split != "train" else ""
            raise DataError(f"{where}{split}: {error}") from None


# Names other tools use for our keys: a hint when spelling alone finds no close key.
ALIASES = {
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "model_name": "name_or_path",
    "model_name_or_path": "name_or_path",
    "path": "name_or_path",
    "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "target_modules": "target_modules",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "lr_scheduler_type": "scheduler",
    "output": "output_dir",
    "bf16": "precision",
    "load_in_4bit": "quantization",
    "load_in_8bit": "quantization",
    "torch_dtype": "dtype",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "llm_int8_skip_modules": "skip",
}
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "tuple"}


def _key_path(loc: tuple) -> list[str]:
    """The config key path of an error location, without pydantic's union-member tags."""
    return [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]


def _describe_all(error: ValidationError, data: dict[str, Any]) -> list[tuple[str, str]]:
    """(key path, message) per bad key; the errors of a union's members are joined with 'or'."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for item in error.errors():
        by_path.setdefault(".".join(_key_path(item["loc"])), []).append(item)
    out = []
    for path, items in by_path.items():
        first = dict(items[0], msg=" or ".join(dict.fromkeys(i["msg"] for i in items)))
        out.append((path, _describe(first, data)))
    return out


def _describe(item: dict[str, Any], data: dict[str, Any]) -> str:
    """One validation error as 'key path: value given; what is allowed'."""
    loc = _key_path(item["loc"])
    path = ".".join(loc)
    if item["type"] == "extra_forbidden":
        valid = sorted(_fields_at(loc[:-1]))
        hint = closest(loc[-1], valid)
        if not hint:
            aliases = [a for a, key in ALIASES.items() if key in valid]
            alias = difflib.get_close_matches(loc[-1], aliases, n=1, cutoff=0.75)
            hint = f" (did you mean `{ALIASES[alias[0]]}`?)" if alias else ""
        return (
            f"unknown key `{path}`{hint}; valid keys "
            f"{'in `' + '.'.join(loc[:-1]) + '`' if loc[:-1] else 'at the top level'}: "
            f"{', '.join(valid)}"
        )
    allowed = _allowed(loc)
    given = item.get("input", _lookup(data, item["loc"]))
    given_text = "missing" if item["type"] == "missing" else f"{given!r}"
    return (
        f"`{path}` = {given_text} is invalid: {item['msg']}"
        f"{f' (allowed: {allowed})' if allowed else ''}"
    )


def _lookup(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        annotation = field.annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return model


def _fields_at(loc: list[str]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _allowed(loc: list[str]) -> str:
    """The allowed values of the field at `loc`, from its type and bounds."""
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model and loc else None
    if field is None:
        return ""
    text = type_name(field.annotation)
    bounds = [
        f"{name} {getattr(meta, attr)}"
        for meta in field.metadata
        for attr, name in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(meta, attr, None) is not None
    ]
    return text + (f", {' and '.join(bounds)}" if bounds else "")


# ---------------------------------------------------------------- the reference document


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type (`int | None`, `'cosine' | 'linear'`)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
