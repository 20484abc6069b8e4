"""Base models and tokenizers: local folders, hub ids and the built-in alias, optionally quantized
while loading."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lorakit.errors import ModelError, closest
from lorakit.models.builtin import BUILTIN_ALIASES, BUILTIN_MODEL, ensure_builtin_model

logger = logging.getLogger("lorakit")

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


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
    add_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens to add to the tokenizer (e.g. ['<|tool|>']); the embedding (and "
        "head) grow to hold them, a LoRA run trains just their rows (trainable_token_indices) "
        "and saves the tokenizer next to the adapter.",
    )
    add_tokens_special: bool = Field(
        True, description="Add model.add_tokens as special tokens (never split, one id each)."
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
    its weight is read (`lorakit.quant.load`), so the float model is never held whole.
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
    with _quiet_loading(path):
        if quantization is None:
            model = _from_pretrained(AutoModelForCausalLM, path, **kwargs).to(device)
        else:
            compute = getattr(torch, compute_dtype) if compute_dtype else None
            options = {
                "method": quantization,
                "double_quant": double_quant,
                "compute_dtype": compute,
            }
            model = _load_quantized(path, kwargs, device, skip, options)
    if name_or_path.lower() in BUILTIN_ALIASES:
        # what an adapter's base_model_name_or_path records: the alias, not this machine's cache
        model.config.name_or_path = BUILTIN_MODEL
    return model


@contextlib.contextmanager
def _quiet_loading(path: str):
    """No per-tensor "Loading weights" bar for a local folder (a download keeps its bars)."""
    from transformers.utils import logging as hf_logging

    quiet = Path(path).is_dir() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


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

    from lorakit.quant.layer import DEFAULT_SKIP, check_skip, quantize_model
    from lorakit.quant.load import StreamingUnsupported, load_quantized

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


def context_length(model: Any, tokenizer: Any = None) -> int | None:
    """Tokens one sequence may hold (the model's position limit, else the tokenizer's), or None
    when neither says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None
