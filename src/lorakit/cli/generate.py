"""`lorakit generate` and `lorakit chat`: a base model with zero, one or several adapters, tokens
streamed to the terminal, greedy unless a temperature is given. Adapters on a float32 base are
merged into it first, so each token costs what the base model's does (unmerged, LoRA adds ~30%
a token on the built-in model: docs/benchmarks.md)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lorakit.errors import ConfigError

if TYPE_CHECKING:  # torch loads only when a command runs, not for --help or --version
    import torch
    from torch import nn

    from lorakit.serve.decode import SamplingParams

ADAPTER_HELP = "Adapter dir, or name=dir; repeat for several (all applied, or --weights)."
BaseArg = Annotated[
    str, typer.Argument(metavar="BASE", help="Base model: folder, hub id or built-in alias.")
]
AdaptersOpt = Annotated[list[str] | None, typer.Option(help=ADAPTER_HELP)]
WeightsOpt = Annotated[str | None, typer.Option(help="Combine adapters: 0.7,0.3")]
MaxNewOpt = Annotated[int, typer.Option(min=1)]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        help="0 (the default here): greedy, the same reply every time. The server's API "
        "defaults to 1.0 (OpenAI's default); the web page starts at 0.7."
    ),
]
TopKOpt = Annotated[int, typer.Option(help="0: off.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling.")]


def prepare_model(
    base: str, adapter_specs: list[str], weights: list[float] | None, dtype: str, device: str
) -> tuple[nn.Module, Any, str | None]:
    """(model, tokenizer, chat template): adapters loaded, all active or combined with weights."""
    from lorakit.adapter_specs import parse_adapters
    from lorakit.jobs.evaluation import load_with_adapters
    from lorakit.lora.model import LoraModel
    from lorakit.models import chat_template_of

    adapters = parse_adapters(adapter_specs)
    model, tokenizer = load_with_adapters(base, adapters, dtype, device)
    if isinstance(model, LoraModel):
        names = list(adapters)
        if weights:
            if len(weights) != len(names):
                raise ConfigError(f"--weights: {len(weights)} weights for {len(names)} adapters")
            model.add_weighted_adapter(names, weights, "combined", combination_type="cat")
            names = ["combined"]
        model.set_adapter(names)
    template = getattr(model, "chat_template", None) or chat_template_of(tokenizer)
    if isinstance(model, LoraModel) and _merges_exactly(model):
        model = model.merge_and_unload()  # every token at the base model's speed
    return model, tokenizer, template


def _merges_exactly(model: nn.Module) -> bool:
    """Whether merging the adapters changes generation by fp32 rounding only: every adapted
    weight is float32 and used by its layer alone. A quantized or half-precision weight would
    round W + BA to its own precision, losing small updates, and a tied weight (an output layer
    sharing the input embedding) would first have to be copied (`lora/ties.py`), growing the
    model; such models generate with the adapters unmerged."""
    import torch

    from lorakit.lora.ties import weight_uses

    uses = weight_uses(model)
    for _, layer in model.lora_layers():
        weight = getattr(layer.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
            return False
        if uses[weight.data_ptr()] > 1:
            return False
    return True


class _Streamer:
    """Prints decoded text as tokens arrive (a transformers generate streamer)."""

    def __init__(self, tokenizer: Any, prompt_tokens: int, out=None) -> None:
        self.tokenizer, self.skip, self.out = tokenizer, prompt_tokens, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt (skipped) or a new token."""
        ids = value.reshape(-1).tolist()
        if self.skip:
            self.skip = 0  # the first call carries the prompt
            return
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        """Generation finished."""
        self.out.write("\n")
        self.out.flush()

    def text(self) -> str:
        """Everything generated so far."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def stream_reply(
    model: nn.Module, tokenizer: Any, ids: torch.Tensor, sampling: SamplingParams, out=None
) -> str:
    """Generate from prompt ids (1, T), streaming the text to `out` (stdout); returns it."""
    import torch

    from lorakit.ops import generation_kwargs

    device = next(model.parameters()).device
    ids = ids.to(device)
    streamer = _Streamer(tokenizer, ids.shape[1], out)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling.generate_kwargs(),
            **generation_kwargs(model),
        )
    return streamer.text()


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], template: str | None
) -> torch.Tensor:
    """Prompt ids (1, T) of a conversation ready for the assistant's turn (`prompt_ids`: the
    template, else the tokenizer's, else the plain format)."""
    import torch
    from jinja2 import TemplateError

    from lorakit.models.templates import prompt_ids

    try:
        return torch.tensor([prompt_ids(tokenizer, messages, template)])
    except TemplateError as error:
        raise ConfigError(
            f"the chat template failed on this conversation: {error}; fix the template "
            "(chat_template.jinja of the adapter or the base model) or pass --raw"
        ) from None


