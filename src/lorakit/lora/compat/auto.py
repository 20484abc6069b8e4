"""`AutoPeftModelForCausalLM`: load an adapter folder together with the base model it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.errors import AdapterError
from lorakit.lora.config import LoraConfig
from lorakit.lora.model import LoraModel


class AutoPeftModelForCausalLM:
    """`from_pretrained(adapter_dir)`: the base from the adapter's `base_model_name_or_path`
    (with transformers' `AutoModelForCausalLM`), then the adapter attached to it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use AutoPeftModelForCausalLM.from_pretrained(adapter_dir)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        **kwargs: Any,
    ) -> LoraModel:
        """Keywords other than the adapter's go to `AutoModelForCausalLM.from_pretrained`
        (`dtype`, `device_map`, ...)."""
        from transformers import AutoModelForCausalLM

        directory = Path(pretrained_model_name_or_path)
        adapter_config = config or LoraConfig.from_pretrained(directory)
        base = adapter_config.base_model_name_or_path
        if not base:
            raise AdapterError(
                f"{directory}: adapter_config.json names no base_model_name_or_path; load the "
                "base yourself and use PeftModel.from_pretrained(base, folder)"
            )
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        return LoraModel.from_pretrained(
            model, directory, adapter_name, is_trainable, config=config
        )
