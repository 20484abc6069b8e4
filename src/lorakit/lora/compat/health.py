"""`healthcheck()` / `print_healthcheck()`: the adapter state a model is in before training,
with peft's report keys and finding codes, so a peft program that checks its model first runs.

A finding is `{"code", "severity", "message"}`; the model is ready when no finding is an error.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import transformers

from lorakit.version import __version__

_CONFIG_FIELDS = (
    "task_type",
    "inference_mode",
    "target_modules",
    "target_parameters",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)


def _finding(code: str, severity: str, message: str) -> dict[str, str]:
    return {"code": code, "severity": severity, "message": message}


def _plain(value: Any) -> Any:
    """`value` as JSON can hold it (sets sorted, enums by value, the rest as text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_plain(item) for item in value]
        return sorted(items) if isinstance(value, set) else items
    return _plain(value.value) if hasattr(value, "value") else str(value)


def _agreed(values: list[Any]) -> Any:
    """The value every layer shares, or "irregular" where layers disagree."""
    distinct = {repr(v) for v in values}
    return values[0] if len(distinct) == 1 else "irregular"


def _adapter_state(model) -> dict[str, Any]:
    layers = model._wrappers()
    available = sorted(model.peft_config)
    if not layers:
        return {"enabled": False, "active_adapters": [], "merged_adapters": []} | {
            "available_adapters": available,
            "requires_grad": {},
        }
    return {
        "enabled": _agreed([not layer.disable_adapters for layer in layers]),
        "active_adapters": _agreed([sorted(layer.active_adapters) for layer in layers]),
        "merged_adapters": _agreed([sorted(getattr(m, "merged_adapters", [])) for m in layers]),
        "available_adapters": available,
        "requires_grad": _requires_grad(layers, available),
    }


def _holds(layer, adapter: str) -> bool:
    """Whether a wrapper carries weights for `adapter`."""
    return adapter in getattr(layer, "r", getattr(layer, "modules_to_save", {}))


def _adapter_params(layer, adapter: str) -> list:
    if hasattr(layer, "adapter_parameters"):
        return layer.adapter_parameters(adapter)
    return list(layer.modules_to_save[adapter].parameters())


def _requires_grad(layers: list, available: list[str]) -> dict[str, Any]:
    """Per adapter: True / False when all its tensors agree on every layer, else "irregular"."""
    flags: dict[str, set[bool]] = {name: set() for name in available}
    for layer in layers:
        for name in available:
            if _holds(layer, name):
                flags[name] |= {p.requires_grad for p in _adapter_params(layer, name)}
    return {
        name: seen.pop() if len(seen) == 1 else "irregular" for name, seen in flags.items() if seen
    }


def _runtime(model) -> dict[str, Any]:
    base = model.get_base_model()
    dtypes: Counter[str] = Counter()
    for param in base.parameters():
        dtypes[str(param.dtype).removeprefix("torch.")] += param.numel()
    config = getattr(base, "config", None)
    return {
        "model_name_or_path": getattr(config, "_name_or_path", None),
        "model_type": getattr(config, "model_type", None),
        "training": model.training,
        "activation_checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
        "parameter_dtypes": dict(sorted(dtypes.items())),
        "parameter_devices": sorted({p.device.type for p in base.parameters()}),
    }