def fit_to_context(
    model: nn.Module, tokenizer: Any, ids: torch.Tensor, sampling: SamplingParams
) -> SamplingParams:
    """`sampling` with max_tokens cut to the room the prompt leaves in the model's context;
    a prompt that fills the context on its own is refused."""
    from lorakit.models import context_length

    limit = context_length(model, tokenizer)
    if limit is None:
        return sampling
    if ids.shape[1] >= limit:
        raise ConfigError(
            f"the prompt is {ids.shape[1]:,} tokens (chat template included); this model's "
            f"context is {limit:,} tokens: shorten the prompt (or the chat template)"
        )
    room = limit - ids.shape[1]
    return dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, room))


@dataclass
class Session:
    """What `generate` and `chat` start from: the model with its adapters, its tokenizer and
    chat template, and the sampling settings."""

    model: nn.Module
    tokenizer: Any
    template: str | None
    sampling: SamplingParams


def start_session(
    base: BaseArg,
    adapter: AdaptersOpt = None,
    weights: WeightsOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: float = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: float = 1.0,
    seed: SeedOpt = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Session:
    """The options `generate` and `chat` share, and what they do: the sampling settings checked,
    the seed set, the model loaded with its adapters (`prepare_model`)."""
    import torch

    from lorakit.serve.decode import SamplingParams

    sampling = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )
    torch.manual_seed(seed)
    model, tokenizer, template = prepare_model(base, adapter or [], _floats(weights), dtype, device)
    return Session(model, tokenizer, template, sampling)


def with_session(command: Callable[..., None]) -> Callable[..., None]:
    """A typer command made of `command(session, **its own parameters)`: it takes BASE and the
    command's own arguments, --adapter and --weights, the command's own options, then the rest
    of `start_session`'s options; it starts the session before calling `command`."""
    shared = list(inspect.signature(start_session, eval_str=True).parameters.values())
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    arguments = [p for p in own if p.default is inspect.Parameter.empty]
    own_options = [p for p in own if p.default is not inspect.Parameter.empty]
    params = [shared[0], *arguments, *shared[1:3], *own_options, *shared[3:]]

    def run(**options: Any) -> None:
        session = start_session(**{p.name: options.pop(p.name) for p in shared})
        command(session, **options)

    run.__name__, run.__doc__ = command.__name__, command.__doc__
    run.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    return run


def register_generation(app: typer.Typer) -> None:
    """Add `generate` and `chat` to the app."""

    @app.command()
    @with_session
    def generate(
        session: Session,
        prompt: Annotated[
            str, typer.Argument(metavar="PROMPT", help="The prompt ('-' reads stdin).")
        ],
        raw: Annotated[bool, typer.Option(help="Plain text prompt, no chat template.")] = False,
    ) -> None:
        """Complete one prompt, streaming tokens to the terminal."""
        model, tokenizer = session.model, session.tokenizer
        text = sys.stdin.read() if prompt == "-" else prompt
        if raw:  # the text as it is, as /v1/completions takes it
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        else:
            ids = encode_chat(tokenizer, [{"role": "user", "content": text}], session.template)
        stream_reply(model, tokenizer, ids, fit_to_context(model, tokenizer, ids, session.sampling))

    @app.command()
    @with_session
    def chat(
        session: Session,
        system: Annotated[str | None, typer.Option(help="System message.")] = None,
    ) -> None:
        """Talk with the model; the conversation is kept (/reset clears it, /exit quits)."""
        chat_loop(session.model, session.tokenizer, session.template, session.sampling, system)


def chat_loop(
    model: nn.Module,
    tokenizer: Any,
    template: str | None,
    sampling: SamplingParams,
    system: str | None,
) -> list[dict[str, str]]:
    """Read user turns from stdin until EOF or /exit; returns the conversation."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    typer.echo("chat: type a message; /reset clears the conversation, /exit quits", err=True)
    while True:
        if interactive:
            typer.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return messages
        if line.strip() == "/reset":
            messages = list(start)
            typer.echo("(conversation cleared)", err=True)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = encode_chat(tokenizer, messages, template)
        try:
            fitted = fit_to_context(model, tokenizer, ids, sampling)
        except ConfigError as error:  # the conversation outgrew the context: say so, go on
            messages.pop()
            typer.echo(f"error: {error}; /reset starts a new conversation", err=True)
            continue
        typer.echo("assistant> ", nl=False)
        reply = stream_reply(model, tokenizer, ids, fitted)
        messages.append({"role": "assistant", "content": reply})


def _floats(text: str | None) -> list[float] | None:
    """'0.7,0.3' -> [0.7, 0.3]."""
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: expected comma-separated numbers") from None
