"""An Ollama `Modelfile` for an exported GGUF: `FROM`, `ADAPTER`, a `TEMPLATE` in Ollama's Go
template language equivalent to the model's Jinja chat template, and `PARAMETER stop` for the
end-of-turn tokens.

The Jinja template is not translated construct by construct: it is rendered with marker
messages, and the text it puts around each role's content is read off (`TemplateParts`). The
Go template writes those texts around `.Content` per role. Before a TEMPLATE is written,
`render` (what that Go template produces) is compared with the Jinja template on several
conversations; a template whose output depends on more than the role (numbering turns,
reformatting content, tools) is refused with the reason rather than approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.errors import ModelError

_S, _U, _A = "\x00SYSTEM\x00", "\x00USER\x00", "\x00ASSISTANT\x00"
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks\nbye"},
    ],
]


@dataclass(frozen=True)
class TemplateParts:
    """The text a chat template puts around each role's content."""

    preamble: str  # before the first message when it is not a system message
    system: tuple[str, str] | None
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # the assistant turn's opening, after the last message


def _render(template: str, messages: list[dict], generation: bool, tokenizer: Any) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )


def _around(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ModelError(
            f"Ollama TEMPLATE: the chat template does not render the {what} message's content "
            "once and unchanged, so it cannot be written as a Go template; write TEMPLATE by hand"
        )
    before, after = text.split(marker)
    return before, after


def _after(longer: str, prefix: str, what: str) -> str:
    if not longer.startswith(prefix):
        raise ModelError(
            f"Ollama TEMPLATE: adding a {what} message changes what the chat template renders "
            "before it, so it cannot be written as a Go template; write TEMPLATE by hand"
        )
    return longer[len(prefix) :]


def template_parts(template: str, tokenizer: Any) -> TemplateParts:
    """Read each role's surrounding text off the rendered template (see the module's doc)."""
    system_msg, user_msg = {"role": "system", "content": _S}, {"role": "user", "content": _U}
    assistant_msg = {"role": "assistant", "content": _A}
    try:
        with_system = _render(template, [system_msg], False, tokenizer)
        system = _around(with_system, _S, "system")
    except ModelError:
        raise
    except Exception:  # the template refuses system messages
        with_system, system = "", None
    start = [system_msg] if system else []
    turn = _render(template, [*start, user_msg], False, tokenizer)
    user = _around(_after(turn, with_system, "user"), _U, "user")
    full = _render(template, [*start, user_msg, assistant_msg], False, tokenizer)
    assistant = _around(_after(full, turn, "assistant"), _A, "assistant")
    generation = _after(_render(template, [*start, user_msg], True, tokenizer), turn, "generation")
    alone = _render(template, [user_msg], False, tokenizer)
    user_block = "".join((user[0], _U, user[1]))
    if not alone.endswith(user_block):
        raise ModelError(
            "Ollama TEMPLATE: the chat template renders a first user message differently from "
            "a later one; write TEMPLATE by hand"
        )
    return TemplateParts(alone[: -len(user_block)], system, user, assistant, generation)


def render(parts: TemplateParts, messages: list[dict]) -> str:
    """What the Go template of `go_template(parts)` renders for `messages` (the reference the
    Jinja template is checked against)."""
    out = parts.preamble if not messages or messages[0]["role"] != "system" else ""
    for message in messages:
        around = {"system": parts.system, "user": parts.user, "assistant": parts.assistant}
        pre, post = around[message["role"]] or ("", "")
        out += pre + message["content"] + post
    return out + parts.generation


def go_template(parts: TemplateParts) -> str:
    """The Ollama TEMPLATE text (Go's text/template; no whitespace trimming, so every character
    of the parts is kept)."""
    texts = [parts.preamble, parts.generation, *parts.user, *parts.assistant, *(parts.system or ())]
    if any("{{" in t or "}}" in t for t in texts):
        raise ModelError("Ollama TEMPLATE: the chat template's text holds `{{` or `}}`")
    branches = [("user", parts.user), ("assistant", parts.assistant)]
    if parts.system:
        branches.insert(0, ("system", parts.system))
    body = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}'
        for i, (role, (pre, post)) in enumerate(branches)
    )
    first = '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
    return (
        f"{first}{parts.preamble}{{{{ end }}}}"
        f"{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{parts.generation}"
    )


def checked_parts(template: str, tokenizer: Any) -> TemplateParts:
    """`template_parts`, refused unless `render` equals the Jinja template on every
    conversation of CHECK_CONVERSATIONS."""
    parts = template_parts(template, tokenizer)
    for messages in CHECK_CONVERSATIONS:
        expected = _render(template, messages, True, tokenizer)
        if render(parts, messages) != expected:
            raise ModelError(
                "Ollama TEMPLATE: the chat template renders a conversation of "
                f"{len(messages)} messages differently from its per-role pieces; write "
                "TEMPLATE by hand"
            )
    return parts


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ModelError('Ollama Modelfile: a value holds `"""`, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(
    model_file: str, adapter_file: str | None, template: str | None, tokenizer: Any
) -> tuple[str, str | None]:
    """The Modelfile text (FROM, ADAPTER, TEMPLATE, stop parameters) and, when the chat template
    cannot be written as a TEMPLATE, the reason (the Modelfile then has none, and Ollama falls
    back to the template it recognises in the GGUF's metadata)."""
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    stops: list[str] = []
    reason = None
    if template:
        try:
            parts = checked_parts(template, tokenizer)
            lines.append(f"TEMPLATE {_quoted(go_template(parts))}")
            stops += [parts.assistant[1].strip()] if parts.assistant[1].strip() else []
        except ModelError as error:
            reason = str(error)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    return "\n".join(lines) + "\n", reason
