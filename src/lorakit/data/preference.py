"""Preference pairs: a prompt with a chosen and a rejected answer, tokenized as two sequences
whose labels cover the answer only (the prompt is the same on both sides and is never scored).

Row forms (TRL's preference formats):

- `prompt` / `chosen` / `rejected` as strings: the prompt is the user's turn, each answer the
  assistant's;
- the same keys holding conversations (`[{"role", "content"}, ...]`): the prompt is every turn
  before the answer, each answer one or more turns ending with the assistant's;
- no `prompt`: `chosen` and `rejected` are whole dialogues sharing a prefix (the Anthropic HH
  style), as conversations or as text with `Human:` / `Assistant:` turns; the shared turns are
  the prompt, the turns after them the answers.

`data.columns` maps the file's names to `prompt`, `chosen`, `rejected`. Both sides are rendered
through the chat template as supervised rows are, and labels keep the answer's turns only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.batches import collate
from lorakit.data.formats import RawRow, RowProblem, check_conversation, read_rows
from lorakit.data.pipeline import (
    DataConfig,
    _check_problems,
    _source,
    prompt_template,
)
from lorakit.data.tokenize import (
    IGNORE_INDEX,
    encode_conversation,
    finish_labels,
    supervised_count,
    truncate,
)
from lorakit.errors import DataError

Messages = list[dict[str, str]]
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


@dataclass
class Side:
    """One tokenized side of a pair: the prompt followed by one answer."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class PairSample:
    """A tokenized pair and the row it came from."""

    chosen: Side
    rejected: Side
    where: str

    @property
    def input_ids(self) -> list[int]:
        """Both sides' tokens, chosen first (what a data fingerprint hashes)."""
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        """Both sides' labels, chosen first."""
        return self.chosen.labels + self.rejected.labels


@dataclass
class PreferenceDataset:
    """Tokenized pairs plus what the pipeline did; planned and batched as a TokenizedDataset
    is, with each planned row one pair (collated as its chosen row and its rejected row)."""

    samples: list[PairSample]
    config: DataConfig
    source: str
    pad_token_id: int
    rows_total: int
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    raw_text: bool = False

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        """The longer side of every pair: the width the pair pads to."""
        return [max(len(s.chosen.input_ids), len(s.rejected.input_ids)) for s in self.samples]

    def supervised_tokens(self) -> int:
        """Answer tokens scored, both sides, over the whole dataset."""
        return sum(supervised_count(s.labels) for s in self.samples)

    def describe(self, sample_ids: list[int] | list[list[int]]) -> str:
        """The file rows behind pair indices."""
        flat = [i for ids in sample_ids for i in (ids if isinstance(ids, list) else [ids])]
        return ", ".join(self.samples[i].where for i in flat)

    def summary(self) -> str:
        """One line: pairs used and skipped, tokens and answer tokens."""
        tokens = sum(len(s.input_ids) for s in self.samples)
        return (
            f"{self.source}: {len(self)} of {self.rows_total} preference pairs used, "
            f"{len(self.skipped)} skipped, {self.truncated} truncated; {tokens} tokens, "
            f"{self.supervised_tokens()} in answers"
        )

    def collate(self, rows: list[list[int]]) -> dict[str, Any]:
        """One batch of 2B rows: the B chosen sides, then the B rejected sides (in that order);
        `sample_ids` names the B pairs."""
        pairs = [self.samples[i] for row in rows for i in row]
        sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        batch = collate(sides, [[k] for k in range(len(sides))], self.pad_token_id, False)
        batch["sample_ids"] = [list(row) for row in rows]
        return batch


# ---------------------------------------------------------------- rows to pairs


def _side(value: Any, name: str) -> Messages | str:
    """One field of a pair: text or a conversation; RowProblem when missing or empty."""
    if value is None:
        raise RowProblem(f"field `{name}` is missing; a preference row needs chosen and rejected")
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"field `{name}` is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for i, m in enumerate(value, start=1):
            if "role" not in m or "content" not in m:
                raise RowProblem(f"`{name}` message {i} must be an object with role and content")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise RowProblem(
        f"field `{name}` must be a string or a list of {{role, content}} messages, "
        f"found {type(value).__name__}"
    )


def _hh_turns(text: str, name: str) -> Messages:
    """`Human: ... Assistant: ...` text (the Anthropic HH style) as a conversation."""
    marks = list(_HH_TURN.finditer(text))
    if not marks:
        raise RowProblem(
            f"`{name}` is text without `Human:` / `Assistant:` turns and the row has no "
            "`prompt`; give a prompt, or whole dialogues as text with those turns or as messages"
        )
    messages = []
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        end = following.start() if following is not None else len(text)
        role = "user" if mark.group(1) == "Human" else "assistant"
        messages.append({"role": role, "content": text[mark.end() : end].strip()})
    return messages


