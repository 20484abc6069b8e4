"""`lorakit estimate`: memory per rank of a run config, predicted before any weight is loaded.

The model is built on the meta device from its config.json (and the adapter attached there),
so parameter counts are exact; memory then follows from them and the run's settings. Per rank,
with P frozen base weights, W trainable weights, b = ceil(batch_size / world) rows of T tokens:

    parameters   P * (bytes of the base dtype; quantized layers and a mixture of experts'
                 fused expert tensors 4.13 / 4.5 / 8.06 bits)
                 + W * 4 (fp32 trainable copies); fsdp: / world, plus one gathered block
                 and the root group (embedding, head), which stays gathered after a forward
    gradients    W * 4; fsdp: / world; ddp with world > 1: + 2 * W * 4 (flat all-reduce buffer
                 and the per-parameter copies made from it)
    optimizer    AdamW: 2 * W * 4 (exp_avg, exp_avg_sq); fsdp: / world
    activations  per decoder block, elements saved for backward (frozen linears save no input):
                 2bTh (the two norms' inputs) + 4bTh (attention: q, k, v repeated to all heads,
                 output) + 3bTI (MLP: the gate input, silu(gate), up; a mixture of experts:
                 I = the expert width times the experts per token) + the inputs of adapted
                 linears (bTh for q/k/v together, bTh for o, bTh for gate/up together, bTI for
                 down; full fine-tuning: all four, plus 2bTh norm outputs) + b*heads*T^2 * 2
                 when rows are padded (unpacked: masked attention keeps its probabilities);
                 times the bytes of the compute dtype (4 fp32, 2 bf16/fp16). Gradient
                 checkpointing keeps bTh per block and one block's full set. Plus one block's
                 set for backward's working gradients, and the loss: a chunk of fp32 logits
                 (min(bT, loss_chunk_size) * V * 4), or for a model run whole (fsdp,
                 soft-capped logits) 3 * bT * V * 4.
    runtime      CPU: the Python process itself (torch, transformers and lorakit imported;
                 393 MiB RSS measured with torch 2.13), counted once. CUDA: not counted (the
                 CUDA context, ~0.5 GiB, is outside the allocator's statistics).

These are upper-side estimates for sequences of exactly T tokens; docs/distributed.md compares
them with measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.jobs.run_config import RunConfig

MIB = 2**20
RUNTIME_CPU = 393 * MIB
QUANT_BITS = {"nf4": 4.5, "fp4": 4.5, "int8": 8 + 32 / 1024}  # int8: one fp32 scale per row
DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 8-bit absmax per 64, fp32 per 256 absmax
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}
# Linears that read the same input: the input is saved once for all of them.
INPUT_GROUPS = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "c_attn": "attn",
    "w1": "mlp",
    "w3": "mlp",
}


@dataclass
class ModelShape:
    """What the estimate needs from the model: exact counts from the meta-device build."""

    frozen: int  # frozen float weights
    quantized: int  # frozen weights stored quantized
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    largest_block: int  # parameters of the biggest decoder block
    root: int  # parameters outside the decoder blocks (embedding, norm, head)
    adapted_inputs: int  # per block: summed widths of the distinct inputs adapted linears save
    lora_dropout: bool = False
    softcap: bool = False  # soft-capped logits: the loss runs the whole head at once
    expert_trainable: int = 0  # trainable weights on fused expert (and router) parameters
    expert_quantized: int = 0  # of `quantized`, the weights of fused expert tensors


@dataclass
class MemoryEstimate:
    """Bytes per rank, by part, with how each was reckoned."""

    parts: list[tuple[str, int, str]] = field(default_factory=list)
    settings: str = ""

    @property
    def total(self) -> int:
        """The sum of the parts."""
        return sum(n for _, n, _ in self.parts)

    def table(self) -> str:
        """The estimate as a plain-text table."""
        lines = [self.settings, "", f"{'part':<12} {'MiB':>10}  how"]
        lines += [f"{name:<12} {n / MIB:>10.1f}  {how}" for name, n, how in self.parts]
        lines.append(f"{'total':<12} {self.total / MIB:>10.1f}  per rank")
        return "\n".join(lines)


def model_shape(run: RunConfig) -> ModelShape:
    """Build the run's model (and adapter) on the meta device and count what the estimate uses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.lora import LoraLinear, get_peft_model
    from lorakit.models.loading import resolve_model_path
    from lorakit.quant.experts import expert_targets
    from lorakit.quant.layer import DEFAULT_SKIP, quantization_targets
    from lorakit.train.fsdp import decoder_blocks

    path = resolve_model_path(run.model.name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=run.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantized_names, experts = set(), []
    if run.model.quantization:
        quantized_names = set(quantization_targets(model, run.model.skip or DEFAULT_SKIP))
        experts = expert_targets(model, run.model.skip or DEFAULT_SKIP)
    quantized = sum(model.get_submodule(n).weight.numel() for n in quantized_names)
    expert_quantized = sum(model.get_submodule(m).get_parameter(p).numel() for m, p in experts)
    quantized += expert_quantized
    blocks = decoder_blocks(model)
    if run.method != "full":
        model = get_peft_model(model, run.lora.to_lora_config())
    else:
        model.requires_grad_(True)
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    frozen = sum(p.numel() for p in unique if not p.requires_grad) - quantized
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    adapted: dict[str, int] = {}
    first = blocks[0]
    for name, module in first.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, LoraLinear) or (
            run.method == "full" and isinstance(module, nn.Linear)
        ):
            adapted.setdefault(INPUT_GROUPS.get(leaf, name), _in_features(module))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        expert_trainable=_expert_trainable(model),
        expert_quantized=expert_quantized,
        frozen=frozen,
        quantized=quantized,
        trainable=trainable,
        layers=len(blocks),
        hidden=text.hidden_size,
        intermediate=_mlp_width(text),
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        largest_block=max(block_sizes),
        root=sum(p.numel() for p in unique) - sum(block_sizes),
        adapted_inputs=sum(adapted.values()),
        lora_dropout=run.method != "full" and run.lora.lora_dropout > 0,
        softcap=bool(getattr(text, "final_logit_softcapping", None)),
    )


