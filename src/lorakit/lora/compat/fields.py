"""peft's tables for `LoraConfig`: the fields lorakit refuses or only keeps, the task types,
and the peft-only names a `LoraConfig` answers to (`PeftConfigNames`).

`lora/config.py` reads these tables; they say where lorakit's config differs from peft's.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any


class PeftType(str, enum.Enum):
    """peft's method names; lorakit has one, LoRA (`LoraConfig.peft_type`)."""

    LORA = "LORA"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """peft's task types; `LoraConfig(task_type=...)` takes these or their strings."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


TASK_TYPES = tuple(t.value for t in TaskType)  # in peft's order

# peft fields lorakit does not implement, with their defaults. Left at these values they change
# nothing; any other value asks for a feature lorakit lacks, so it is refused (when a config is
# made, and when an adapter is loaded), never silently dropped.
UNSUPPORTED_FEATURES: dict[str, Any] = {
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "eva_config": None,
    "corda_config": None,
    "astra_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "megatron_config": None,
}
# what to use instead, where lorakit has something
INSTEAD = {
    "megatron_config": "lorakit shards with FSDP (train.distributed), not Megatron",
}
# peft fields that only describe how the adapter was made or initialised: kept, not used.
DESCRIPTIVE = frozenset(
    {
        "peft_type",
        "auto_mapping",
        "peft_version",
        "revision",
        "megatron_core",
        "qalora_group_size",
        "runtime_config",
    }
)
PEFT_INIT = ("eva", "corda", "lora_ga", "orthogonal", "mica")  # peft's, not lorakit's


class PeftConfigNames:
    """What a peft `PeftConfig` answers that only peft programs ask; `LoraConfig` inherits it."""

    extra: dict[str, Any]

    @property
    def peft_type(self) -> PeftType:
        """Always `PeftType.LORA` (equal to the string 'LORA' and to peft's `PeftType.LORA`)."""
        return PeftType.LORA

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    @property
    def peft_version(self) -> str | None:
        """The peft version an adapter's file names, where it names one."""
        return self.extra.get("peft_version")

    @classmethod
    def from_json_file(cls, path_json_file: str | Path) -> dict[str, Any]:
        """The content of an `adapter_config.json` file, as a dict (peft's meaning); a
        `runtime_config` entry is dropped (it describes one run, not the adapter)."""
        data = json.loads(Path(path_json_file).read_text())
        data.pop("runtime_config", None)
        return data
