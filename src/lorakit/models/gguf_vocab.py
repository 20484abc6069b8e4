"""A Hugging Face tokenizer as GGUF metadata: the tokens, their types, the merges, the
pre-tokenizer's llama.cpp name, the special ids and the chat template.

Byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen) are written; llama.cpp splits text
before BPE with a regular expression it picks by name (`tokenizer.ggml.pre`), so the name is
chosen from the tokenizer's own pre-tokenizer and a pre-tokenizer without a known llama.cpp
name is refused rather than guessed. SentencePiece tokenizers are refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ModelError

_DIGIT_BYTELEVEL = "digits+bytelevel"


def _known_splits() -> dict[str, str]:
    """Split regular expressions -> llama.cpp pre-tokenizer names (Qwen's from transformers;
    Llama 3's differs from it only in grouping up to three digits)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as qwen2

    return {qwen2: "qwen2", qwen2.replace(r"\p{N}|", r"\p{N}{1,3}|"): "llama-bpe"}


@dataclass
class VocabFields:
    """What `write_vocab` puts in the file."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            f"export to GGUF: tokenizer {type(tokenizer).__name__} has no fast (tokenizers) "
            "backend; save it as tokenizer.json first (AutoTokenizer.from_pretrained(..., "
            "use_fast=True).save_pretrained(...))"
        )
    return json.loads(backend.to_str())


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`; a ModelError if it has none."""
    kinds = [p["type"] for p in (pre or {}).get("pretokenizers", [pre] if pre else [])]
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {}).get("Regex")
        name = _known_splits().get(pattern)
        if name:
            return name
    raise ModelError(
        f"export to GGUF: the tokenizer's pre-tokenizer {json.dumps(pre)[:300]} has no known "
        "llama.cpp name (known: GPT-2's byte-level regex, SmolLM's digits, Llama 3's and "
        "Qwen's split expressions); llama.cpp would split text differently, so it is refused"
    )


def vocab_fields(tokenizer: Any, vocab_size: int) -> VocabFields:
    """The tokenizer's GGUF fields, padded to the model's `vocab_size` with unused tokens."""
    import gguf

    data = _tokenizer_json(tokenizer)
    model = data.get("model", {})
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ModelError(
            f"export to GGUF: tokenizer model {model.get('type')} (byte_fallback="
            f"{model.get('byte_fallback', False)}, decoder {decoder}) is not supported; lorakit "
            "exports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen), not SentencePiece"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ModelError(
            f"export to GGUF: the tokenizer has {len(by_id)} tokens but the model's vocab_size "
            f"is {vocab_size}; give the tokenizer that belongs to this model"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [
        m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
        for m in model.get("merges", [])
    ]
    special = {
        kind: getattr(tokenizer, f"{kind}_token_id")
        for kind in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{kind}_token_id", None) is not None
    }
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return VocabFields(
        tokens,
        [int(t) for t in types],
        merges,
        pre_tokenizer_name(data.get("pre_tokenizer")),
        special,
        add_bos=len(full) > len(plain) and full[0] == special.get("bos"),
        add_eos=len(full) > len(plain) and full[-1] == special.get("eos"),
    )


def write_vocab(writer: Any, fields: VocabFields, chat_template: str | None) -> None:
    """Add the tokenizer fields (and the chat template, if any) to a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields.pre)
    writer.add_token_list(fields.tokens)
    writer.add_token_types(fields.types)
    writer.add_token_merges(fields.merges)
    for kind, token_id in fields.special.items():
        getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(fields.add_bos)
    writer.add_add_eos_token(fields.add_eos)
    if chat_template:
        writer.add_chat_template(chat_template)
