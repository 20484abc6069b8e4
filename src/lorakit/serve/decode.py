"""From logits to tokens (greedy, temperature, top-k, top-p) and from tokens to text (stops)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import ConfigError

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """How one request (or one `lorakit generate` / `chat` reply) picks its tokens; temperature
    0 means greedy, top_k 0 keeps every token. Out-of-range values raise ConfigError naming the
    field. `repetition_penalty` is for transformers' `generate` (the CLI); the server's engine
    does not apply one."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0: off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1: off)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)}: expected {expected}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate`."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.temperature == 0:
            return {**kwargs, "do_sample": False}
        return {
            **kwargs,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }

    def generator(self) -> torch.Generator | None:
        """A private RNG for this request (seeded when `seed` is set); None for greedy."""
        if self.temperature == 0:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def rows_finite(logits: torch.Tensor) -> list[bool]:
    """Whether each row of (rows, vocab) logits is all finite."""
    finite = torch.isfinite(logits.sum(dim=1))  # a finite sum: every logit is finite (30x
    if not bool(finite.all()):  # faster than isfinite); a non-finite one, or an overflow:
        finite = torch.isfinite(logits).all(dim=1)  # look closer
    return finite.tolist()


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's first highest logit, as argmax picks it (max is faster on the CPU)."""
    return logits.max(dim=1).indices.tolist()


def is_greedy(params: SamplingParams, generator: torch.Generator | None) -> bool:
    """Whether the request takes the highest logit (temperature 0, or no generator)."""
    return params.temperature == 0 or generator is None


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row of logits, shape (vocab,)."""
    if is_greedy(params, generator):
        return int(torch.argmax(logits))
    # the best token scores 0 before dividing, so any temperature > 0, however small, gives
    # finite probabilities (a tiny one is greedy among the tied best tokens)
    logits = logits.float()
    scores = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < scores.numel():
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p
        outside = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(outside, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Text that could still become a stop string, or an unfinished UTF-8 character, is held back
    until the next token decides it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""
        self._sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text to send, whether a stop string was hit)."""
        self.token_ids.append(token_id)
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hit = self._first_stop(full)
        if hit is not None:
            delta = full[self._sent : hit]
            self.text = full[:hit]
            self._sent = hit
            return delta, True
        self.text = full
        end = len(full) - self._held_back(full)
        delta = full[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta, False

    def flush(self) -> str:
        """The text still held back, sent when generation ends without a stop string."""
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta

    def _first_stop(self, full: str) -> int | None:
        hits = [i for i in (full.find(s, self._sent) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        if full.endswith("\ufffd"):
            return 1
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(full) - self._sent), longest, -1):
                if full.endswith(stop[:size]):
                    longest = size
                    break
        return longest
