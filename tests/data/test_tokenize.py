"""Response labels of long conversations: linear work, and the same tokens and labels as
rendering and tokenizing every prefix (the reference below)."""

from __future__ import annotations

import random

import pytest

from builtin_model import builtin_tokenizer
from lorakit.data.formats import RowProblem
from lorakit.data.tokenize import (
    IGNORE_INDEX,
    PREFIX_LIMIT,
    _prefix_pieces,
    encode_conversation,
)
from lorakit.models.templates import PLAIN_TEMPLATE


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def reference(tokenizer, template, messages):
    """Every prefix rendered and the whole text so far tokenized again: quadratic, the rule."""
    ids, labels, text = [], [], ""
    for piece, is_response in _prefix_pieces(tokenizer, template, messages):
        text += piece
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        if whole[: len(ids)] == ids:
            new = whole[len(ids) :]
        else:
            new = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += new
        labels += new if is_response else [IGNORE_INDEX] * len(new)
    return ids, labels


def conversation(turns: int, rng: random.Random | None = None, system: bool = False):
    words = ["hi", " there", "\n", "  ", "é", "你好", "<|im_end|>", "42", "\n\n", " .", "ok "]
    pick = (lambda: "".join(rng.choice(words) for _ in range(4))) if rng else (lambda: "x y")
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"{pick()} q{i}"},
            {"role": "assistant", "content": f"{pick()} a{i}"},
        ]
    return messages


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_labels_equal_the_prefix_by_prefix_reference(tok, template):
    template = tok.chat_template if template == "chat" else PLAIN_TEMPLATE
    rng = random.Random(0)
    for trial in range(12):  # odd whitespace, CJK, a literal <|im_end|> in the contents
        messages = conversation(rng.randint(1, 7), rng, system=trial % 2 == 0)
        assert encode_conversation(tok, template, messages) == reference(tok, template, messages)


class Counting:
    """The tokenizer, counting the messages it renders and the characters it tokenizes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.rendered, self.tokenized = tokenizer, 0, 0

    def apply_chat_template(self, messages, **kwargs):
        self.rendered += len(messages)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text, **kwargs):
        self.tokenized += len(text)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_3000_turn_conversation_takes_linear_work(tok):
    # Rendering every prefix renders n^2/2 messages (9M here) and tokenizes ~n^2 characters;
    # the turn-by-turn rendering renders 2 whole conversations plus 2 + 3 + 4 messages per turn.
    messages = conversation(3000)
    counting = Counting(tok)
    ids, labels = encode_conversation(counting, tok.chat_template, messages)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert counting.rendered <= 2 * len(messages) + 9 * 3000
    assert counting.tokenized <= 2 * len(text)
    assert tok.decode(ids) == text
    supervised = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "".join(f"x y a{i}<|im_end|>\n" for i in range(3000))


# A template that numbers the turns: a turn's text depends on every turn before it.
NUMBERED = (
    "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ (messages | length) + 1 }}. assistant: "
    "{% endif %}"
)


def test_a_template_that_looks_further_back_is_rendered_prefix_by_prefix(tok):
    messages = conversation(4)
    ids, labels = encode_conversation(tok, NUMBERED, messages)
    assert (ids, labels) == reference(tok, NUMBERED, messages)
    supervised = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "x y a0\nx y a1\nx y a2\nx y a3\n"
    too_long = conversation(PREFIX_LIMIT // 2 + 1)
    with pytest.raises(RowProblem, match=rf"has {PREFIX_LIMIT + 2} messages.*at most 256"):
        encode_conversation(tok, NUMBERED, too_long)
