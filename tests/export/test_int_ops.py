"""Tests for lowbitdm_cli.export.int_ops against independent float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbitdm_cli.export.int_ops import (
    PreparedWeight,
    _mm_exact,
    _padded_int_mm,
    int_conv2d,
    int_conv2d_acc,
    int_linear,
    int_linear_acc,
    int_matmul,
    prepare_weight,
)

BITS = [8, 4, 2]
LINEAR_SHAPES = [(1, 7, 3), (3, 13, 1), (17, 100, 33), (65, 257, 7)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape: tuple[int, ...], bits: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def _zp(bits: int, g: torch.Generator, n: int | None = None) -> int | torch.Tensor:
    if n is None:
        return int(torch.randint(0, 1 << bits, (1,), generator=g))
    return torch.randint(0, 1 << bits, (n,), generator=g)


def _ref_linear(qx: torch.Tensor, zx: int, qw: torch.Tensor, zw: torch.Tensor) -> torch.Tensor:
    return (qx.double() - zx) @ (qw.double() - zw.double()[:, None]).T


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "M{}K{}O{}".format(*s))
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_linear_exact(bits: int, shape: tuple[int, int, int]) -> None:
    m, k, o = shape
    g = _gen(bits * 1000 + m)
    qx, qw = _codes((m, k), bits, g), _codes((o, k), bits, g)
    zx, zw = _zp(bits, g), _zp(bits, g, o)
    acc = int_linear_acc(qx, zx, qw, zw)
    assert acc.dtype == torch.int64 and acc.shape == (m, o)
    assert torch.equal(acc.double(), _ref_linear(qx, zx, qw, zw))
    out = int_linear(qx, zx, qw, zw, torch.ones(o), None)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), _ref_linear(qx, zx, qw, zw))  # |sums| < 2**24: exact in float32


@pytest.mark.parametrize(
    ("zx", "zw"), [(0, 0), (255, 255), (0, 255), (255, 0)], ids=["0-0", "255-255", "0-255", "255-0"]
)
def test_linear_extreme_zero_points(zx: int, zw: int) -> None:
    g = _gen(1)
    qx, qw = _codes((5, 31), 8, g), _codes((4, 31), 8, g)
    zw_t = torch.full((4,), zw)
    assert torch.equal(int_linear_acc(qx, zx, qw, zw_t).double(), _ref_linear(qx, zx, qw, zw_t))


def test_linear_prepared_leading_dims_and_dtypes() -> None:
    g = _gen(2)
    qx, qw = _codes((2, 3, 19), 4, g), _codes((5, 19), 4, g)
    zw = _zp(4, g, 5)
    prepared = prepare_weight(qw.to(torch.int32), zw)
    assert prepared.wt.dtype == torch.int8 and prepared.wt.shape == (19, 5)
    rebuilt = PreparedWeight(**prepared.buffers())
    ref = _ref_linear(qx.reshape(6, 19), 7, qw, zw).reshape(2, 3, 5)
    for weight in (prepared, rebuilt):
        assert torch.equal(int_linear_acc(qx.long(), torch.tensor(7), weight).double(), ref)


def _rescale_bound(ref: torch.Tensor, bias: torch.Tensor, abs_terms: torch.Tensor, k: int) -> torch.Tensor:
    """float32 ``acc·s + b`` against the float64 reference: the integer sum is exact in float32 (|acc| < 2**24);
    rounding s and b to float32, the product and the sum add ≤ 4 roundings, each ≤ u32 of |acc·s| or |b|
    (|ref| ≤ |acc·s| + |b|): ≤ 3·u32·(|acc·s| + |b|) with the second-order terms. The float64 reference
    sums k products itself: ≤ (k + 1)·u64·Σ|products| (`abs_terms`) more."""
    return 3 * 2.0**-24 * ((ref - bias).abs() + bias.abs()) + (k + 1) * 2.0**-53 * abs_terms


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_linear_scaled_float(bits: int) -> None:
    g = _gen(3 + bits)
    m, k, o = 17, 75, 9
    qx, qw = _codes((m, k), bits, g), _codes((o, k), bits, g)
    zx, zw = _zp(bits, g), _zp(bits, g, o)
    dx = 0.037
    dw = torch.rand(o, generator=g, dtype=torch.float64) * 0.1 + 0.01
    bias = torch.randn(o, generator=g, dtype=torch.float64)
    ref = F.linear(dx * (qx.double() - zx), dw[:, None] * (qw.double() - zw.double()[:, None]), bias)
    out = int_linear(qx, zx, qw, zw, (dx * dw).float(), bias.float())
    abs_terms = F.linear(dx * (qx.double() - zx).abs(), dw[:, None] * (qw.double() - zw.double()[:, None]).abs())
    assert ((out.double() - ref).abs() <= _rescale_bound(ref, bias, abs_terms, k)).all()


CONV_CASES = [
    # (kernel, stride, padding, dilation, groups)
    (1, 1, 0, 1, 1),
    (1, 2, 0, 1, 1),
    (3, 1, 1, 1, 1),
    (3, 2, 1, 1, 1),
    (3, 2, (1, 2), 2, 1),
    (3, 1, 1, 1, 2),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=["k1", "k1s2", "k3p1", "k3s2p1", "k3s2p12d2", "k3g2"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_conv2d_exact(bits: int, case: tuple) -> None:
    kernel, stride, padding, dilation, groups = case
    g = _gen(bits * 10 + kernel)
    n, c, h, w, o = 2, 6, 9, 7, 5 * groups
    qx, qw = _codes((n, c, h, w), bits, g), _codes((o, c // groups, kernel, kernel), bits, g)
    zx = max(1, int(_zp(bits, g)))  # zx != 0 so padding with code 0 would be wrong
    zw = _zp(bits, g, o)
    ref = F.conv2d(qx.double() - zx, qw.double() - zw.double()[:, None, None, None],
                   stride=stride, padding=padding, dilation=dilation, groups=groups)
    acc = int_conv2d_acc(qx, zx, qw, zw, stride, padding, dilation, groups)
    assert acc.dtype == torch.int64 and acc.shape == ref.shape
    assert torch.equal(acc.double(), ref)
    out = int_conv2d(qx, zx, prepare_weight(qw, zw), None, 1.0, None, stride, padding, dilation, groups)
    assert torch.equal(out.double(), ref)


def test_conv2d_padding_uses_zero_point() -> None:
    # Every input code equals zx (real zero): all outputs, border ones included, must be 0.
    qx = torch.full((1, 3, 5, 5), 9, dtype=torch.uint8)
    qw = _codes((4, 3, 3, 3), 4, _gen(4))
    acc = int_conv2d_acc(qx, 9, qw, torch.zeros(4, dtype=torch.int64), padding=2)
    assert acc.shape == (1, 4, 7, 7)
    assert int(acc.abs().max()) == 0


def test_conv2d_scaled_float() -> None:
    g = _gen(5)
    qx, qw = _codes((2, 4, 8, 8), 8, g), _codes((6, 4, 3, 3), 4, g)
    zx, zw = 131, _zp(4, g, 6)
    dx, dw = 0.02, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    ref = F.conv2d(dx * (qx.double() - zx), dw[:, None, None, None] * (qw.double() - zw.double()[:, None, None, None]),
                   bias, stride=2, padding=1)
    out = int_conv2d(qx, zx, qw, zw, (dx * dw).float(), bias.float(), stride=2, padding=1)
    assert out.dtype == torch.float32 and out.is_contiguous()
    abs_terms = F.conv2d(dx * (qx.double() - zx).abs(),
                         dw[:, None, None, None] * (qw.double() - zw.double()[:, None, None, None]).abs(), stride=2,
                         padding=1)
    assert ((out.double() - ref).abs() <= _rescale_bound(ref, bias[:, None, None], abs_terms, 4 * 9)).all()


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((1, 7), (7, 3)), ((2, 3, 17, 13), (2, 3, 13, 65)), ((4, 5, 9), (9, 1)), ((2, 1, 3, 8), (5, 8, 3))],
    ids=["2d", "batched", "bcast-b", "bcast-both"],
)
@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"b{b}")
def test_matmul_exact(bits: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    g = _gen(bits + len(a_shape))
    qa, qb = _codes(a_shape, bits, g), _codes(b_shape, bits, g)
    za, zb = _zp(bits, g), _zp(bits, g)
    ref = (qa.double() - za) @ (qb.double() - zb)
    out = int_matmul(qa, za, qb, zb)
    assert out.dtype == torch.int64 and out.shape == ref.shape
    assert torch.equal(out.double(), ref)


def test_long_k_does_not_overflow_int32() -> None:
    k = 140_000  # 140000 * 128**2 > 2**31
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.full((k, 2), -128, dtype=torch.int8)
    assert _mm_exact(a, b).tolist() == [[k * 128 * 128] * 2]


def test_padded_int_mm_matches() -> None:
    g = _gen(6)
    a = torch.randint(-128, 128, (3, 13), generator=g, dtype=torch.int8)
    # the padding is under test, not the kernel: weights within ±64 are summed exactly by every
    # class of CPU kernel (AVX2 adds u8·s8 pairs in saturating 16-bit lanes)
    b = torch.randint(-64, 65, (13, 5), generator=g, dtype=torch.int8)
    assert torch.equal(_padded_int_mm(a, b).long(), a.long() @ b.long())


def test_bad_inputs_raise() -> None:
    qx, qw, zw = torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(3)
    zw_i = zw.long()
    with pytest.raises(ValueError):
        int_linear_acc(torch.full((2, 4), 300), 0, qw, zw_i)  # code out of range
    with pytest.raises(ValueError):
        int_linear_acc(qx, 256, qw, zw_i)  # zero point out of range
    with pytest.raises(ValueError):
        int_linear_acc(qx, 0, qw, zw)  # float zero points
    with pytest.raises(ValueError):
        int_linear_acc(qx.float(), 0, qw, zw_i)
    with pytest.raises(ValueError):
        int_linear_acc(torch.zeros(2, 5, dtype=torch.uint8), 0, qw, zw_i)  # K mismatch
    with pytest.raises(ValueError):
        int_linear_acc(qx, 0, qw)  # zw missing
    with pytest.raises(ValueError):
        int_linear(qx, 0, qw, zw_i, torch.ones(2))  # scale length
    w4 = torch.zeros(4, 3, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError):
        int_conv2d_acc(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 0, w4, 0, groups=2)  # 3 % 2 != 0
    with pytest.raises(ValueError):
        int_conv2d_acc(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), 0, w4, 0)  # input smaller than kernel
    with pytest.raises(ValueError):
        int_matmul(torch.zeros(2, 3, dtype=torch.uint8), 0, torch.zeros(4, 2, dtype=torch.uint8), 0)
