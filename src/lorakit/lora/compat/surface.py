"""`PeftSurface`: the part of `LoraModel` that only peft programs and Hugging Face `Trainer` use,
and `inject_adapter_in_model`, peft's functional entry point.

`LoraModel` inherits `PeftSurface` (and `hf_face.HFFace`), so a `LoraModel` offers all of it;
`lora/model.py` holds what lorakit itself needs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lorakit.errors import AdapterError
from lorakit.files import current_umask
from lorakit.lora.compat import health
from lorakit.lora.compat.keywords import check_peft_kwargs
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import add_adapter_layers, mark_trainable, resolve_targets

# Hugging Face `Trainer` resumes and loads the best checkpoint of a model that is not a peft
# `PeftModel` from this file only (`model.load_state_dict(load_file(...), strict=False)`), so a
# checkpoint written through `Trainer` holds the trainable tensors here too, next to the adapter.
TRAINER_WEIGHTS = "model.safetensors"

# peft's task types whose head is trained in full (a `modules_to_save` copy) with the adapter.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


class PeftSurface:
    """`Trainer`'s checkpoint hooks and peft's refusals, mixed into `LoraModel`."""

    def healthcheck(self, min_trainable_params: int = 1, max_trainable_params_percent=50):
        """The adapter state before training, with peft's report keys and finding codes."""
        return health.healthcheck(self, min_trainable_params, max_trainable_params_percent)

    def print_healthcheck(self, sink=print, **kwargs: Any) -> None:
        """`healthcheck()` as text, printed through `sink`."""
        health.print_healthcheck(self, sink, **kwargs)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the wrapped model's `push_to_hub` would upload the whole model."""
        raise AdapterError(
            "LoraModel.push_to_hub is not supported by lorakit (lorakit works offline); write the "
            "adapter with save_pretrained(dir) and upload that folder with huggingface_hub's "
            "upload_folder"
        )

    def print_trainable_parameters(self) -> None:
        """Print peft's line `trainable params: X || all params: Y || trainable%: Z`."""
        trainable, all_params = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {all_params:,d} || "
            f"trainable%: {100 * trainable / all_params:.4f}"
        )

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def _save_trainer_weights(self, save_directory: str | Path) -> None:
        """The trainable tensors under their in-memory names, as `TRAINER_WEIGHTS`."""
        trainable = {n: p.detach().contiguous().cpu() for n, p in self._trainable()}
        path = Path(save_directory) / TRAINER_WEIGHTS
        save_file(trainable, str(path), {"format": "pt"})
        path.chmod(0o666 & ~current_umask())  # safetensors writes 0600; the adapter files beside

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """State-dict keys `model.safetensors` leaves out: everything but the trainable tensors.

        `Trainer` compares them with the keys missing after it loads that file and, when they
        agree, does not warn about the frozen base weights it did not find there.
        """
        trainable = {n for n, _ in self._trainable()}
        return [k for k in self.state_dict(keep_vars=True) if k not in trainable]

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """The wrapped model's `tie_weights`, where it has one."""
        tie = getattr(self.base_model.model, "tie_weights", None)
        if callable(tie):
            tie(*args, **kwargs)


def peft_model_config(model: nn.Module, config: LoraConfig, peft_kwargs: dict) -> LoraConfig:
    """`get_peft_model`'s config, as peft makes it: the task type's head (SEQ_CLS / TOKEN_CLS:
    `classifier` / `score`; QUESTION_ANS: `qa_outputs`, the ones the model has) added to
    `modules_to_save`, and `revision` kept in the config. Checks the peft keywords."""
    check_peft_kwargs("get_peft_model", peft_kwargs)
    heads = _TASK_HEADS.get(str(getattr(config.task_type, "value", config.task_type)), ())
    present = [h for h in heads if any(n.split(".")[-1] == h for n, _ in model.named_modules())]
    if present:
        config = copy.deepcopy(config)
        config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + present))
    if peft_kwargs.get("revision") is not None:
        config = copy.deepcopy(config)
        config.extra["revision"] = peft_kwargs["revision"]
    return config


def inject_adapter_in_model(
    peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default", **peft_kwargs: Any
) -> nn.Module:
    """peft's `inject_adapter_in_model`: `inject_lora` with a copy of `peft_config` (a
    'preset' target resolved); wraps `model` in place, freezes the rest and returns it."""
    check_peft_kwargs("inject_adapter_in_model", peft_kwargs)
    config = copy.deepcopy(peft_config)  # keeps a registered layer mapping (registry)
    config.target_modules = resolve_targets(model, peft_config)
    add_adapter_layers(model, config, adapter_name)
    mark_trainable(model, [adapter_name], config.bias)
    return model


__all__ = ["TRAINER_WEIGHTS", "PeftSurface", "inject_adapter_in_model", "peft_model_config"]
