"""lorakit.quant.codes: the NF4 and FP4 tables, int8 rows, 4-bit blocks and packing, double
quantization, and bitsandbytes' NF4 kernel against the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant import codes as qc

# The NF4 values as printed in the QLoRA paper, appendix E (Dettmers et al., 2023).
PAPER_NF4 = [
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
]


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def test_nf4_table_is_the_papers():
    assert list(qc.NF4_VALUES) == PAPER_NF4
    assert qc.code_table("nf4").tolist() == pytest.approx(PAPER_NF4, abs=0)


def test_fp4_table_is_e2m1_scaled_to_one():
    # E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 over 6; code 8+k is the negative of code k.
    table = qc.code_table("fp4")
    assert table[:8].tolist() == pytest.approx([0, 1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])
    assert torch.equal(table[8:], -table[:8])


def test_pack_puts_first_code_in_high_nibble_and_unpacks():
    codes = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    packed = qc.pack_4bit(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x79]
    assert torch.equal(qc.unpack_4bit(packed), codes)


def test_quantize_4bit_picks_the_nearest_code():
    # One block whose absmax is 1: every value lands on its nearest table entry.
    table = qc.code_table("nf4")
    values = torch.cat([table, table[:-1] + 0.3 * (table[1:] - table[:-1])])  # 31 values
    values = torch.cat([values, torch.zeros(64 - values.numel())])
    packed, absmax = qc.quantize_4bit(values, "nf4")
    assert absmax.tolist() == [1.0]
    expected = torch.cat([torch.arange(16), torch.arange(15), torch.full((33,), 7)])
    assert torch.equal(qc.unpack_4bit(packed).long(), expected)


def test_double_quant_absmax_error_is_small():
    # Centred absmaxes of 64-blocks of N(0,1) span about +-1, so one int8 step is ~1/127 and the
    # rounding error rms ~ 1 / 127 / sqrt(12) = 0.0023, against absmaxes of ~2.4: ~0.1 %.
    _, absmax = qc.quantize_4bit(torch.randn(1024 * 256), "nf4")
    restored = qc.double_dequantize(*qc.double_quantize(absmax))
    assert rms(restored - absmax) / absmax.mean().item() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_chunks_changes_nothing(monkeypatch, dtype):
    # Blocks (4-bit) and rows (int8) are independent: chunk boundaries cannot move a code.
    weight = torch.randn(37, 301, dtype=dtype)  # 11,137 weights: a partial last block and chunk
    whole = [qc.quantize_4bit(weight, "nf4"), qc.quantize_int8_rows(weight)]
    monkeypatch.setattr(qc, "CHUNK", 5 * qc.BLOCK)  # 320 weights; int8: one row per chunk
    chunked = [qc.quantize_4bit(weight, "nf4"), qc.quantize_int8_rows(weight)]
    for ours, theirs in zip(chunked, whole, strict=True):
        assert all(
            torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ours, theirs, strict=True)
        )


@pytest.mark.gpu
@pytest.mark.skipif(qc.bitsandbytes_module() is None, reason="needs CUDA and bitsandbytes")
def test_bitsandbytes_nf4_agrees_with_pytorch():
    weight = torch.randn(256, 1024, device="cuda")
    packed, absmax = qc.quantize_4bit(weight, "nf4")
    fast = qc.dequantize_4bit(packed, absmax, "nf4", weight.numel(), torch.bfloat16)
    pairs = qc.pair_table("nf4", torch.float32, "cuda")
    slow = (pairs[packed.long()].view(-1, 64) * absmax[:, None]).view(-1)
    # Both compute table value * absmax; only the final bf16 rounding (2^-9 relative) differs.
    torch.testing.assert_close(fast.float(), slow, rtol=2**-8, atol=1e-6)


def test_int8_rows_round_to_the_nearest_step_of_the_row_absmax():
    weight = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]])
    codes, absmax = qc.quantize_int8_rows(weight)
    assert absmax.tolist() == [1.0, 0.0, 254.0]
    # code = round(w * 127 / absmax), halves to even: -0.5 * 127 = -63.5 -> -64,
    # 0.25 * 127 = 31.75 -> 32; 127 * 127 / 254 = 63.5 -> 64, 1 * 127 / 254 = 0.5 -> 0.
    # An all-zero row keeps zero codes (its scale is clamped above zero, not divided by 0).
    assert codes.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]
    assert codes.dtype == torch.int8
    restored = qc.dequantize_int8_rows(codes, absmax, torch.float32)
    # code * absmax / 127: -64 / 127 = -0.50394, 32 / 127 = 0.25197, 64 * 254 / 127 = 128
    expected = [[1.0, -64 / 127, 32 / 127], [0.0, 0.0, 0.0], [-254.0, 128.0, 0.0]]
    torch.testing.assert_close(restored, torch.tensor(expected), rtol=1e-6, atol=0)


def test_padded_blocks_round_up():
    assert [qc.padded_blocks(n) for n in (0, 1, 64, 65, 128)] == [0, 1, 1, 2, 2]
    assert qc.padded_blocks(300, qc.ABSMAX_BLOCK) == 2  # 256 + 44


def test_fp4_block_packs_and_dequantizes_exactly():
    # absmax 2 scales the block to [1, -1, 0.5]: FP4 codes 7 (6/6), 15 (-6/6) and 5 (3/6);
    # the 61 zero-padded values take code 0. Packed two a byte, first code high:
    # 7 << 4 | 15 = 0x7F, 5 << 4 | 0 = 0x50, then zero bytes.
    packed, absmax = qc.quantize_4bit(torch.tensor([2.0, -2.0, 1.0]), "fp4")
    assert absmax.tolist() == [2.0] and packed.numel() == 32
    assert packed[:3].tolist() == [0x7F, 0x50, 0] and not packed[3:].any()
    restored = qc.dequantize_4bit(packed, absmax, "fp4", 3, torch.float32)
    assert restored.tolist() == [2.0, -2.0, 1.0]  # these values sit on the table
    # the lookup table by byte: 0x7F -> (code 7, code 15) of NF4 = (0.0, 1.0)
    assert qc.pair_table("nf4", torch.float32)[0x7F].tolist() == [0.0, 1.0]


def test_double_quantization_of_a_few_absmaxes():
    codes, scale, offset = qc.double_quantize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    # offset = mean = 3; centred -2, -1, 0, 3; scale = max |centred| = 3, so one code step is
    # 3 / 127 and the codes are round(-2 * 127 / 3 = -84.67) = -85, round(-42.33) = -42, 0, 127
    assert offset.item() == 3.0 and scale.tolist() == [3.0]
    assert codes.tolist() == [-85, -42, 0, 127]
    restored = qc.double_dequantize(codes, scale, offset)
    # -85 * 3 / 127 + 3 = 0.99213, -42 * 3 / 127 + 3 = 2.00787
    assert restored.tolist() == pytest.approx([3 - 255 / 127, 3 - 126 / 127, 3.0, 6.0], rel=1e-6)