def _mlp_width(text) -> int:
    """The MLP width a token's activations take: a mixture of experts' expert width times the
    experts each token visits (shared experts aside), else the dense intermediate size."""
    top_k = getattr(text, "num_experts_per_tok", None)
    expert_width = getattr(text, "moe_intermediate_size", None)
    if top_k and (getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)):
        return int(top_k) * int(expert_width or text.intermediate_size)
    return getattr(text, "intermediate_size", 4 * text.hidden_size)


def _expert_trainable(model: nn.Module) -> int:
    """Trainable weights of the LoRA on parameters (`target_parameters`: experts, routers)."""
    from lorakit.lora.params import LoraParams

    total = 0
    for module in model.modules():
        if isinstance(module, LoraParams):
            total += sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total


def _in_features(module: nn.Module) -> int:
    base = getattr(module, "base_layer", module)
    return int(getattr(base, "in_features", 0) or base.weight.shape[-1])


def compute_precision(run: RunConfig) -> str:
    """The precision the loop would use: 'auto' is bf16 on CUDA, the CPU's choice otherwise."""
    from lorakit.train.runtime import resolve_precision

    precision = run.train.precision
    device = run.train.device
    if precision != "auto":
        return precision
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "bf16"
    return resolve_precision("auto", torch.device("cpu"))


def estimate_memory(run: RunConfig, world_size: int = 1) -> MemoryEstimate:
    """Memory per rank of `run` at `world_size` processes (see the module docstring)."""
    if world_size < 1:
        raise ConfigError(f"estimate: world size {world_size}; expected 1 or more processes")
    shape = model_shape(run)
    return estimate_from_shape(run, shape, world_size)


