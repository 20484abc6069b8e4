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
