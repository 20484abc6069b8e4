"""The batching engine: continuous batching of requests for one base model and many adapters.

Requests that wait together are prefilled together: sorted by prompt length, cut into groups
whose left padding stays under a quarter of the group's tokens (and whose padded size stays under
`max_prefill_tokens`), each group one forward whose rows may use different adapters. Decoding
then runs every active request together: one forward per step over a batch whose rows may use
different adapters (packed adapters or grouped rows, see `lorakit.lora.rows`; on a mixture of
experts whose adapters reach the fused experts, one adapter per batch: `Engine._take`), with a
left-padded KV cache, per-row position ids and a mask that hides the padding. New requests join
between steps; finished or cancelled ones leave and free their slot. Batched and solo runs differ
only in floating-point rounding (about 1e-6 of the logits in float32, the default), and the tests
check greedy tokens match exactly.
"""

from __future__ import annotations

import collections
import inspect
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
    greedy_tokens,
    is_greedy,
    rows_finite,
    sample_token,
)
from lorakit.serve.kvcache import BatchCache
from lorakit.serve.registry import BASE_ROW, Lease, ModelHost

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
    lease: Lease | None = None  # the hold on its adapter, released when it finishes
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
        max_prefill_tokens: int = 4096,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.host, self.tokenizer = host, tokenizer
        self.max_context, self.max_batch = max_context, max_batch
        self.max_prefill_tokens = max_prefill_tokens  # padded tokens per prefill forward
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
        self,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        sink: Sink,
        lease: Lease | None = None,
    ) -> Sequence:
        """Queue a request; `sink` is called from the engine thread with each Event.

        The request holds its adapter until it finishes: `lease` (the caller's hold, handed
        over), else one taken here (LookupError when the adapter is not loaded).
        """
        if adapter is not None and lease is None:
            lease = self.host.acquire(adapter)
        seq = Sequence(
            prompt_ids=list(prompt_ids),
            adapter=adapter,
            params=params,
            sink=sink,
            stream=TextStream(self.tokenizer, params.stop),
            generator=params.generator(),
            lease=lease,
        )
        with self._wake:
            stopping = self._stopping
            if not stopping:
                self._waiting.append(seq)
                self._wake.notify_all()
        if stopping:
            self._finish(seq, FINISH_CANCELLED)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request; its slot is freed before the next step."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify_all()

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
        """Prefill waiting requests, in length-sorted groups, while there are free slots."""
        with self._wake:
            free = self.max_batch - len(self._active)
            taken = self._take(free)
        live = []
        for seq in taken:
            if seq.cancelled:
                self._finish(seq, FINISH_CANCELLED)
            else:
                live.append(seq)
        for group in prefill_groups(live, self.max_prefill_tokens):
            with self.host.lock:
                try:
                    logits, cache, mask = self._prefill(group)
                except Exception as error:
                    log.exception("prefill failed")
                    for seq in group:
                        self._finish(seq, FINISH_ERROR, f"{type(error).__name__}: {error}")
                    continue
            keep = [i for i, done in enumerate(self._accept_rows(group, logits)) if not done]
            if keep:
                self._batch.add(cache, mask, keep)
                with self._wake:
                    self._active.extend(group[i] for i in keep)

    def _take(self, free: int) -> list[Sequence]:
        """Up to `free` waiting requests, first come first served (under `_wake`). Where a batch
        is best kept to one adapter (`ModelHost.one_adapter_per_batch`: LoRA inside fused experts),
        only the requests at the head of the queue for the running batch's adapter join it; a
        request for another adapter waits until the batch has drained, then starts the next."""
        if not self.host.one_adapter_per_batch:
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        if not self._waiting:
            return []
        current = self._active[0].adapter if self._active else self._waiting[0].adapter
        taken = []
        while self._waiting and len(taken) < free and self._waiting[0].adapter == current:
            taken.append(self._waiting.popleft())
        return taken

    def _prefill(self, group: list[Sequence]) -> tuple[torch.Tensor, object, torch.Tensor]:
        """One forward over the group's prompts, left-padded; (last logits, cache, mask)."""
        from transformers import DynamicCache

        device = self.host.device
        width = max(len(seq.prompt_ids) for seq in group)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(group), width, dtype=torch.long, device=device)
        for row, seq in enumerate(group):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        padded = not bool(mask.all())
        extra = {}
        if padded:  # a row's positions count its own tokens only
            extra = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        with self.host.rows([seq.adapter or BASE_ROW for seq in group]):
            out = self.host.forward_model(
                input_ids=ids,
                use_cache=True,
                logits_to_keep=1,  # only the last position's logits are needed
                **_cache_argument(self.host.forward_model, DynamicCache()),
                **extra,
            )
        return out.logits[:, -1].float(), _returned_cache(out), mask

    def _decode_step(self) -> None:
        rows = self._active
        device = self.host.device
        input_ids = torch.tensor([[seq.output_ids[-1]] for seq in rows], device=device)
        positions = torch.tensor([[seq.length - 1] for seq in rows], device=device)
        mask = self._batch.step_mask()
        with self.host.lock, self.host.decode([seq.adapter or BASE_ROW for seq in rows]):
            lean = self.host.lean_decode  # the same step without transformers' plumbing
            if lean is not None:
                logits = lean(input_ids, positions, mask, self._batch.cache)
            else:
                out = self.host.forward_model(
                    input_ids=input_ids,
                    position_ids=positions,
                    attention_mask=mask,
                    use_cache=True,
                    **_cache_argument(self.host.forward_model, self._batch.cache),
                )
                self._batch.cache, logits = _returned_cache(out), out.logits
        self.steps += 1
        live = [seq for seq in rows if not seq.cancelled]
        if live:
            logits = logits[:, -1].float()
            if len(live) < len(rows):
                logits = logits[[row for row, seq in enumerate(rows) if not seq.cancelled]]
            self._accept_rows(live, logits)

    def _accept_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[bool]:
        """Sample each row's next token and send its text; True where a request finished.

        Rows are independent, so a row that fails here (non-finite logits from its adapter, a
        sampling error) ends only its own request; the rest of the batch decodes on. Finiteness
        and the greedy choice are computed for all rows at once (one op each, not one a row).
        """
        finite, best = rows_finite(logits), greedy_tokens(logits)
        done = []
        for row, seq in enumerate(seqs):
            try:
                if not finite[row]:
                    raise FloatingPointError(_non_finite_message(seq))
                done.append(self._next_token(seq, logits[row], best[row]))
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
                log.warning("a request failed alone (adapter %s): %s", seq.adapter, message)
                done.append(self._finish(seq, FINISH_ERROR, message))
        return done

    def _next_token(self, seq: Sequence, logits: torch.Tensor, best: int) -> bool:
        """Take the row's next token (`best` is its greedy choice, the argmax of `logits`)."""
        greedy = is_greedy(seq.params, seq.generator)
        token = best if greedy else sample_token(logits, seq.params, seq.generator)
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
        try:
            _send(seq, Event(text=text, token_ids=tokens, finish_reason=reason, error=error))
        finally:
            if seq.lease is not None:  # the adapter may go now (if it was unloaded meanwhile)
                seq.lease.release()
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


