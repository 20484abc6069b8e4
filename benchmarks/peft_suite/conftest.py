"""Runs peft's own LoRA tests against lorakit: peft's public LoRA names are swapped for lorakit's
before the test modules import them. Test bodies are peft's, unedited (see run.sh).

Only LoRA cases run: in test_custom_models.py the cases built from `LoraConfig` (peft's other
methods — LoHa, VeRA, BOFT, ... — are not lorakit's subject), in test_initialization.py the LoRA
classes and the method-independent ones, and the LoRA cases of test_config.py / test_other.py.

Each case's outcome goes to `results.jsonl` beside this file: "passed", "refused" (lorakit
raised an error saying the feature is not supported by lorakit), "skipped", or "failed" with the
first line of the error, so that failures can be counted by cause. `PEFT_SUITE_SAMPLE=N` keeps
one LoRA case in N (chosen by a hash of the test id, the same cases every run) for a quick look.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import peft
import peft.optimizers
import peft.tuners.lora
import pytest

import lorakit
import lorakit.tuners.lora

for _name in (
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "get_peft_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "TaskType",
    "prepare_model_for_kbit_training",
    "inject_adapter_in_model",
    "create_loraplus_optimizer",
):
    setattr(peft, _name, getattr(lorakit, _name))
peft.optimizers.create_loraplus_optimizer = lorakit.create_loraplus_optimizer
# the layer classes peft's docs tell users to subclass for a custom layer type
for _name in ("LoraLayer", "Linear", "Embedding"):
    setattr(peft.tuners.lora, _name, getattr(lorakit.tuners.lora, _name))

RESULTS = Path(
    os.environ.get("PEFT_SUITE_RESULTS", Path(__file__).resolve().parent / "results.jsonl")
)
# test_initialization.py classes that are about LoRA or about no method in particular
INIT_CLASSES = {
    "TestLoraInitialization",
    "TestScaling",
    "TestLowCpuMemUsage",
    "TestLoadPeftKeyMapping",
    "TestNamingConflictWarning",
    "TestWeightTying",
    "TestCustomModelConfigWarning",
    "TestNoInfiniteRecursionDeepspeed",
    "TestLoadAdapterOfflineMode",
}
REFUSED = re.compile(r"not supported by lorakit", re.IGNORECASE)


def _is_lora_case(item: pytest.Item) -> bool:
    path = item.path.name
    cls = item.cls.__name__ if item.cls else ""
    if path == "test_custom_models.py":
        return "-LoraConfig-" in item.nodeid
    if path == "test_initialization.py":
        return cls in INIT_CLASSES or (not cls and "lora" in item.name.lower())
    if path == "test_config.py":
        return re.search(r"[\[-]LoraConfig\b", item.nodeid) is not None
    return True  # test_other.py: LoRA-based throughout


def pytest_collection_modifyitems(config, items):
    sample = int(os.environ.get("PEFT_SUITE_SAMPLE", "1"))
    keep = [i for i in items if _is_lora_case(i) and zlib.crc32(i.nodeid.encode()) % sample == 0]
    config.hook.pytest_deselected(items=[i for i in items if i not in set(keep)])
    items[:] = keep
    RESULTS.write_text("")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            kind, why = "passed", ""
        elif report.skipped:
            kind, why = "skipped", _skip_reason(report.longrepr)
        else:
            text = str(call.excinfo.value) if call.excinfo else str(report.longrepr)
            exc = call.excinfo.typename if call.excinfo else "?"
            first = next((ln for ln in text.splitlines() if ln.strip()), "")[:300]
            kind = "refused" if REFUSED.search(text) else "failed"
            why = f"{exc}: {first}"
        with RESULTS.open("a") as f:
            f.write(json.dumps({"id": item.nodeid, "kind": kind, "why": why}) + "\n")


def _skip_reason(longrepr) -> str:
    """A skip's reason: pytest gives (path, line, reason) for pytest.skip, a repr otherwise."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr).splitlines()[-1] if longrepr else ""
