"""Chat templates: the tokenizer's own, the plain format for base models, prompt ids."""

from __future__ import annotations

from lorakit import models
from lorakit.models import chat_template_of, prompt_template_of
from lorakit.models.templates import PLAIN_TEMPLATE, RAW_TEMPLATE, render_chat


class _NoTemplate:
    chat_template = None


def test_chat_template_and_plain_fallback():
    assert chat_template_of(_NoTemplate()) is None
    assert prompt_template_of(_NoTemplate()) == models.PLAIN_TEMPLATE


def word_tokenizer(chat_template=None):
    """A whitespace word-level tokenizer that knows the words of PLAIN_TEMPLATE's headings."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "###", "Instruction:", "Response:", "<|user|>", "<|bot|>", "hi"]
    core = Tokenizer(token_models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


CHAT = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|bot|>"


def test_prompt_ids_use_the_template_given_else_the_tokenizer_s_else_the_plain_format():
    from lorakit.models.templates import prompt_ids

    messages = [{"role": "user", "content": "hi"}]
    tok = word_tokenizer(CHAT.replace("bot", "user"))
    assert tok.decode(prompt_ids(tok, messages, CHAT)) == "<|user|> hi <|bot|>"
    tokenized = tok.apply_chat_template(messages, chat_template=CHAT, add_generation_prompt=True)
    assert prompt_ids(tok, messages, CHAT) == tokenized["input_ids"]
    assert tok.decode(prompt_ids(tok, messages)) == "<|user|> hi <|user|>"  # the tokenizer's
    plain = word_tokenizer()  # no chat template: the format lorakit trains such a model in
    assert plain.decode(prompt_ids(plain, messages)) == "### Instruction: hi ### Response:"
    assert prompt_ids(plain, messages) == prompt_ids(plain, messages, models.PLAIN_TEMPLATE)


def test_named_templates_give_the_default_and_an_empty_one_is_none():
    class Named:
        chat_template = {"default": CHAT, "tool_use": "{{ tools }}"}

    class Empty:
        chat_template = ""

    assert chat_template_of(Named()) == prompt_template_of(Named()) == CHAT
    assert chat_template_of(Empty()) is None
    assert prompt_template_of(Empty()) == PLAIN_TEMPLATE


def test_plain_and_raw_formats_render_as_documented():
    tok = word_tokenizer()  # eos_token "<eos>", no bos_token
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    # turns joined by a blank line; the user's under "### Instruction:", the assistant's under
    # "### Response:" and closed by the eos token; no bos token to open with
    assert render_chat(tok, messages, PLAIN_TEMPLATE, False) == (
        "Be brief.\n\n### Instruction:\nhi\n\n### Response:\nhello<eos>"
    )
    # the generation prompt is the next heading, after a blank line
    assert render_chat(tok, messages[:2], PLAIN_TEMPLATE, True) == (
        "Be brief.\n\n### Instruction:\nhi\n\n### Response:\n"
    )
    # raw text: the contents as they are, nothing between or after them
    assert render_chat(tok, messages, RAW_TEMPLATE, True) == "Be brief.hihello"
