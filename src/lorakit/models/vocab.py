"""New tokens: added to a tokenizer, with the embedding (and an untied or tied head) grown to
hold them; an adapter folder's own tokenizer, and a base grown to fit it.

A run that adds tokens (`model.add_tokens`) saves its tokenizer next to the adapter; loading
that adapter reads the tokenizer from the folder and grows the base to its length
(`fit_vocabulary`), which is where the adapter's token rows live.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def rows_of(model: Any) -> int:
    """The input embedding's row count (the model's vocabulary size)."""
    return int(model.get_input_embeddings().weight.shape[0])


def fit_vocabulary(model: Any, tokenizer: Any) -> bool:
    """Grow `model`'s embedding (and head) to `len(tokenizer)` rows when it has fewer; a larger
    embedding is kept (peft's `max(len(tokenizer), rows)`). Returns whether it grew."""
    if len(tokenizer) <= rows_of(model):
        return False
    model.resize_token_embeddings(len(tokenizer))
    return True


def add_tokens(model: Any, tokenizer: Any, tokens: list[str], special: bool = True) -> list[int]:
    """Add `tokens` to `tokenizer` (as special tokens: never split, one id each), grow the
    model to fit, and return their ids. A token already in the vocabulary keeps its id."""
    if len(set(tokens)) != len(tokens):
        twice = sorted({t for t in tokens if tokens.count(t) > 1})
        raise ConfigError(f"model.add_tokens: {twice} listed twice; list each token once")
    if special:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": tokens}, replace_extra_special_tokens=False
        )
    else:
        tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    split = [t for t, i in zip(tokens, ids, strict=True) if len(tokenizer.encode(t)) != 1]
    if split and special:
        raise ConfigError(f"model.add_tokens: {split} do not encode as one token each")
    fit_vocabulary(model, tokenizer)
    return list(ids)


def has_tokenizer(folder: str | Path) -> bool:
    """Whether an adapter folder holds a tokenizer (saved by a run that added tokens)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def adapter_tokenizer(folders: Iterable[str | Path]) -> Any | None:
    """The tokenizer saved in these adapter folders (None when none has one); folders whose
    tokenizers differ in vocabulary cannot share one base and are refused."""
    found = [(Path(f), _load(Path(f))) for f in folders if has_tokenizer(f)]
    if not found:
        return None
    first_folder, first = found[0]
    for folder, other in found[1:]:
        if other.get_vocab() != first.get_vocab():
            raise ConfigError(
                f"adapters {first_folder} and {folder} carry different tokenizers (added tokens); "
                "one base model can serve only one vocabulary: load them separately"
            )
    return first


def _load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{folder}: its tokenizer files cannot be read ({error})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
