"""Base models and tokenizers: a local Hugging Face folder, a hub id, or the built-in offline
model `smollm2-135m-instruct`; chat templates."""

from lorakit.models.builtin import (
    BUILTIN_ALIASES,
    BUILTIN_INSTALL,
    BUILTIN_MODEL,
    ensure_builtin_model,
    lorakit_home,
)
from lorakit.models.loading import (
    ModelConfig,
    context_length,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)
from lorakit.models.templates import (
    PLAIN_TEMPLATE,
    RAW_TEMPLATE,
    chat_template_of,
    prompt_template_of,
)

__all__ = [
    "BUILTIN_ALIASES",
    "BUILTIN_INSTALL",
    "BUILTIN_MODEL",
    "PLAIN_TEMPLATE",
    "RAW_TEMPLATE",
    "ModelConfig",
    "chat_template_of",
    "context_length",
    "ensure_builtin_model",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "lorakit_home",
    "prompt_template_of",
    "resolve_model_path",
]
