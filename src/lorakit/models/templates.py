"""Chat templates: a tokenizer's own, or a plain prompt format for base models without one."""

from __future__ import annotations

from typing import Any

# A prompt format for base models without a chat template (Alpaca-style headings).
PLAIN_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + (eos_token if eos_token else '') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Response:\n' }}{% endif %}"
)

# The prompt format of a model trained on raw text: the prompt as it is, nothing around it.
RAW_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (a Jinja string), or None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: use the default one
        template = template.get("default")
    return template or None


def prompt_template_of(tokenizer: Any) -> str:
    """The template lorakit renders conversations with: the chat template, else PLAIN_TEMPLATE."""
    return chat_template_of(tokenizer) or PLAIN_TEMPLATE


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], template: str, generation_prompt: bool
) -> str:
    """`messages` rendered as text with the Jinja chat `template` (the tokenizer's special tokens
    as its variables), ending with the prompt for the assistant's turn when `generation_prompt`.
    A template that refuses the conversation raises jinja2's TemplateError."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def prompt_ids(
    tokenizer: Any, messages: list[dict[str, str]], template: str | None = None
) -> list[int]:
    """The token ids that prompt a model for the assistant's turn after `messages`.

    The conversation is rendered with `template`; without one, with the tokenizer's chat
    template, and for a tokenizer without one with PLAIN_TEMPLATE: the format lorakit trains
    such a base model in, so a model is prompted as it was trained (`prompt_template_of`). The
    text is tokenized without adding special tokens, since the template writes them, as
    `apply_chat_template(..., tokenize=True)` does.
    """
    text = render_chat(tokenizer, messages, template or prompt_template_of(tokenizer), True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
