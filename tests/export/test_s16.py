"""The int16 kernel (`export.s16`, ``torch.ops.lowbitdm.conv_s16``) against int64 sums.

Integer arithmetic: every result is asserted equal, bit for bit, to Σ(u − zx)(w − zw) computed in int64
(float64 convolutions of integers below 2^53, then converted), on any CPU and at any thread count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbitdm_cli.export import s16
from lowbitdm_cli.quant.integer import sign_sums

pytestmark = pytest.mark.skipif(not s16.available(), reason=str(s16.load()))


def _exact_conv(u: torch.Tensor, zx: int, w: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    return F.conv2d(u.double() - zx, w.double(), stride=stride, padding=padding, dilation=dilation).to(torch.int64)


# (N, C, H, W, O, kernel, stride, padding, dilation): odd channel counts, output channels off a block of
# 16, strides, uneven padding, dilation, 1x1 and a kernel larger than the input's padding
GEOMETRIES = [(2, 3, 7, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)), (3, 17, 9, 9, 33, (3, 3), (2, 2), (1, 1), (1, 1)),
              (2, 64, 8, 8, 40, (1, 1), (1, 1), (0, 0), (1, 1)), (1, 8, 11, 6, 16, (3, 3), (1, 1), (2, 2), (2, 2)),
              (2, 5, 6, 7, 7, (3, 2), (2, 1), (1, 0), (1, 1)), (1, 2, 4, 4, 1, (4, 4), (2, 2), (2, 2), (1, 1))]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_is_the_exact_sum(geometry, layout) -> None:
    n, c, h, w_, o, kernel, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(c * o)
    u = torch.randint(0, 256, (n, c, h, w_), generator=g, dtype=torch.uint8).contiguous(memory_format=layout)
    w = torch.randint(-255, 256, (o, c, *kernel), generator=g)
    y = s16.conv(u, torch.tensor([37]), s16.pack_weight(w), kernel, stride, padding, dilation, o)
    assert y.dtype == torch.int32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.long(), _exact_conv(u, 37, w, stride, padding, dilation))


def test_linear_is_the_exact_sum() -> None:
    g = torch.Generator().manual_seed(1)
    for rows, k, o in [(13, 77, 19), (1, 8, 3), (200, 64, 48)]:
        u = torch.randint(0, 256, (rows, k), generator=g, dtype=torch.uint8)
        w = torch.randint(-255, 256, (o, k), generator=g)
        y = s16.linear(u, torch.tensor([200]), s16.pack_weight(w), o)
        assert y.shape == (rows, o) and torch.equal(y.long(), ((u.double() - 200) @ w.double().t()).to(torch.int64))


def test_sums_at_the_int32_limit_and_threads() -> None:
    """Every product at its largest, (255 − 0)·255 = 65025, over K = 33025 inputs: 2 147 450 625, just below
    2^31, exact; the same bits on one thread and on two (integer sums: no order to depend on)."""
    k = 33025
    assert s16.exact(0.0, 255.0, sign_sums(torch.full((2, k), 255.0), 1))
    assert not s16.exact(0.0, 255.0, sign_sums(torch.full((2, k + 1), 255.0), 1))
    u = torch.full((3, k), 255, dtype=torch.uint8)
    w = torch.stack([torch.full((k,), 255), torch.full((k,), -255)])
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(s16.linear(u, torch.tensor([0]), s16.pack_weight(w), 2))
    finally:
        torch.set_num_threads(threads)
    assert outs[0].tolist() == [[255 * 255 * k, -255 * 255 * k]] * 3
    assert torch.equal(outs[0], outs[1])


def test_exact_uses_the_sign_sums_bound() -> None:
    """Codes in [−a, b] against rows with positive sum P and negative sum N: the bound is
    max(b·P + a·N, a·P + b·N), by hand."""
    w = torch.tensor([[3.0, -5.0, 7.0]])  # P = 10, N = 5
    sums = sign_sums(w, 1)
    # a = 2, b = 9: max(9·10 + 2·5, 2·10 + 9·5) = 100
    assert float(sums[0].max()) == 10 and float(sums[1].max()) == 5
    assert s16.exact(2.0, 9.0, (sums[0] * (2**31 // 100 - 1), sums[1] * (2**31 // 100 - 1)))
    assert not s16.exact(2.0, 9.0, (sums[0] * (2**31 // 100 + 1), sums[1] * (2**31 // 100 + 1)))


def test_pack_weight_checks_its_input() -> None:
    with pytest.raises(ValueError, match="within"):
        s16.pack_weight(torch.tensor([[256, 0]]))
    with pytest.raises(ValueError, match="integer"):
        s16.pack_weight(torch.zeros(2, 2))
    packed = s16.pack_weight(torch.arange(3 * 5 * 2 * 2).reshape(3, 5, 2, 2) - 30)
    assert packed.shape == (1, 4, 3, 16, 2) and packed.dtype == torch.int16
    # output 1, tap (0, 1), channels 2 and 3: w[1, 2, 0, 1] and w[1, 3, 0, 1]
    assert packed[0, 1, 1, 1].tolist() == [20 + 8 + 1 - 30, 20 + 12 + 1 - 30]
    assert packed[0, :, 2, :, 1].abs().sum() == 0 and packed[0, :, :, 3:].abs().sum() == 0  # padding


def test_mismatched_weight_is_refused() -> None:
    u = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    packed = s16.pack_weight(torch.ones(8, 6, 3, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="does not match"):
        s16.conv(u, torch.tensor([0]), packed, (3, 3), (1, 1), (1, 1), (1, 1), 8)
