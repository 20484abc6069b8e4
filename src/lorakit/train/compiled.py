"""`train.compile`: the decoder blocks' forward and backward compiled by inductor.

What is compiled is each repeated decoder block (the model's `_no_split_modules` classes, e.g.
`LlamaDecoderLayer`), the LoRA layers inside it included; the embedding, the masks, the final
norm and the chunked loss stay eager. Every block of a model runs the same code on parameters
of the same shapes, so dynamo traces and inductor generates code once and all blocks reuse it:
compile time is that of one block, not of the whole model (on the built-in 30-block model
about 30x less), at the cost of no fusion across block boundaries. Shapes are dynamic from
the first call (`dynamic=True`): batches of other lengths or row counts reuse the same code
rather than compiling again.

Inside a compiled block, adapter dropout is torch's dropout, which inductor fuses with the
multiply that follows it (`lora.shared` draws one mask per distinct input in eager mode; under
compile each adapter layer draws its own, peft's rule). The random numbers come from torch's
default generator, reseeded every step, so a run and its resume draw the same masks.

The compiled code is attached only around the training forward (`Compiled.active`); evaluation
and generation run eagerly, so their other shapes (a cache, no autograd) compile nothing.

`auto` compiles on CUDA only: on a CPU the compiled step measured slower than the eager one
(docs/benchmarks.md, "bf16 on an AMX CPU, and train.compile").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config

from lorakit.ops import unwrap_causal_lm

BACKEND = "inductor"  # torch.compile's backend (tests trace with "aot_eager": no code generation)
DYNAMIC = True  # dynamic shapes from the first call (False: one compilation per batch shape)


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """Whether to compile: `setting` when it is a bool; auto: on CUDA only. On a CPU (2 cores,
    AMX, built-in model, bf16, 8 x 256) the compiled step was 1.47x slower than the eager one
    besides its compile time (docs/benchmarks.md), so auto leaves CPUs eager."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda"


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `model`'s decoder (instances of its `_no_split_modules` classes),
    or [] when it names none."""
    lm = unwrap_causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    return [m for m in lm.modules() if type(m).__name__ in names]


class Compiled:
    """The compiled forward of every decoder block; `active()` switches it on."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = decoder_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(unwrap_causal_lm(model)).__name__}: no decoder blocks")
        # Blocks share their code and differ in parameters only, which dynamo passes in as
        # inputs: the first block's trace and generated code serve every block.
        self.functions = [
            torch.compile(b._call_impl, backend=BACKEND, dynamic=DYNAMIC) for b in self.blocks
        ]
        self.first_step_s: float | None = None
        self.counts = compile_counts()  # dynamo's counters are per process: report the change

    def describe(self) -> str:
        """What is compiled, for the run's log."""
        kind = type(self.blocks[0]).__name__
        return f"compile: {len(self.blocks)} x {kind} with inductor (dynamic shapes)"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The blocks run their compiled forward inside (the backward compiled with it)."""
        for block, function in zip(self.blocks, self.functions, strict=True):
            block._compiled_call_impl = function
        try:
            # no shape is assumed equal to another because their first sizes matched (a
            # length equal to the head size would otherwise recompile at the next length)
            with fx_config.patch(use_duck_shape=False):
                yield
        finally:
            for block in self.blocks:
                block._compiled_call_impl = None

    def report(self, step_s: float, last: bool) -> list[str]:
        """The log lines after a step: the first compiled step's time (tracing and code
        generation included), and at the last step what dynamo compiled over the run."""
        lines = []
        if self.first_step_s is None:
            self.first_step_s = step_s
            lines.append(f"compile: first step {step_s:.1f} s (tracing and code generation)")
        if last:
            now = compile_counts()
            graphs, recompiles, breaks = (now[k] - self.counts[k] for k in now)
            lines.append(
                f"compile: {graphs} graphs, {recompiles} recompilations, {breaks} graph breaks "
                "over the run"
            )
        return lines


def compile_counts() -> dict[str, int]:
    """dynamo's counters so far: graphs compiled, recompilations, graph breaks."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": sum(counters["graph_break"].values()),
    }