def _split_shared(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen answer, rejected answer) of two dialogues sharing a prefix of turns."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def to_pair(row: Any) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen answer, rejected answer) of one row, each answer ending with the
    assistant's turn; RowProblem if the row cannot be used."""
    if isinstance(row, RowProblem):
        raise row
    if not isinstance(row, dict):
        raise RowProblem(f"expected an object with fields, found {type(row).__name__}")
    chosen, rejected = _side(row.get("chosen"), "chosen"), _side(row.get("rejected"), "rejected")
    if row.get("prompt") is None:
        chosen = _hh_turns(chosen, "chosen") if isinstance(chosen, str) else chosen
        rejected = _hh_turns(rejected, "rejected") if isinstance(rejected, str) else rejected
        prompt, chosen, rejected = _split_shared(chosen, rejected)
    else:
        prompt = _side(row["prompt"], "prompt")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        as_answer = lambda side: (  # noqa: E731
            [{"role": "assistant", "content": side}] if isinstance(side, str) else side
        )
        chosen, rejected = as_answer(chosen), as_answer(rejected)
    if chosen == rejected:
        raise RowProblem("`chosen` and `rejected` are the same answer; nothing to prefer")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[0]["role"] != "assistant":
            raise RowProblem(
                f"the `{name}` answer must start with the assistant's turn after the prompt "
                f"(found {answer[0]['role'] if answer else 'nothing'})"
            )
        try:
            check_conversation(prompt + answer)
        except RowProblem as problem:
            raise RowProblem(f"prompt + `{name}`: {problem}") from None
    return prompt, chosen, rejected


# ---------------------------------------------------------------- tokens


def _answer_labels(labels: list[int], turns: int) -> list[int]:
    """Labels with only the last `turns` supervised spans kept (the answer's assistant turns;
    the prompt's own assistant turns are context)."""
    spans, inside = [], False
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and not inside:
            spans.append(i)
        inside = label != IGNORE_INDEX
    keep_from = spans[-turns] if len(spans) >= turns else 0
    return [IGNORE_INDEX] * keep_from + labels[keep_from:]


def _encode_side(
    config: DataConfig, tokenizer: Any, template: str, prompt: Messages, answer: Messages
) -> tuple[Side, bool]:
    """One side's tokens and answer-only labels; RowProblem when no answer token is left."""
    ids, labels = encode_conversation(tokenizer, template, prompt + answer, "responses")
    turns = sum(m["role"] == "assistant" for m in answer)
    labels = _answer_labels(labels, turns)
    ids, labels, cut = truncate(ids, labels, config.max_length, config.truncation)
    labels = finish_labels(labels)
    if supervised_count(labels) == 0:
        raise RowProblem(
            f"the prompt takes all of data.max_length={config.max_length} tokens, leaving none "
            "of the answer; raise data.max_length or shorten the prompt"
        )
    return Side(ids, labels), cut


def load_pairs(config: DataConfig) -> tuple[str, list[tuple[RawRow, Any]]]:
    """(source name, [(row, (prompt, chosen, rejected) or RowProblem)]) of the dataset."""
    from lorakit.data.formats import fill_variables, rename_columns

    path, variables = _source(config)
    rows = read_rows(path)[: config.limit]
    if config.format not in ("auto", "preference"):
        raise DataError(
            f"data.format is `{config.format}`, but preference tuning reads pairs; set "
            "data.format: preference (or auto)"
        )
    out: list[tuple[RawRow, Any]] = []
    for row in rows:
        value = row.value
        if isinstance(value, dict):
            value = fill_variables(rename_columns(value, config.columns), variables)
        try:
            out.append((row, to_pair(value)))
        except RowProblem as problem:
            out.append((row, problem))
    return path.name, out


def build_preference_dataset(config: DataConfig, tokenizer: Any) -> PreferenceDataset:
    """Tokenize the configured pairs; bad rows stop the run or are skipped (up to a share),
    as in `build_dataset`."""
    if config.packing:
        raise DataError(
            "data.packing is on, but preference pairs are not packed (each side is scored as a "
            "whole sequence); set data.packing: false"
        )
    source, pairs = load_pairs(config)
    template = prompt_template(config, tokenizer)
    samples, problems, truncated = [], [], 0
    for row, pair in pairs:
        try:
            if isinstance(pair, RowProblem):
                raise pair
            prompt, chosen, rejected = pair
            chosen_side, cut_c = _encode_side(config, tokenizer, template, prompt, chosen)
            rejected_side, cut_r = _encode_side(config, tokenizer, template, prompt, rejected)
        except RowProblem as problem:
            problems.append(f"{row.where}: {problem}")
            continue
        truncated += cut_c or cut_r
        samples.append(PairSample(chosen_side, rejected_side, row.where))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = PreferenceDataset(samples, config, source, pad, len(pairs), problems, truncated)
    _check_problems(dataset, unreadable=sum(isinstance(p, RowProblem) for _, p in pairs))
    return dataset


def check_pairs(config: DataConfig) -> None:
    """Read the pairs without a tokenizer: DataError when the file is missing, unreadable, or
    none of its rows is a usable pair."""
    source, pairs = load_pairs(config)
    problems = [(row, p) for row, p in pairs if isinstance(p, RowProblem)]
    if not pairs or len(problems) == len(pairs):
        first = f" ({problems[0][0].where}: {problems[0][1]})" if problems else ""
        raise DataError(
            f"{source}: none of its {len(pairs)} rows is a usable preference pair{first}; rows "
            "need `chosen` and `rejected` (and `prompt`, or dialogues sharing their first turns)"
        )
