"""FSDP2 for adapter training: the frozen base sharded over ranks with PyTorch's `fully_shard`.

Order (`shard_model`): the adapter is already attached; every rank starts from rank 0's
adapter (broadcast); each decoder block is `fully_shard`-ed, then the causal LM as the root, so
the embedding, final norm and output head form the root's group. Each parameter, frozen or
trained, is then a DTensor holding 1/world of its rows (dim 0, `torch.chunk` split).

Gradients: the loop normalises each rank's loss by the supervised tokens of the whole global
batch, so the gradient is the *sum* over ranks. FSDP's reduce-scatter averages by default; it is
told to sum (`set_gradient_divide_factor(1.0)` with `set_force_sum_reduction_for_comms(True)`,
which also keeps gloo working: gloo has no PREMUL_SUM, the op FSDP uses for a divide factor).

Checkpoints stay gathered (`gathered`): inside the context every trainable parameter and its
optimizer state are whole tensors on every rank, so the checkpoint and adapter files are the
ones a single process writes, and on exit whatever was loaded into them is cut back into this
rank's shards. An adapter and its AdamW state are small (tens of MB for a 7B model), which is
why gathering is preferred to `torch.distributed.checkpoint`'s per-rank files: one format for
1, N or M processes, and resume at another world size reads the same files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.ops import unwrap_causal_lm
from lorakit.train.runtime import Dist

MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_shardable(model: nn.Module, precision: str) -> None:
    """Refuse what fsdp does not run here: quantized bases, full fine-tuning, fp16."""
    from lorakit.quant import QuantExperts, QuantLinear

    if precision == "fp16":
        raise ConfigError(
            "train.distributed='fsdp' with precision='fp16' is not supported by lorakit: fp16 "
            "needs loss scaling, whose unscale step lorakit does not run on sharded gradients. "
            "Use precision='bf16' (no loss scaling), or train.distributed='ddp'"
        )

    quantized_experts = any(isinstance(p, QuantExperts) for p in model.parameters())
    if quantized_experts or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError(
            "train.distributed='fsdp' with a quantized base (model.quantization nf4/int8) is not "
            "supported by lorakit: QuantLinear keeps its codes and scales as packed uint8/int8 "
            "buffers, not parameters, and FSDP2 shards parameters only, so each rank would hold "
            "the whole quantized base anyway. Use train.distributed='ddp' (the quantized base "
            "replicated per rank), or fsdp without model.quantization"
        )
    if all(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "train.distributed='fsdp' with method=full is not supported by lorakit: checkpoints "
            "under fsdp gather the trainable tensors on every rank, which for a whole model is "
            "the memory fsdp saves. Use method=lora, or train.distributed='ddp'"
        )


def decoder_blocks(lm: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a Hugging Face causal LM (`model.layers`, `transformer.h`)."""
    decoder = getattr(lm, "base_model", lm)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    raise ConfigError(
        f"found no decoder blocks in {type(lm).__name__} (looked for model.layers, "
        "transformer.h, blocks), which train.distributed='fsdp' shards one by one; use "
        "train.distributed='ddp' for this model"
    )


def shard_model(
    model: nn.Module, ctx: Dist, device: torch.device, precision: str, cpu_offload: bool
) -> None:
    """Shard `model` in place with FSDP2: each decoder block, then the causal LM as the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    if ctx.world_size > 1:  # every rank starts from rank 0's adapter (before it is cut up)
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    # param_dtype: what the all-gather hands to compute; gradients are reduced in fp32
    policy = MixedPrecisionPolicy(
        param_dtype=MIXED_DTYPES.get(precision), reduce_dtype=torch.float32
    )
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh and NCCL use the current device
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    lm = unwrap_causal_lm(model)
    options = {"mesh": mesh, "mp_policy": policy, "offload_policy": offload}
    for block in decoder_blocks(lm):
        fully_shard(block, **options)
    fully_shard(lm, **options)
    for module in lm.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: nn.Module) -> bool:
    """True when `model` holds FSDP2-sharded parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module registering parameter `name` and the parameter's own name there."""
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _local_part(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's rows of a whole tensor, cut as the DTensor `like` is cut (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def gathered(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Inside: every trainable parameter (and its optimizer state) is a whole tensor on every
    rank; on exit, what was written into them is cut back into this rank's shards.

    Every rank must enter together (the gather is a collective). No forward may run inside.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not is_sharded(model):
        yield
        return
    for module in model.modules():  # the root keeps its group gathered after a forward
        if isinstance(module, FSDPModule):
            module.reshard()
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if p.requires_grad and isinstance(p, DTensor):
            owner, leaf = _owner(model, name)
            full = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
            owner._parameters[leaf] = full
            swapped.append((owner, leaf, p, full))
    for state in optimizer.state.values() if optimizer is not None else ():
        for key, value in state.items():
            if isinstance(value, DTensor):
                state[key] = value.full_tensor()
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, leaf, shard, full in swapped:
                shard.to_local().copy_(_local_part(full.detach(), shard).to_local())
                owner._parameters[leaf] = shard
            # read again: optimizer.load_state_dict inside the context replaces the dict
            for param, state in optimizer.state.items() if optimizer is not None else ():
                for key, value in state.items():
                    whole = isinstance(param, DTensor) and not isinstance(value, DTensor)
                    if whole and value.shape == param.shape:  # moments; 'step' stays a scalar
                        state[key] = _local_part(value, param)


def check_micro_batches(count: int, ctx: Dist, step: int) -> None:
    """Under fsdp every rank must run the same number of forward passes (each gathers shards);
    a micro-batch with fewer rows than ranks leaves some rank without one."""
    import torch.distributed as dist

    if ctx.world_size <= 1:
        return
    counts = torch.tensor([count, -count], dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if most != fewest:
        from lorakit.errors import DataError

        raise DataError(
            f"step {step + 1}: under train.distributed='fsdp' the ranks got {fewest} to {most} "
            f"micro-batches; each of the {ctx.world_size} ranks needs rows in every micro-batch. "
            f"Raise train.batch_size to at least {ctx.world_size} rows per micro-batch"
        )
