"""The batching engine: continuous batching of requests for one base model and many adapters.

Each request is prefilled alone (batch 1, no padding, its own adapter), so its prompt's keys and
values are exactly those of a solo run. Decoding then runs every active request together: one
forward per step over a batch whose rows may use different adapters (packed adapters, see
`packed.py`, or the core's grouped rows), with a left-padded KV cache, per-row position ids and a
mask that hides the padding. New requests join between steps; finished or cancelled ones leave
and free their slot. Batched and solo decode steps differ only in floating-point rounding (about
1e-6 of the logits in float32, the default), and the tests check greedy tokens match exactly.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorakit.serve.decode import (
    FINISH_LENGTH,
    FINISH_STOP,
    SamplingParams,
    TextStream,
    sample_token,
)
from lorakit.serve.kvcache import BatchCache
from lorakit.serve.registry import BASE_ROW, ModelHost

log = logging.getLogger("lorakit.serve")

FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass
class Event:
    """What the engine tells a request's owner after each step: new text, maybe the end."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


Sink = Callable[[Event], None]


@dataclass(eq=False)
class Sequence:
    """One request's state inside the engine."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Sink
    stream: TextStream
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    cancelled: bool = False
    finished: bool = False

    @property
    def length(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)


class Engine:
    """Owns the model's compute: a thread that admits, prefills and decodes requests in steps."""

    def __init__(
        self,
        host: ModelHost,
        tokenizer,
        *,
        max_context: int,
        max_batch: int = 8,
        eos_token_ids: set[int] | None = None,
        threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.host, self.tokenizer = host, tokenizer
        self.max_context, self.max_batch = max_context, max_batch
        self.eos_token_ids = set(eos_token_ids or ())
        self.threads = threads  # torch CPU threads for the engine thread; None: torch's default
        self.steps = 0  # decode steps run so far (for tests and benchmarks)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._batch = BatchCache()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread; requests still running end with finish reason 'cancelled'."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, sink: Sink
    ) -> Sequence:
        """Queue a request; `sink` is called from the engine thread with each Event."""
        seq = Sequence(
            prompt_ids=list(prompt_ids),
            adapter=adapter,
            params=params,
            sink=sink,
            stream=TextStream(self.tokenizer, params.stop),
            generator=params.generator(),
        )
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request; its slot is freed before the next step."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify_all()

    def uses(self, adapter: str) -> int:
        """How many queued or running requests use this adapter."""
        with self._wake:
            seqs = list(self._waiting) + self._active
        return sum(1 for seq in seqs if seq.adapter == adapter and not seq.finished)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts."""
        with self._wake:
            return len(self._active), len(self._waiting)

    def generate(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, timeout: float
    ) -> Event:
        """Run one request to the end and return all its text at once (blocking)."""
        done = threading.Event()
        parts: list[Event] = []

        def sink(event: Event) -> None:
            parts.append(event)
            if event.finish_reason is not None:
                done.set()

        seq = self.submit(prompt_ids, adapter, params, sink)
        if not done.wait(timeout):
            self.cancel(seq)
            raise TimeoutError(f"generation did not finish within {timeout} s")
        last = parts[-1]
        text = "".join(part.text for part in parts)
        tokens = [t for part in parts for t in part.token_ids]
        return Event(
            text=text, token_ids=tokens, finish_reason=last.finish_reason, error=last.error
        )

    # ---- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._admit()
                    self._drop_done()
                    if self._active:
                        self._decode_step()
                        self._drop_done()
            except Exception as error:  # a failed step ends its requests, never the server
                log.exception("engine step failed")
                self._fail_active(f"{type(error).__name__}: {error}")
        self._fail_active(None)

    def _admit(self) -> None:
        """Prefill waiting requests while there are free slots."""
        while len(self._active) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            if seq.cancelled:
                self._finish(seq, FINISH_CANCELLED)
                continue
            try:
                logits, cache = self._prefill(seq)
            except Exception as error:
                log.exception("prefill failed")
                self._finish(seq, FINISH_ERROR, f"{type(error).__name__}: {error}")
                continue
            if not self._accept(seq, logits):
                self._batch.add(cache)
                with self._wake:
                    self._active.append(seq)

    def _prefill(self, seq: Sequence) -> tuple[torch.Tensor, object]:
        from transformers import DynamicCache

        with self.host.lock:
            if seq.adapter is not None and seq.adapter not in self.host.adapters:
                raise LookupError(f"adapter `{seq.adapter}` was unloaded")
            model = self.host.forward_model
            input_ids = torch.tensor([seq.prompt_ids], device=self.host.device)
            with self.host.mixed([seq.adapter or BASE_ROW]):
                out = model(
                    input_ids=input_ids,
                    past_key_values=DynamicCache(),
                    use_cache=True,
                    logits_to_keep=1,  # only the last position's logits are needed
                )
        return out.logits[0, -1].float(), out.past_key_values

    def _decode_step(self) -> None:
        rows = self._active
        device = self.host.device
        input_ids = torch.tensor([[seq.output_ids[-1]] for seq in rows], device=device)
        positions = torch.tensor([[seq.length - 1] for seq in rows], device=device)
        mask = self._batch.step_mask()
        with self.host.lock, self.host.decode_rows([seq.adapter or BASE_ROW for seq in rows]):
            out = self.host.forward_model(
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=mask,
                past_key_values=self._batch.cache,
                use_cache=True,
            )
        self._batch.cache = out.past_key_values
        self.steps += 1
        logits = out.logits[:, -1].float()
        for row, seq in enumerate(rows):
            if not seq.cancelled:
                self._accept(seq, logits[row])

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Sample the next token, send the text; return True when the request is finished."""
        token = sample_token(logits, seq.params, seq.generator)
        seq.output_ids.append(token)
        if token in self.eos_token_ids:
            return self._finish(seq, FINISH_STOP, token=token, flush=True)
        delta, stopped = seq.stream.push(token)
        if stopped:
            return self._finish(seq, FINISH_STOP, text=delta, token=token)
        if len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_context:
            return self._finish(seq, FINISH_LENGTH, text=delta + seq.stream.flush(), token=token)
        _send(seq, Event(text=delta, token_ids=[token]))
        return False

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        error: str | None = None,
        *,
        text: str = "",
        token: int | None = None,
        flush: bool = False,
    ) -> bool:
        if seq.finished:
            return True
        seq.finished = True
        if flush:
            text += seq.stream.flush()
        tokens = [] if token is None else [token]
        _send(seq, Event(text=text, token_ids=tokens, finish_reason=reason, error=error))
        return True

    def _drop_done(self) -> None:
        """Remove finished and cancelled rows from the batch, freeing their slots."""
        cancelled = [seq for seq in self._active if seq.cancelled and not seq.finished]
        keep = [i for i, seq in enumerate(self._active) if not (seq.finished or seq.cancelled)]
        if len(keep) != len(self._active):
            self._batch.keep(keep)
            with self._wake:
                self._active = [self._active[i] for i in keep]
        for seq in cancelled:  # told only once the slot is free
            self._finish(seq, FINISH_CANCELLED)

    def _fail_active(self, error: str | None) -> None:
        with self._wake:
            failed = self._active + (list(self._waiting) if error is None else [])
            self._active = []
            if error is None:
                self._waiting.clear()
        self._batch = BatchCache()
        for seq in failed:
            self._finish(seq, FINISH_CANCELLED if error is None else FINISH_ERROR, error)


def _send(seq: Sequence, event: Event) -> None:
    """Hand an event to the request's owner; a failing sink cancels only that request."""
    try:
        seq.sink(event)
    except Exception:
        log.exception("a request's sink failed; cancelling the request")
        seq.cancelled = True
