"""Conversations to tokens with labels: -100 everywhere except the assistant responses.

The assistant spans are found without help from the template (no `{% generation %}` needed):
each assistant turn is rendered before it (with the generation prompt) and after it, and the
renderings must extend each other as text. Rendering every prefix of the conversation costs
time quadratic in its length, so each turn is rendered after only the exchange before it (and
the system message); the pieces must then add up to the whole conversation's rendering, and the
last turn's prompt must equal its real prefix. A template for which that does not hold (one
that looks further back) gets the prefix-by-prefix rendering, up to PREFIX_LIMIT messages.

The tokens are built piece by piece. When tokenizing the text gives the tokens built so far plus
some more, those are used (the usual case, and what generation will see); otherwise only the
new piece is tokenized and appended, so the token sequence always extends the one before. A
special token splits the text for the tokenizer, so only the text since the last one is
tokenized again: linear time too.
"""

from __future__ import annotations

from typing import Any

from lorakit.data.formats import RowProblem
from lorakit.models.templates import render_chat
from lorakit.ops import IGNORE_INDEX

PREFIX_LIMIT = 256  # messages rendered prefix by prefix at most (quadratic time)


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], prompt: bool) -> str:
    """Render messages with a Jinja chat template (and the generation prompt when `prompt`), as
    `models.templates.prompt_ids` does for generation."""
    from jinja2 import TemplateError

    try:
        return render_chat(tokenizer, messages, template, prompt)
    except TemplateError as err:  # e.g. a template that allows no system message
        raise RowProblem(f"the chat template refuses this conversation: {err}") from err


def conversation_pieces(
    tokenizer: Any, template: str, messages: list[dict[str, str]]
) -> list[tuple[str, bool]]:
    """The rendered text cut into (piece, is_response) pieces that concatenate to the whole."""
    pieces = _turn_pieces(tokenizer, template, messages)
    if pieces is not None:
        return pieces
    if len(messages) > PREFIX_LIMIT:
        raise RowProblem(
            f"the conversation has {len(messages)} messages and the chat template renders a "
            "turn differently depending on more than the exchange before it, so the response "
            "spans need a rendering of every prefix (time quadratic in the length); split it "
            f"into conversations of at most {PREFIX_LIMIT} messages"
        )
    return _prefix_pieces(tokenizer, template, messages)


def _turn_pieces(
    tokenizer: Any, template: str, messages: list[dict[str, str]]
) -> list[tuple[str, bool]] | None:
    """Pieces from rendering each assistant turn after only the exchange before it; None when
    they do not add up to the whole conversation's rendering."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    roles = [m["role"] for m in messages[start:]]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        return None
    done: dict[tuple[tuple[int, ...], bool], str] = {}  # a rendering asked for twice: once

    def rendered(indices: list[int], prompt: bool) -> str:
        key = (tuple(indices), prompt)
        if key not in done:
            done[key] = render(tokenizer, template, [messages[i] for i in indices], prompt)
        return done[key]

    pieces: list[tuple[str, bool]] = []
    for turn in range(start + 1, len(messages), 2):  # the assistant messages
        context = list(range(start)) + list(range(max(start, turn - 3), turn - 1))
        base = rendered(context, prompt=False) if turn - 1 > start else ""
        before = rendered([*context, turn - 1], prompt=True)
        after = rendered([*context, turn - 1, turn], prompt=False)
        if not (before.startswith(base) and after.startswith(before)):
            return None
        pieces += [(before[len(base) :], False), (after[len(before) :], True)]
    text = "".join(piece for piece, _ in pieces)
    whole = rendered(list(range(len(messages))), prompt=False)
    last_prompt = rendered(list(range(len(messages) - 1)), prompt=True)
    if not whole.startswith(text) or text[: len(text) - len(pieces[-1][0])] != last_prompt:
        return None
    pieces.append((whole[len(text) :], False))
    return [(piece, label) for piece, label in pieces if piece]


def _prefix_pieces(
    tokenizer: Any, template: str, messages: list[dict[str, str]]
) -> list[tuple[str, bool]]:
    """Pieces from rendering every prefix that ends before or after an assistant turn."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:turn], prompt=True)
        after = render(tokenizer, template, messages[: turn + 1], prompt=False)
        for text, label in ((before, False), (after, True)):
            if not text.startswith(done):
                raise RowProblem(
                    f"the chat template renders the conversation before message {turn + 1} "
                    "differently once later messages are added, so the response spans cannot "
                    "be found; use a template whose renderings extend each other"
                )
            pieces.append((text[len(done) :], label))
            done = text
    tail = render(tokenizer, template, messages, prompt=False)
    if tail.startswith(done) and len(tail) > len(done):
        pieces.append((tail[len(done) :], False))
    return [(text, label) for text, label in pieces if text]


def _tokens(tokenizer: Any, text: str) -> tuple[list[int], list[int] | None]:
    """Token ids of text without the tokenizer's automatic special tokens (the text has them),
    and where each token starts in `text` (None for a tokenizer without offsets)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a Python tokenizer: no offsets
        return tokenizer(text, add_special_tokens=False)["input_ids"], None
    return encoded["input_ids"], [begin for begin, _ in encoded["offset_mapping"]]


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the special tokens, which the tokenizer splits the text at."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i for i, token in added.items() if getattr(token, "special", False)}


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]], train_on: str = "responses"
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; labels are -100 outside assistant responses."""
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] | None = []  # where each token begins in the text
    special = _special_ids(tokenizer)
    anchor = 0  # index of the last special token: tokens before it are final
    text = ""
    for piece, is_response in conversation_pieces(tokenizer, template, messages):
        offset, text = len(text), text + piece
        begin = starts[anchor] if starts and anchor < len(ids) else 0
        local, where = _tokens(tokenizer, text[begin:])
        held = len(ids) - anchor
        if local[:held] == ids[anchor:]:
            new, where, shift = local[held:], where and where[held:], begin
        else:
            (new, where), shift = _tokens(tokenizer, piece), offset
        if starts is None or where is None:
            starts = None  # no offsets: the whole text is tokenized each time
        else:
            starts += [shift + w for w in where]
            anchor = max([anchor, *(t for t, i in enumerate(new, len(ids)) if i in special)])
        ids += new
        keep = is_response or train_on == "all"
        labels += new if keep else [IGNORE_INDEX] * len(new)
    return ids, labels


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Raw text (the `text` format): bos (if the tokenizer uses one) + text + eos, all trained."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def truncate(
    ids: list[int], labels: list[int], max_length: int, side: str = "right"
) -> tuple[list[int], list[int], bool]:
    """Cut a sample to max_length tokens, keeping its start (`right`) or its end (`left`)."""
    if len(ids) <= max_length:
        return ids, labels, False
    if side == "left":
        return ids[-max_length:], labels[-max_length:], True
    return ids[:max_length], labels[:max_length], True


def finish_labels(labels: list[int]) -> list[int]:
    """Labels with the first position ignored: no token predicts it, packed or not."""
    if labels:
        labels = [IGNORE_INDEX] + labels[1:]
    return labels


def supervised_count(labels: list[int]) -> int:
    """How many tokens are trained on."""
    return sum(1 for label in labels if label != IGNORE_INDEX)
