"""Quantized weight storage as plain tensors: int8 rows, NF4 / FP4 blocks, double quantization.

The modules built on these functions live in `lorakit.quant`; the math is stated there once.
Everything here is pure PyTorch and runs on any device; bitsandbytes, when installed and the
tensors are on CUDA, only replaces the 4-bit NF4 table lookup (`dequantize_4bit`).
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F

BLOCK = 64  # 4-bit weights: one absmax per 64 consecutive weights (row-major)
ABSMAX_BLOCK = 256  # double quantization: one fp32 scale per 256 absmax values
INT8_MAX = 127
CHUNK = 1 << 20  # weights quantized per step: the temporaries stay ~30 MB for any layer size

# The 16 NF4 code values, ascending, as published in the QLoRA paper (Dettmers et al. 2023,
# appendix E): quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 is E2M1 (1 sign, 2 exponent, 1 mantissa bit): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6,
# divided by 6 so the largest is 1. Code = sign << 3 | magnitude index.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = tuple(m / 6.0 for m in _E2M1) + tuple(-m / 6.0 for m in _E2M1)

FOUR_BIT_TABLES = {"nf4": NF4_VALUES, "fp4": FP4_VALUES}


def code_table(method: str, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 16 code values of a 4-bit method ("nf4" or "fp4"), indexed by code."""
    return torch.tensor(FOUR_BIT_TABLES[method], dtype=dtype, device=device)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 codes (out, in), fp32 row absmax (out,)), CHUNK at a time."""
    w = weight.detach()
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    absmax = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    rows = max(1, CHUNK // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        part = w[start : start + rows].float()
        part_absmax = part.abs().amax(dim=1)  # (rows,)
        scale = part_absmax.clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
        part_codes = torch.round(part / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        codes[start : start + rows] = part_codes.to(torch.int8)
        absmax[start : start + rows] = part_absmax
    return codes, absmax


def dequantize_int8_rows(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype):
    """int8 codes (out, in) and row absmax (out,) -> weight (out, in) in `dtype`."""
    return codes.to(dtype) * (absmax / INT8_MAX).to(dtype)[:, None]


def padded_blocks(numel: int, block: int = BLOCK) -> int:
    """Number of blocks of `block` values that cover `numel` values (the last one zero-padded)."""
    return -(-numel // block)


def quantize_4bit(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight -> (packed uint8 codes (blocks * 32,), fp32 block absmax (blocks,)).

    Blocks are independent, so they are quantized CHUNK weights at a time: the temporaries
    (~30 bytes a weight) stay bounded whatever the size of the weight.
    """
    flat = weight.detach().reshape(-1)
    blocks = padded_blocks(flat.numel())
    table = code_table(method, device=flat.device)
    order = torch.argsort(table)
    ascending = table[order]
    midpoints = (ascending[1:] + ascending[:-1]) / 2
    packed = torch.empty(blocks * BLOCK // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    for start in range(0, blocks * BLOCK, CHUNK):  # CHUNK is a multiple of BLOCK
        part = flat[start : start + CHUNK].float()
        part = F.pad(part, (0, padded_blocks(part.numel()) * BLOCK - part.numel()))
        values = part.view(-1, BLOCK)  # (blocks in this chunk, 64)
        part_absmax = values.abs().amax(dim=1)
        scaled = values / part_absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        nearest = torch.bucketize(scaled.reshape(-1), midpoints)  # index into `ascending`
        packed[start // 2 : (start + part.numel()) // 2] = pack_4bit(order[nearest].to(torch.uint8))
        absmax[start // BLOCK : start // BLOCK + values.shape[0]] = part_absmax
    return packed, absmax


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble: (2k,) -> (k,) uint8."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_4bit`: (k,) uint8 -> (2k,) uint8 codes."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


def pair_table(method: str, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(256, 2) table: byte b -> (value of its high nibble, value of its low nibble)."""
    table = code_table(method, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([table[byte >> 4], table[byte & 0x0F]], dim=1).to(dtype)


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, method: str, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed codes and fp32 block absmax -> the first `numel` weights, flat, in `dtype`."""
    fast = _bitsandbytes_dequantize(packed, absmax, method, dtype)
    if fast is not None:
        return fast[:numel]
    # One lookup per byte gives both weights of the byte in the compute dtype.
    pairs = pair_table(method, dtype, packed.device)
    values = F.embedding(packed.long(), pairs)  # (blocks * 32, 2)
    values = values.view(-1, BLOCK).mul_(absmax.to(dtype)[:, None])  # (blocks, 64)
    return values.view(-1)[:numel]


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 block absmax (n,) -> (int8 codes (n,), fp32 scales (ceil(n/256),), fp32 offset ())."""
    offset = absmax.float().mean()
    centred = absmax.float() - offset
    groups = padded_blocks(centred.numel(), ABSMAX_BLOCK)
    padded = F.pad(centred, (0, groups * ABSMAX_BLOCK - centred.numel()))
    grouped = padded.view(groups, ABSMAX_BLOCK)
    scale = grouped.abs().amax(dim=1)  # (groups,)
    step = scale.clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    codes = torch.round(grouped / step[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes.reshape(-1)[: absmax.numel()].contiguous(), scale, offset


def double_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Inverse of `double_quantize`: the fp32 block absmax (n,), clamped at zero."""
    count = codes.numel()
    padded = F.pad(codes.float(), (0, scale.numel() * ABSMAX_BLOCK - count))
    centred = padded.view(-1, ABSMAX_BLOCK) * (scale.float() / INT8_MAX)[:, None]
    return (centred.reshape(-1)[:count] + offset.float()).clamp_(min=0.0)


@functools.cache
def bitsandbytes_module() -> ModuleType | None:
    """`bitsandbytes.functional` when bitsandbytes imports and CUDA is available, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception:  # not installed, or installed without a usable CUDA build
        return None
    return bnb_functional


def _bitsandbytes_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, method: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """NF4 dequantization by bitsandbytes' CUDA kernel, or None where that path does not apply.

    Our NF4 table and nibble order (first code in the high nibble) are bitsandbytes' too; our
    FP4 table is plain E2M1 and differs from theirs, so FP4 always takes the PyTorch path.
    """
    if method != "nf4" or not packed.is_cuda or dtype not in (torch.float16, torch.bfloat16):
        return None
    bnb_functional = bitsandbytes_module()
    if bnb_functional is None:
        return None
    out = torch.empty(packed.numel() * 2, dtype=dtype, device=packed.device)
    try:
        bnb_functional.dequantize_4bit(
            packed.view(-1, 1), absmax=absmax.float(), out=out, blocksize=BLOCK, quant_type="nf4"
        )
    except (TypeError, ValueError, RuntimeError, AssertionError, AttributeError) as err:
        # This path has not been run on a GPU by lorakit's tests: fall back, loudly, on any
        # API mismatch with the installed bitsandbytes.
        warnings.warn(
            f"bitsandbytes NF4 dequantization failed ({err!r}); using the PyTorch path",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return out
