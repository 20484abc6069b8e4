"""Conversations to tokens with labels: -100 everywhere except the assistant responses.

The assistant spans are found without help from the template (no `{% generation %}` needed):
the conversation is rendered prefix by prefix (before each assistant turn with the generation
prompt, after it without), each prefix must extend the previous one as text, and the tokens
are built piece by piece. When tokenizing a whole prefix gives the tokens built so far plus
some more, those are used (the usual case, and what generation will see); otherwise only the
new piece is tokenized and appended, so the token sequence always extends the one before.
"""

from __future__ import annotations

from typing import Any

from lorakit.data.formats import RowProblem

IGNORE_INDEX = -100


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], prompt: bool) -> str:
    """Render messages with a Jinja chat template (and the generation prompt when `prompt`)."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    except TemplateError as err:  # e.g. a template that allows no system message
        raise RowProblem(f"the chat template refuses this conversation: {err}") from err


def conversation_pieces(
    tokenizer: Any, template: str, messages: list[dict[str, str]]
) -> list[tuple[str, bool]]:
    """The rendered text cut into (piece, is_response) pieces that concatenate to the whole."""
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


def _tokens(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text without the tokenizer's automatic special tokens (the text has them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]], train_on: str = "responses"
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; labels are -100 outside assistant responses."""
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    for piece, is_response in conversation_pieces(tokenizer, template, messages):
        text += piece
        whole = _tokens(tokenizer, text)
        new = whole[len(ids) :] if whole[: len(ids)] == ids else _tokens(tokenizer, piece)
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
