"""GGUF files written tensor by tensor: types, sizes, values read back, nothing half-written."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.models.gguf_write import tensor_type, write_file

T = gguf.GGMLQuantizationType


def _tensors():
    torch.manual_seed(0)
    return [
        ("a.weight", torch.randn(8, 64)),
        ("n.weight", torch.randn(64)),
        ("b.weight", torch.randn(4, 8)),
    ]


def _meta(writer):
    writer.add_string("test.key", "value")


@pytest.mark.parametrize(
    ("dtype", "types"),
    [
        ("f32", [T.F32, T.F32, T.F32]),
        ("f16", [T.F16, T.F32, T.F16]),
        ("bf16", [T.BF16, T.F32, T.BF16]),
        ("q8_0", [T.Q8_0, T.F32, T.F16]),  # rows of 8 values do not fill a 32-value block
    ],
)
def test_types_and_values_read_back(tmp_path, dtype, types):
    path = tmp_path / "m.gguf"
    tensors = _tensors()
    write_file(path, "llama", _meta, tensors, dtype, progress=False)
    reader = gguf.GGUFReader(path)
    assert reader.fields["test.key"].contents() == "value"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert [t.tensor_type for t in reader.tensors] == types
    bound = {"f32": 0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[dtype]
    for (name, tensor), stored in zip(tensors, reader.tensors, strict=True):
        assert stored.name == name
        values = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(tensor.shape)
        assert np.abs(values - tensor.numpy()).max() <= bound * tensor.abs().max().item()


def test_q8_0_is_about_a_quarter_of_f32(tmp_path):
    big = [("w.weight", torch.randn(256, 1024))]
    f32 = write_file(tmp_path / "a.gguf", "llama", _meta, big, "f32", progress=False)
    q8 = write_file(tmp_path / "b.gguf", "llama", _meta, big, "q8_0", progress=False)
    assert 0.26 < q8 / f32 < 0.28  # 34 bytes per 32 values against 128


def test_a_failure_leaves_no_file_behind(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def broken(writer):
        raise RuntimeError("metadata failed")

    with pytest.raises(RuntimeError):
        write_file(path, "llama", broken, _tensors(), "f32", progress=False)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--dtype 'q4': expected one of f32, f16, bf16, q8_0"):
        write_file(tmp_path / "m.gguf", "llama", _meta, _tensors(), "q4", progress=False)
    assert tensor_type("q8_0", (64,)) == T.F32
