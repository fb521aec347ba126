"""Dense little-endian bit packing of 1..8-bit unsigned integer codes into uint8 streams."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pack", "unpack", "packed_nbytes", "pack_mixed", "unpack_mixed", "packed_nbytes_mixed"]

# Layout: element i occupies stream bits [i*b, i*b + b), least significant bit first, and
# stream bit j is bit (j % 8) of byte j // 8.  Eight b-bit codes therefore fill exactly b
# bytes, which is the block the uniform packer works on (one int64 word per block).


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return bits


def _check_codes(values: Tensor, max_code: int | Tensor) -> None:
    """Raise ValueError unless ``values`` is an integer tensor within [0, max_code]."""
    if not isinstance(values, Tensor):
        raise ValueError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.is_floating_point() or values.is_complex():
        raise ValueError(f"values must have an integer dtype, got {values.dtype}")
    if values.numel() == 0:
        return
    if values.dtype == torch.bool:
        return
    if bool((values < 0).any()) or bool((values > max_code).any()):
        lo, hi = int(values.min()), int(values.max())
        raise ValueError(f"codes out of range for the bit width: found values in [{lo}, {hi}]")


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes of the packed stream of ``numel`` codes of ``bits`` bits each."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def pack(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit codes (any shape, row-major) into a 1-D uint8 bitstream."""
    _check_bits(bits)
    _check_codes(values, (1 << bits) - 1)
    flat = values.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    nblocks = (n + 7) // 8
    padded = torch.zeros(nblocks * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    blocks = padded.view(nblocks, 8)
    word = torch.zeros(nblocks, dtype=torch.int64, device=flat.device)
    for i in range(8):
        word |= blocks[:, i].to(torch.int64) << (i * bits)
    out = torch.empty(nblocks, bits, dtype=torch.uint8, device=flat.device)
    for j in range(bits):
        out[:, j] = ((word >> (8 * j)) & 0xFF).to(torch.uint8)
    return out.view(-1)[: packed_nbytes(n, bits)].clone()


def _check_packed(packed: Tensor, nbytes: int) -> None:
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D torch.uint8 tensor")
    if packed.numel() != nbytes:
        raise ValueError(f"packed has {packed.numel()} bytes, expected {nbytes}")


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack`: return the first ``numel`` codes as a 1-D uint8 tensor."""
    nbytes = packed_nbytes(numel, bits)
    _check_packed(packed, nbytes)
    if bits == 8:
        return packed.clone()
    nblocks = (numel + 7) // 8
    padded = torch.zeros(nblocks * bits, dtype=torch.uint8, device=packed.device)
    padded[:nbytes] = packed
    blocks = padded.view(nblocks, bits)
    word = torch.zeros(nblocks, dtype=torch.int64, device=packed.device)
    for j in range(bits):
        word |= blocks[:, j].to(torch.int64) << (8 * j)
    mask = (1 << bits) - 1
    out = torch.empty(nblocks, 8, dtype=torch.uint8, device=packed.device)
    for i in range(8):
        out[:, i] = ((word >> (i * bits)) & mask).to(torch.uint8)
    return out.view(-1)[:numel].clone()


def _row_bits(bits_per_row: Tensor | Sequence[int], rows: int) -> Tensor:
    """Validate per-row bit widths and return them as an int64 tensor of length ``rows``."""
    b = torch.as_tensor(bits_per_row)
    if b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
        raise ValueError(f"bits_per_row must be integer, got {b.dtype}")
    b = b.reshape(-1).to(torch.int64).cpu()
    if b.numel() != rows:
        raise ValueError(f"bits_per_row has {b.numel()} entries, expected {rows}")
    if rows and (int(b.min()) < 1 or int(b.max()) > 8):
        raise ValueError("every entry of bits_per_row must be in 1..8")
    return b


def packed_nbytes_mixed(bits_per_row: Tensor | Sequence[int], row_numel: int) -> int:
    """Number of bytes of the packed stream of a mixed-precision [O, row_numel] matrix."""
    b = torch.as_tensor(bits_per_row).reshape(-1)
    b = _row_bits(b, b.numel())
    if row_numel < 0:
        raise ValueError(f"row_numel must be >= 0, got {row_numel}")
    return (int(b.sum()) * row_numel + 7) // 8


def _bit_offsets(b: Tensor, k: int, device: torch.device) -> Tensor:
    """Stream bit offset of every element of an [O, k] matrix whose row o uses b[o] bits."""
    b = b.to(device)
    row_start = torch.cumsum(b * k, 0) - b * k
    return row_start[:, None] + torch.arange(k, dtype=torch.int64, device=device)[None, :] * b[:, None]


def pack_mixed(values: Tensor, bits_per_row: Tensor | Sequence[int]) -> Tensor:
    """Pack an [O, K] code matrix whose row o uses ``bits_per_row[o]`` bits into one uint8 stream."""
    if not isinstance(values, Tensor) or values.dim() != 2:
        raise ValueError("values must be a 2-D [O, K] integer tensor")
    rows, k = values.shape
    b = _row_bits(bits_per_row, rows)
    _check_codes(values, ((1 << b) - 1).to(values.device)[:, None])
    nbytes = packed_nbytes_mixed(b, k)
    offsets = _bit_offsets(b, k, values.device).reshape(-1)
    shifted = values.to(torch.int64).reshape(-1) << (offsets & 7)  # at most 15 bits
    byte_idx = offsets >> 3
    acc = torch.zeros(nbytes + 1, dtype=torch.int64, device=values.device)
    # Bit ranges are disjoint, so summing contributions equals OR-ing them.
    acc.index_add_(0, byte_idx, shifted & 0xFF)
    acc.index_add_(0, byte_idx + 1, shifted >> 8)
    return acc[:nbytes].to(torch.uint8)


def unpack_mixed(packed: Tensor, bits_per_row: Tensor | Sequence[int], row_numel: int) -> Tensor:
    """Inverse of :func:`pack_mixed`: return the uint8 code matrix [O, row_numel]."""
    b = torch.as_tensor(bits_per_row).reshape(-1)
    b = _row_bits(b, b.numel())
    nbytes = packed_nbytes_mixed(b, row_numel)
    _check_packed(packed, nbytes)
    offsets = _bit_offsets(b, row_numel, packed.device)
    ext = torch.cat([packed, packed.new_zeros(1)]).to(torch.int64)
    byte_idx = offsets >> 3
    word = ext[byte_idx] | (ext[byte_idx + 1] << 8)
    mask = ((1 << b) - 1).to(packed.device)[:, None]
    return ((word >> (offsets & 7)) & mask).to(torch.uint8)
