"""The Modelfile: its TEMPLATE renders conversations exactly as the tokenizer's chat template."""

from __future__ import annotations

import pytest

from builtin_model import builtin_tokenizer
from lorakit.errors import ModelError
from lorakit.models.ollama import checked_parts, go_template, modelfile, render

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another\n\none, with  spaces "},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
]


def _jinja(template, messages):
    return builtin_tokenizer().apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


CHATML_NO_DEFAULT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("which", ["builtin", "plain chatml"])
def test_the_template_renders_as_the_chat_template(messages, which):
    tokenizer = builtin_tokenizer()
    template = tokenizer.chat_template if which == "builtin" else CHATML_NO_DEFAULT
    parts = checked_parts(template, tokenizer)
    assert render(parts, messages) == _jinja(template, messages)


def test_the_builtin_templates_parts_and_go_text():
    tokenizer = builtin_tokenizer()
    parts = checked_parts(tokenizer.chat_template, tokenizer)
    assert parts.user == ("<|im_start|>user\n", "<|im_end|>\n")
    assert parts.generation == "<|im_start|>assistant\n"
    assert parts.preamble.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    text = go_template(parts)
    assert text.count("{{ .Content }}") == 3
    assert '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n' in text
    assert text.endswith("{{ end }}{{ end }}<|im_start|>assistant\n")


def test_modelfile_lines():
    tokenizer = builtin_tokenizer()
    text, reason = modelfile("base.gguf", "adapter.gguf", tokenizer.chat_template, tokenizer)
    assert reason is None
    lines = text.splitlines()
    assert lines[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert lines[2].startswith('TEMPLATE """')
    assert text.endswith('PARAMETER stop """<|im_end|>"""\n')


def test_a_template_that_numbers_turns_gets_no_template_with_the_reason():
    numbered = (
        "{% for m in messages %}{{ loop.index ~ '. ' ~ m['role'] ~ ': ' ~ m['content'] ~ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer = builtin_tokenizer()
    with pytest.raises(ModelError, match="write TEMPLATE by hand"):
        checked_parts(numbered, tokenizer)
    text, reason = modelfile("m.gguf", None, numbered, tokenizer)
    assert "TEMPLATE" not in text and "write TEMPLATE by hand" in reason
