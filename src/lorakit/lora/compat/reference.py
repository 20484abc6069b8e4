"""`reference_model(lora_model)`: the base of a LoraModel as a model of its own, sharing every
weight, for programs that want a frozen reference model beside the policy (TRL's `DPOTrainer`,
`ORPOTrainer` needs none) without holding a second copy of the base.

TRL finds a peft model with `isinstance(model, peft.PeftModel)` (accelerate's
`is_peft_model`), so it does not see a `LoraModel` as one, and with `ref_model=None` it loads a
second full base from `config._name_or_path` as the reference (or fails for a model built in
memory). `DPOTrainer(model=lora_model, ref_model=reference_model(lora_model), ...)` gives it a
reference that is the same network with the adapter switched off, which is what TRL computes
for a peft model.

The view holds the LoraModel outside its submodules, so it has no parameters of its own:
`.eval()`, `.to()` and dropout settings applied to it change nothing of the policy. Every
other attribute (`config`, `base_model` = the backbone, `get_output_embeddings`, ...) is the
wrapped Hugging Face model's, so code that patches the view's `forward` (TRL's fused LM head)
works as on a Hugging Face model; each call runs under `disable_adapter()`, whatever forward it
reaches.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class ReferenceModel(nn.Module):
    """A LoraModel's network with its adapters switched off on every call; no weights of its own."""

    def __init__(self, lora_model: nn.Module) -> None:
        super().__init__()
        if not hasattr(lora_model, "disable_adapter"):
            raise TypeError(
                f"reference_model needs a LoraModel (from get_peft_model), got "
                f"{type(lora_model).__name__}"
            )
        self.__dict__["_policy"] = lora_model  # not a submodule: no parameters, no mode

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_policy" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_policy"].base_model.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward (called with the adapters off by `__call__`)."""
        return self.__dict__["_policy"].base_model.model(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.__dict__["_policy"].disable_adapter():
            return super().__call__(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's generation (adapters off)."""
        with self.__dict__["_policy"].disable_adapter():
            return self.__dict__["_policy"].base_model.model.generate(*args, **kwargs)


def reference_model(lora_model: nn.Module) -> ReferenceModel:
    """The base of `lora_model` as a reference model: `DPOTrainer(model=lora_model,
    ref_model=reference_model(lora_model), ...)` trains against the adapter switched off,
    with no second copy of the base."""
    return ReferenceModel(lora_model)