def prefill_groups(seqs: list[Sequence], max_tokens: int) -> list[list[Sequence]]:
    """Length-sorted groups with padding under a quarter of each group and under max_tokens;
    within a group, the rows of one adapter are next to each other."""
    groups: list[list[Sequence]] = []
    group: list[Sequence] = []
    tokens = 0
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        length = len(seq.prompt_ids)  # the longest so far: the group's new padded width
        padded = length * (len(group) + 1)
        if group and (padded > max_tokens or padded - (tokens + length) > padded / 4):
            groups.append(group)
            group, tokens = [], 0
        group.append(seq)
        tokens += length
    if group:
        groups.append(group)
    # rows of one adapter side by side: each adapter then adds into one block of rows
    return [sorted(group, key=lambda s: s.adapter or "") for group in groups]


def _non_finite_message(seq: Sequence) -> str:
    where = f"output token {len(seq.output_ids) + 1}"
    if seq.adapter is None:
        return f"the base model's logits are not finite (NaN/inf) at {where}"
    return (
        f"adapter `{seq.adapter}` makes the logits non-finite (NaN/inf) at {where}: its weights "
        "or lora_alpha are too large for this input; check it with `lorakit inspect`"
    )


def _send(seq: Sequence, event: Event) -> None:
    """Hand an event to the request's owner; a failing sink cancels only that request."""
    try:
        seq.sink(event)
    except Exception:
        log.exception("a request's sink failed; cancelling the request")
        seq.cancelled = True


def _cache_argument(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """The KV cache as the model's forward names it: `cache` in newer transformers (where
    `past_key_values` is deprecated), `past_key_values` before."""
    name = _CACHE_NAMES.get(type(model))
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = _CACHE_NAMES[type(model)] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


def _returned_cache(out: object) -> object:
    """The KV cache a forward returned, under either name."""
    cache = getattr(type(out), "__dataclass_fields__", {})
    return out.cache if "cache" in cache else out.past_key_values


_CACHE_NAMES: dict[type, str] = {}
