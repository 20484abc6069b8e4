"""Writing GGUF files with the `gguf` package: metadata first, then the tensors one at a time
(converted to the file's type as they are written, so the file is never held in memory twice),
under a temporary name that is renamed to the final one only when everything is on disk.

Types (`--dtype`): f32; f16 and bf16 (matrices; 1-D tensors such as norms stay f32, as
llama.cpp's converters keep them); q8_0 (matrices whose rows are a multiple of 32 values, in
llama.cpp's 8-bit blocks; other matrices f16).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import ConfigError
from lorakit.files import fsync_path, temporary_name

DTYPES = ("f32", "f16", "bf16", "q8_0")
_Q8_BLOCK = 32


def _gguf():
    import gguf

    return gguf


def file_type(dtype: str) -> int:
    """llama.cpp's `general.file_type` for a --dtype."""
    check_dtype(dtype)
    kinds = _gguf().LlamaFileType
    return {
        "f32": kinds.ALL_F32,
        "f16": kinds.MOSTLY_F16,
        "bf16": kinds.MOSTLY_BF16,
        "q8_0": kinds.MOSTLY_Q8_0,
    }[dtype]


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def tensor_type(dtype: str, shape: Sequence[int]) -> Any:
    """The GGML type a tensor of `shape` (torch order) gets in a file of `dtype`."""
    types = _gguf().GGMLQuantizationType
    if dtype == "f32" or len(shape) < 2:
        return types.F32
    if dtype == "q8_0" and shape[-1] % _Q8_BLOCK == 0:
        return types.Q8_0
    return types.BF16 if dtype == "bf16" else types.F16


def encode(tensor: torch.Tensor, kind: Any) -> np.ndarray:
    """A tensor as the numpy array the writer stores for GGML type `kind`."""
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    data = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    if kind == types.F32:
        return data
    if kind == types.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, kind)


def _nbytes(shape: Sequence[int], kind: Any) -> int:
    return int(np.prod(_gguf().quants.quant_shape_to_byte_shape(tuple(shape), kind)))


def write_file(
    path: Path,
    arch: str,
    metadata: Callable[[Any], None],
    tensors: list[tuple[str, torch.Tensor]],
    dtype: str,
    *,
    progress: bool = True,
) -> int:
    """Write a GGUF file of `arch` to `path`: `metadata(writer)` adds the key-value pairs, then
    `tensors` ((name, tensor) in llama.cpp's names and layouts) are written as `dtype`. The file
    appears under `path` only when complete; returns its size in bytes."""
    gguf = _gguf()
    check_dtype(dtype)
    path = Path(path)
    tmp = path.parent / temporary_name(path.name)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        metadata(writer)
        kinds = [tensor_type(dtype, t.shape) for _, t in tensors]
        for (name, tensor), kind in zip(tensors, kinds, strict=True):
            dt = np.float16 if kind == gguf.GGMLQuantizationType.F16 else np.float32
            plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            raw = None if kind in plain else kind
            nbytes = _nbytes(tensor.shape, kind)
            writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(dt), nbytes, raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, tensors, kinds, path.name, progress)
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _write_tensors(writer: Any, tensors: list, kinds: list, label: str, progress: bool) -> None:
    total = len(tensors)
    last = time.monotonic()
    for index, ((_, tensor), kind) in enumerate(zip(tensors, kinds, strict=True), start=1):
        writer.write_tensor_data(encode(tensor, kind))
        if progress and (time.monotonic() - last > 2.0 or index == total) and total > 1:
            last = time.monotonic()
            print(f"lorakit: {label}: {index}/{total} tensors written", file=sys.stderr)


def _umask() -> int:
    from lorakit.files import current_umask

    return current_umask()
