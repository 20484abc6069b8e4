"""`LoraTuner`: the level between a `LoraModel` and the model it wraps, as peft nests them.

`lora_model.base_model` is a `LoraTuner` and `lora_model.base_model.model` the wrapped model, so
parameter names and module paths are peft's (`base_model.model.<module path>...`).
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

# what peft's tuner (`peft_model.base_model`) offers besides the wrapped model's attributes
_TUNER_METHODS = {
    "peft_config",
    "active_adapter",
    "active_adapters",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter_layers",
    "enable_adapter_layers",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "add_weighted_adapter",
    "targeted_module_names",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
}


class LoraTuner(nn.Module):
    """`lora_model.base_model`: holds the wrapped model as `.model`, as peft nests it.

    Parameter names are then peft's (`base_model.model.<module path>...`), and so are the paths
    peft programs walk (`model.base_model.model.model.layers[0]`). Other attributes are the
    wrapped model's; the adapter methods peft's tuner offers are the owning `LoraModel`'s.
    """

    prefix = "lora_"  # every adapter parameter's name holds it, as in peft

    def __init__(self, model: nn.Module, owner: nn.Module) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", weakref.ref(owner))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def active_adapter(self) -> str | list[str]:
        """As on peft's tuner: the name when one adapter is active, the list when several are."""
        names = self._owner().active_adapters
        return names[0] if len(names) == 1 else list(names)

    def __getattr__(self, name: str) -> Any:
        if "_modules" not in self.__dict__:
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_owner") or name.startswith("__"):
                raise  # not set up yet (a copy being built): never recurse
            if name in _TUNER_METHODS:
                return getattr(self._owner(), name)
            return getattr(self.model, name)
