"""What each consumer of an adapter folder will do with it (`lorakit inspect --for`): vLLM,
llama.cpp (and Ollama, LM Studio, which run it) and older peft versions.

The rules are data (`RULES`): which consumer, what it refuses or gets wrong, the fix, and where
the behaviour comes from. Each rule's test reads only the adapter's config and tensor names, so
the check needs no base model. `findings(config, keys)` returns the rules an adapter breaks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONSUMERS = ("vllm", "llama.cpp", "peft")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks
_EXPERT = re.compile(r"\.experts\.\d+\.")
_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings)\.lora_embedding_[AB]")

# adapter_config.json keys -> the first peft release that reads them. peft releases before
# 0.14 refuse a config with a key they do not know ("got an unexpected keyword argument");
# later ones drop an unknown key with a warning, which is harmless only at its default value.
PEFT_KEYS = {
    "use_rslora": "0.7.0",
    "use_dora": "0.9.0",
    "layer_replication": "0.10.0",
    "exclude_modules": "0.14.0",
    "lora_bias": "0.14.0",
    "eva_config": "0.14.0",
    "corda_config": "0.15.0",
    "trainable_token_indices": "0.15.0",
    "target_parameters": "0.17.0",
}
_PEFT_TOLERANT = "0.14.0"


@dataclass(frozen=True)
class Finding:
    """One thing a consumer will do with the adapter."""

    consumer: str
    level: str  # "refuses" (will not load) or "differs" (loads, computes something else)
    what: str
    fix: str
    source: str


@dataclass(frozen=True)
class Facts:
    """What the rules read: the LoraConfig, the tensor key names, the raw adapter_config.json."""

    config: Any
    keys: list[str]
    raw: dict


@dataclass(frozen=True)
class Rule:
    consumer: str
    level: str
    test: Callable[[Facts], str | None]  # -> what the consumer does, or None
    fix: str
    source: str


def _rank(facts: Facts) -> str | None:
    config = facts.config
    ranks = [config.r, *config.rank_pattern.values()]
    top = max(ranks)
    if top <= 16:
        return None
    need = next((r for r in VLLM_RANKS if r >= top), None)
    hint = f"start vLLM with --max-lora-rank {need}" if need else "no vLLM rank holds it"
    return f"rank {top} > vLLM's default max_lora_rank 16 ({hint})"


def _dora(facts: Facts) -> str | None:
    config = facts.config
    return "DoRA adapter (use_dora)" if config.use_dora else None


def _bias(facts: Facts) -> str | None:
    config = facts.config
    return f"trained biases (bias={config.bias!r})" if config.bias != "none" else None


def _lora_bias(facts: Facts) -> str | None:
    biased = getattr(facts.config, "lora_bias", False) or any(
        k.endswith(".lora_B.bias") for k in facts.keys
    )
    return "a bias on lora_B (lora_bias=True)" if biased else None


def _saved(facts: Facts) -> str | None:
    config = facts.config
    return f"modules_to_save={config.modules_to_save}" if config.modules_to_save else None


def _patterns(facts: Facts) -> str | None:
    config = facts.config
    used = [n for n in ("rank_pattern", "alpha_pattern") if getattr(config, n)]
    return f"{' and '.join(used)} set: per-module scales" if used else None


def _rslora_or_patterns(facts: Facts) -> str | None:
    config = facts.config
    found = (["use_rslora"] if config.use_rslora else []) + (
        [n for n in ("rank_pattern", "alpha_pattern") if getattr(config, n)]
    )
    return f"{', '.join(found)}: scale is not lora_alpha / r" if found else None


def _embedding(facts: Facts) -> str | None:
    keys = facts.keys
    hits = sorted({k.split(".lora_embedding")[0] for k in keys if _EMBEDDING.search(k)})
    return f"adapter on the embedding ({', '.join(hits)})" if hits else None


def _experts(facts: Facts) -> str | None:
    keys = facts.keys
    hits = sorted({_EXPERT.search(k).group(0).strip(".") for k in keys if _EXPERT.search(k)})
    return f"adapters on per-expert modules ({len(hits)} experts, e.g. {hits[0]})" if hits else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _unknown_keys(facts: Facts) -> str | None:
    used = sorted(k for k in PEFT_KEYS if k in facts.raw)
    if not used:
        return None
    return (
        f"peft < {_PEFT_TOLERANT} fails on keys it does not know ({', '.join(used)}) with "
        "'unexpected keyword argument'"
    )


def _newer_values(facts: Facts) -> str | None:
    late = {
        k: v
        for k, v in PEFT_KEYS.items()
        if facts.raw.get(k) and _version(v) > _version(_PEFT_TOLERANT)
    }
    if not late:
        return None
    shown = ", ".join(f"{k}={facts.raw[k]!r} (peft >= {v})" for k, v in sorted(late.items()))
    return f"peft versions before these drop them with a warning and compute without: {shown}"


_VLLM_HELPER = "vllm/lora/peft_helper.py (PEFTHelper._validate_features)"
_LLAMA_CPP = "llama.cpp convert_lora_to_gguf.py and src/llama-adapter.cpp"
RULES = [
    Rule(
        "vllm",
        "refuses",
        _rank,
        f"pass --max-lora-rank (vLLM's allowed values: {', '.join(map(str, VLLM_RANKS))})",
        "vllm/config/lora.py: max_lora_rank = 16",
    ),
    Rule(
        "vllm",
        "refuses",
        _dora,
        "merge it (lorakit merge / lorakit export) and serve the merged model",
        f"{_VLLM_HELPER}: 'vLLM does not yet support DoRA.'",
    ),
    Rule(
        "vllm",
        "refuses",
        _bias,
        "train with bias='none', or merge it",
        "vLLM's LoRA loader: 'Adapter bias is not supported.'",
    ),
    Rule(
        "vllm",
        "refuses",
        _lora_bias,
        "start vLLM with --enable-lora-bias (the releases that have it), or merge it",
        "vllm/lora/models.py: a lora_B bias loads only with --enable-lora-bias "
        "(LoRAConfig.bias_enabled)",
    ),
    Rule(
        "vllm",
        "refuses",
        _saved,
        "merge it (whole trained modules cannot be served as LoRA)",
        f"{_VLLM_HELPER}: 'vLLM only supports modules_to_save being None.'",
    ),
    Rule(
        "vllm",
        "differs",
        _patterns,
        "merge it, or train without rank_pattern/alpha_pattern",
        f"{_VLLM_HELPER}: one vllm_lora_scaling_factor = lora_alpha / r for every module",
    ),
    Rule(
        "vllm",
        "refuses",
        _experts,
        "check that your vLLM version supports LoRA on this "
        "model's fused MoE layers, else merge it",
        "vllm/lora: experts are fused MoE kernels; "
        "per-expert LoRA loads only where a model's fused-MoE layer has LoRA support",
    ),
    Rule(
        "llama.cpp",
        "refuses",
        _dora,
        "lorakit export BASE OUT.gguf --adapter DIR (merged)",
        f"{_LLAMA_CPP}: LoRA files hold A and B only; the DoRA magnitude is refused",
    ),
    Rule(
        "llama.cpp",
        "differs",
        _rslora_or_patterns,
        "lorakit export BASE OUT.gguf --adapter "
        "DIR --adapter-only (folds every module's scale into B)",
        "llama.cpp convert_lora_to_gguf.py reads only lora_alpha; llama-adapter.h scales "
        "every tensor by alpha / rank",
    ),
    Rule(
        "llama.cpp",
        "refuses",
        _embedding,
        "export merged (lorakit export ... --adapter DIR)",
        f"{_LLAMA_CPP}: a tied embedding / output layer has one tensor, the adapter's lm_head "
        "update has nowhere to go",
    ),
    Rule(
        "llama.cpp",
        "refuses",
        _bias,
        "train with bias='none', or export merged",
        f"{_LLAMA_CPP}: LoRA files hold no biases",
    ),
    Rule(
        "llama.cpp",
        "refuses",
        _lora_bias,
        "export merged (lorakit export ... --adapter DIR)",
        f"{_LLAMA_CPP}: LoRA files hold A and B only; a lora_B bias has no tensor",
    ),
    Rule("llama.cpp", "refuses", _saved, "export merged", f"{_LLAMA_CPP}: only lora_a / lora_b"),
    Rule(
        "llama.cpp",
        "refuses",
        _experts,
        "export merged",
        "llama.cpp stores each layer's experts "
        "as one 3-D tensor (ffn_*_exps); a per-expert 2-D LoRA has no tensor to apply to",
    ),
    Rule(
        "peft",
        "refuses",
        _unknown_keys,
        "upgrade peft (pip install -U peft), or delete the keys that hold their default value",
        "peft/config.py: _check_and_remove_unused_kwargs "
        "(unknown keys dropped since 0.14); peft release notes for each key",
    ),
    Rule(
        "peft",
        "differs",
        _newer_values,
        "require the peft version named (peft>=X in your requirements)",
        "peft release notes for each key; peft/config.py drops unknown keys",
    ),
    Rule(
        "peft",
        "refuses",
        _experts,
        "load it with transformers < 5 and the peft of that time, "
        "or retrain with target_parameters on the fused expert weights (peft >= 0.17)",
        "transformers 5 stores MoE experts as fused 3-D parameters, not per-expert modules",
    ),
]


def findings(facts: Facts, consumer: str | None = None) -> list[Finding]:
    """The rules this adapter breaks, for one consumer or all."""
    if consumer is not None and consumer not in CONSUMERS:
        raise ValueError(f"--for {consumer!r}: expected one of {', '.join(CONSUMERS)}")
    out = []
    for rule in RULES:
        if consumer not in (None, rule.consumer):
            continue
        what = rule.test(facts)
        if what:
            out.append(Finding(rule.consumer, rule.level, what, rule.fix, rule.source))
    return out