def estimate_from_shape(run: RunConfig, s: ModelShape, world_size: int) -> MemoryEstimate:
    """The arithmetic of `estimate_memory` on counts already taken."""
    train, data = run.train, run.data
    fsdp = train.distributed == "fsdp"  # lora on a float base (the run config checks it)
    shard = world_size if fsdp else 1
    precision = compute_precision(run)
    act_bytes = 4 if precision == "fp32" else 2
    base_bytes = DTYPE_BYTES[run.model.dtype]
    if train.base_dtype == "bf16" or (
        train.base_dtype == "auto" and precision == "bf16" and run.method != "full"
    ):
        base_bytes = 2
    train_bytes = 4 if run.method != "full" else DTYPE_BYTES[run.model.dtype]
    bits = QUANT_BITS.get(run.model.quantization or "", 0.0)
    if run.model.quantization in ("nf4", "fp4") and run.model.double_quant:
        bits = DOUBLE_QUANT_BITS

    frozen = s.frozen * base_bytes + s.quantized * bits / 8
    params = (frozen + s.trainable * train_bytes) / shard
    how = f"{s.frozen:,} frozen x {base_bytes} B"
    how += f" + {s.quantized:,} at {bits:.2f} bits" if s.quantized else ""
    how += f" ({s.expert_quantized:,} in experts)" if s.expert_quantized else ""
    how += f" + {s.trainable:,} trainable x {train_bytes} B"
    how += f" ({s.expert_trainable:,} on expert parameters)" if s.expert_trainable else ""
    parts = [("parameters", params, how + (f", / {world_size} ranks" if fsdp else ""))]
    if fsdp:
        gather_bytes = base_bytes if precision == "fp32" else 2  # MixedPrecisionPolicy's dtype
        gathered = (s.largest_block + s.root) * gather_bytes
        parts.append(("fsdp gather", gathered, "one decoder block + the root group, whole"))
    grads = s.trainable * train_bytes / shard
    parts.append(("gradients", grads, f"{s.trainable:,} x {train_bytes} B"))
    if not fsdp and world_size > 1:
        parts.append(("all-reduce", 2 * s.trainable * 4, "flat buffer + per-parameter copies"))
    parts.append(("optimizer", 2 * s.trainable * 4 / shard, "AdamW: exp_avg + exp_avg_sq, fp32"))

    rows, length = math.ceil(train.batch_size / world_size), data.max_length
    bt, h, inter = rows * length, s.hidden, s.intermediate
    per_block = 6 * bt * h + 3 * bt * inter + bt * s.adapted_inputs
    if run.method == "full":
        per_block += 2 * bt * h
    if not data.packing:
        per_block += 2 * rows * s.heads * length * length
    per_block *= act_bytes
    if s.lora_dropout:
        per_block += bt * s.adapted_inputs  # one byte per kept/dropped mask entry
    if train.gradient_checkpointing:
        saved = s.layers * bt * h * act_bytes + per_block
        how = f"checkpointed: {s.layers} block inputs + one block's set"
    else:
        saved = s.layers * per_block
        how = f"{s.layers} blocks x {per_block / MIB:.1f} MiB"
    whole = fsdp or s.softcap
    loss = 3 * bt * s.vocab * 4 if whole else min(bt, train.loss_chunk_size) * s.vocab * 4
    parts.append(("activations", saved + per_block, how + " + one block's working gradients"))
    parts.append(("loss", loss, "fp32 logits of the whole batch" if whole else "one fp32 chunk"))
    device = train.device
    if not device.startswith("cuda") and not (device == "auto" and torch.cuda.is_available()):
        parts.append(("runtime", RUNTIME_CPU, "the Python process (torch, transformers imported)"))
    settings = (
        f"{run.model.name_or_path}: method={run.method}, precision={precision}, "
        f"{world_size} process(es), distributed={train.distributed}, rows per rank={rows}, "
        f"max_length={length}, gradient_checkpointing={train.gradient_checkpointing}"
    )
    return MemoryEstimate([(n, int(b), w) for n, b, w in parts], settings)