def _findings(state: dict, trainable: int, total: int, least: int, most_percent: float) -> list:
    percent = 100 * trainable / max(total, 1)
    found = []
    if trainable < least:
        found.append(
            _finding(
                "TOO_FEW_TRAINABLE_PARAMETERS",
                "error",
                f"The model should have at least {least} trainable parameter(s); "
                f"it has {trainable}.",
            )
        )
    elif percent > most_percent:
        found.append(
            _finding(
                "HIGH_TRAINABLE_PARAMETER_FRACTION",
                "warning",
                f"{percent:.2f}% of model parameters are trainable; expected no more than "
                f"{most_percent}% for adapter training.",
            )
        )
    if state["enabled"] == "irregular":
        found.append(
            _finding(
                "IRREGULAR_ADAPTER_ENABLED_STATE",
                "error",
                "Some adapter layers are switched on and others off.",
            )
        )
    elif not state["enabled"]:
        found.append(
            _finding(
                "ADAPTERS_DISABLED",
                "warning",
                "Every adapter layer is switched off: the model computes the base model.",
            )
        )
    if state["active_adapters"] == "irregular":
        found.append(
            _finding(
                "IRREGULAR_ACTIVE_ADAPTERS",
                "error",
                "The layers disagree on which adapters are active.",
            )
        )
    if state["merged_adapters"] == "irregular":
        found.append(
            _finding(
                "IRREGULAR_MERGED_ADAPTERS",
                "error",
                "The layers disagree on which adapters are merged.",
            )
        )
    elif state["merged_adapters"]:
        names = ", ".join(f"'{name}'" for name in state["merged_adapters"])
        found.append(
            _finding(
                "MERGED_ADAPTERS",
                "warning",
                f"Adapter(s) {names} are merged into the base weights; "
                "unmerge them before training.",
            )
        )
    grads = state["requires_grad"]
    if "irregular" in grads.values():
        found.append(
            _finding(
                "IRREGULAR_REQUIRES_GRAD",
                "error",
                "Some tensors of one adapter are trainable and others frozen.",
            )
        )
    elif isinstance(state["active_adapters"], list):
        frozen = [name for name in state["active_adapters"] if grads.get(name) is False]
        if frozen:
            found.append(
                _finding(
                    "ACTIVE_ADAPTERS_NOT_TRAINABLE",
                    "warning",
                    f"The active adapter(s) {', '.join(frozen)} have no trainable tensor.",
                )
            )
    return found


def healthcheck(model, min_trainable_params: int = 1, max_trainable_params_percent: float = 50):
    """The model's adapter state, parameter counts and findings, as a JSON-ready dict."""
    trainable, total = model.get_nb_trainable_parameters()
    state = _adapter_state(model)
    findings = _findings(
        state, trainable, total, min_trainable_params, max_trainable_params_percent
    )
    layer_types = {
        name: dict(Counter(type(m).__name__ for m in model._wrappers() if _holds(m, name)))
        for name in state["available_adapters"]
    }
    return {
        "is_ready": not any(f["severity"] == "error" for f in findings),
        "environment": {
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "lorakit_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        },
        "summary": {
            "model_id": _runtime(model)["model_name_or_path"],
            "base_model_type": type(model.get_base_model()).__name__,
            "peft_types": {name: "LORA" for name in model.peft_config},
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / max(total, 1),
            "num_adapter_layers": len(model._wrappers()),
            "adapter_layer_types": layer_types,
        },
        "adapter_configurations": {
            name: {f: _plain(v) for f in _CONFIG_FIELDS if (v := getattr(cfg, f, None)) is not None}
            for name, cfg in model.peft_config.items()
        },
        "model_runtime": _runtime(model),
        "adapter_state": state,
        "findings": findings,
    }


def format_healthcheck(report: dict[str, Any], sep: str = ", ", indent: str = "  ") -> str:
    """`report` (from `healthcheck`) as a short human-readable text."""
    summary, state, runtime = report["summary"], report["adapter_state"], report["model_runtime"]

    def names(value: Any) -> str:
        return value if isinstance(value, str) else ", ".join(value) or "none"

    lines = [
        "lorakit healthcheck",
        f"Model:\n{indent}ID: {summary['model_id']}{sep}type: {summary['base_model_type']}{sep}"
        f"adapters: {', '.join(summary['peft_types'])}",
        f"Runtime:\n{indent}training: {runtime['training']}{sep}"
        f"devices: {', '.join(runtime['parameter_devices'])}{sep}"
        f"dtypes: {', '.join(f'{k}={v:,}' for k, v in runtime['parameter_dtypes'].items())}",
        f"Parameters:\n{indent}trainable: {summary['trainable_params']:,}{sep}"
        f"total: {summary['total_params']:,}{sep}"
        f"percent trainable: {summary['trainable_percent']:.4f}%{sep}"
        f"adapter layers: {summary['num_adapter_layers']}",
        f"State:\n{indent}adapter is enabled: {state['enabled']}{sep}"
        f"active: {names(state['active_adapters'])}{sep}merged: {names(state['merged_adapters'])}",
    ]
    if report["findings"]:
        lines.append("Findings:")
        lines += [f"{indent}{f['severity'].upper()}: {f['message']}" for f in report["findings"]]
    return "\n".join(lines)


def print_healthcheck(model, sink: Callable[[str], Any] = print, **kwargs: Any) -> None:
    """Print `healthcheck(model)` as text through `sink` (`print` by default)."""
    limits = {
        k: kwargs.pop(k)
        for k in ("min_trainable_params", "max_trainable_params_percent")
        if k in kwargs
    }
    sink(format_healthcheck(healthcheck(model, **limits), **kwargs))
