"""Tests for lowbitdm_cli.export.packing (dense little-endian bit packing)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbitdm_cli.export.packing import (
    pack,
    pack_mixed,
    packed_nbytes,
    packed_nbytes_mixed,
    unpack,
    unpack_mixed,
)

BITS = list(range(1, 9))
SHAPES = [(1,), (7,), (13,), (1001,), (3, 5, 7), (2, 1, 9)]


def _codes(shape: tuple[int, ...], bits: int, seed: int = 0, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_round_trip(bits: int, shape: tuple[int, ...]) -> None:
    values = _codes(shape, bits, seed=bits)
    packed = pack(values, bits)
    n = values.numel()
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.uint8 and out.shape == (n,)
    assert torch.equal(out.reshape(shape), values.to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_input_dtypes_and_extremes(dtype: torch.dtype) -> None:
    values = torch.tensor([0, 7, 7, 0, 7], dtype=dtype)
    assert torch.equal(unpack(pack(values, 3), 3, 5), values.to(torch.uint8))


def test_non_contiguous_input_is_row_major() -> None:
    values = _codes((6, 5), 4).t()  # non-contiguous view
    assert torch.equal(unpack(pack(values, 4), 4, 30), values.reshape(-1).to(torch.uint8))


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        # b=1: bits LSB first: 1,0,1,1,0,0,0,1 -> 0b10001101; 9th code alone in byte 1.
        (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0x8D, 0x01]),
        # b=2: 1 | 2<<2 | 3<<4 = 0b00_11_10_01.
        (2, [1, 2, 3], [0x39]),
        # b=2: 3 | 0<<2 | 1<<4 | 2<<6 = 0b10_01_00_11; fifth code 1 -> byte 1.
        (2, [3, 0, 1, 2, 1], [0x93, 0x01]),
        # b=3: 5=101 -> stream bits 0..2 = 1,0,1; 3=011 -> bits 3..5 = 1,1,0;
        # 7=111 -> bits 6..8 = 1,1,1.  byte 0 (bit7..bit0) = 1 1 0 1 1 1 0 1 = 0xDD, byte 1 = 0x01.
        (3, [5, 3, 7], [0xDD, 0x01]),
        # b=3: 0..7 fill exactly 3 bytes: stream = sum i<<(3i) = 0xFAC688 -> 88 C6 FA.
        (3, list(range(8)), [0x88, 0xC6, 0xFA]),
        # b=4: element 0 in the low nibble.
        (4, [1, 2, 3], [0x21, 0x03]),
        # b=5: 31 | 1<<5 = 0x3F, 10 bits -> 2 bytes, the second all padding.
        (5, [31, 1], [0x3F, 0x00]),
        (8, [0, 200, 255], [0x00, 0xC8, 0xFF]),
    ],
    ids=["b1", "b2", "b2-pad", "b3", "b3-block", "b4", "b5", "b8"],
)
def test_byte_layout(bits: int, codes: list[int], expected: list[int]) -> None:
    packed = pack(torch.tensor(codes), bits)
    assert packed.tolist() == expected
    assert unpack(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize(
    ("numel", "bits", "nbytes"), [(0, 3, 0), (1, 1, 1), (8, 3, 3), (9, 3, 4), (7, 8, 7), (3, 6, 3)]
)
def test_packed_nbytes(numel: int, bits: int, nbytes: int) -> None:
    assert packed_nbytes(numel, bits) == nbytes


def test_empty() -> None:
    packed = pack(torch.zeros(0, dtype=torch.int64), 5)
    assert packed.numel() == 0
    assert unpack(packed, 5, 0).numel() == 0


@pytest.mark.parametrize(
    ("rows", "k"), [(1, 1), (5, 7), (16, 13), (9, 64)], ids=["1x1", "5x7", "16x13", "9x64"]
)
def test_mixed_round_trip(rows: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows * 100 + k)
    bits = torch.randint(1, 9, (rows,), generator=g)
    values = (torch.randint(0, 256, (rows, k), generator=g) % (1 << bits)[:, None]).to(torch.int32)
    packed = pack_mixed(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(k * int(bits.sum()) / 8) == packed_nbytes_mixed(bits, k)
    out = unpack_mixed(packed, bits, k)
    assert out.dtype == torch.uint8 and out.shape == (rows, k)
    assert torch.equal(out, values.to(torch.uint8))


def test_mixed_layout() -> None:
    # Row 0: 4-bit [1, 2, 3] -> stream bits 0..11; row 1: 2-bit [3, 0, 1] -> bits 12..17.
    # stream = 1 | 2<<4 | 3<<8 | 3<<12 | 0<<14 | 1<<16 = 0x13321 -> bytes 21 33 01.
    values = torch.tensor([[1, 2, 3], [3, 0, 1]])
    packed = pack_mixed(values, [4, 2])
    assert packed.tolist() == [0x21, 0x33, 0x01]
    assert torch.equal(unpack_mixed(packed, [4, 2], 3), values.to(torch.uint8))


@pytest.mark.parametrize("bits", [1, 3, 8], ids=lambda b: f"b{b}")
def test_mixed_uniform_matches_pack(bits: int) -> None:
    values = _codes((4, 11), bits)
    assert torch.equal(pack_mixed(values, [bits] * 4), pack(values, bits))


@pytest.mark.parametrize(
    ("codes", "bits"),
    [([16], 4), ([-1], 4), ([4, 0], 2), ([256], 8), ([2], 1)],
    ids=["b4-16", "neg", "b2-4", "b8-256", "b1-2"],
)
def test_out_of_range_codes_raise(codes: list[int], bits: int) -> None:
    with pytest.raises(ValueError):
        pack(torch.tensor(codes), bits)


@pytest.mark.parametrize("bits", [0, 9, -1], ids=lambda b: f"b{b}")
def test_bad_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError):
        pack(torch.tensor([0]), bits)
    with pytest.raises(ValueError):
        packed_nbytes(4, bits)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        pack(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)  # needs 4 bytes
    with pytest.raises(ValueError):
        unpack(torch.zeros(4, dtype=torch.int32), 4, 7)
    with pytest.raises(ValueError):
        pack_mixed(torch.tensor([[1, 255], [0, 4]]), [8, 2])  # 4 does not fit row 1 (2 bits)
    with pytest.raises(ValueError):
        pack_mixed(torch.tensor([[1, 1]]), [2, 2])  # wrong number of rows
    with pytest.raises(ValueError):
        pack_mixed(torch.tensor([[1, 1]]), [9])
    with pytest.raises(ValueError):
        unpack_mixed(torch.zeros(2, dtype=torch.uint8), [4, 2], 3)  # needs 3 bytes
