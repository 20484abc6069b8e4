"""What Hugging Face `Trainer` (and TRL, accelerate) see when they are handed a `LoraModel`.

`Trainer` treats a model three ways: a peft `PeftModel` (found by `isinstance`, so only with
peft installed and only for peft's own class), a transformers `PreTrainedModel` (saved with
`model.save_pretrained(dir)`), or any other module (its whole `state_dict()` written as
`model.safetensors`, the frozen base included). lorakit does not import peft and does not patch
transformers, so a `LoraModel` takes the second way: it is a `PreTrainedModel` in type only.
`HFFace` gives it that type and forwards every attribute `PreTrainedModel` defines (and
`LoraModel` does not) to the wrapped model, so `PreTrainedModel`'s own methods never run on the
wrapper; `nn.Module`'s methods stay `nn.Module`'s.

The forward: a `LoraModel`'s `forward` *is* the wrapped model's `forward` (read it and you get
the wrapped model's bound method, with its signature, which is what `Trainer` inspects to choose
dataset columns; assign it and the wrapped model's forward is replaced, re-bound to the wrapped
model, which is what TRL and accelerate do when they patch a model's forward). Read on the class,
`LoraModel.forward` is a generic `(*args, labels=None, adapter_names=None, **kwargs)`, so that
`Trainer` finds `labels` among its label names as it does for a peft model.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn
from transformers import PreTrainedModel


def _class_forward(self, *args: Any, labels: Any = None, adapter_names: Any = None, **kwargs: Any):
    """The wrapped model's forward; `adapter_names` gives one adapter per batch row."""
    if labels is not None:
        kwargs["labels"] = labels
    return self(*args, adapter_names=adapter_names, **kwargs)


class WrappedForward:
    """`model.forward` reads and writes the wrapped model's `forward` (see the module docstring)."""

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return _class_forward
        return obj.base_model.model.forward

    def __set__(self, obj: Any, value: Any) -> None:
        if isinstance(value, types.MethodType) and value.__self__ is obj:
            value = types.MethodType(value.__func__, obj.base_model.model)
        obj.base_model.model.forward = value

    def __delete__(self, obj: Any) -> None:
        obj.base_model.model.__dict__.pop("forward", None)


class _FromWrapped:
    """A `PreTrainedModel` attribute read from the wrapped model instead."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.base_model.model, self.name)


def _face_namespace() -> dict[str, Any]:
    names: set[str] = set()
    for cls in PreTrainedModel.__mro__:
        if cls not in (nn.Module, object):
            names |= {n for n in vars(cls) if not n.startswith("__")}
    namespace: dict[str, Any] = {}
    for name in names:
        namespace[name] = (
            getattr(nn.Module, name) if hasattr(nn.Module, name) else _FromWrapped(name)
        )
    namespace["base_model"] = property(lambda self: self._modules["base_model"])
    namespace["forward"] = WrappedForward()
    namespace["__doc__"] = "A `PreTrainedModel` in type only; attributes come from `base_model`."
    return namespace


HFFace = type("HFFace", (PreTrainedModel,), _face_namespace())
HFFace.__module__ = __name__
