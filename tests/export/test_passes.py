"""The C passes around the integer kernels (`export.passes`): hand-computed values, the eager ops'
bits in every layout and dtype, and the integer runtime's layers unchanged with and without them."""

from __future__ import annotations

import pytest
import torch

from lowbitdm_cli.export import int_runtime, passes
from lowbitdm_cli.export.int_runtime import IntConv2d, IntLinear
from lowbitdm_cli.quant.integer import rescale as eager_rescale
from lowbitdm_cli.quant.integer import round_accumulator

# skipped only where the library cannot be built; built but differing from the eager ops is a failure
pytestmark = pytest.mark.skipif(isinstance(passes.load(), str), reason=f"no fused passes here: {passes.load()}")


def test_the_built_library_passes_its_self_check() -> None:
    """`available` is the library's check against the eager ops on rounding ties (every dtype, accumulator
    kind, layout pair): where it fails the runtimes quietly fall back to the eager ops, so it must not fail."""
    assert passes.available()

CL = torch.channels_last


def test_quantize_rounds_half_to_even_and_clamps() -> None:
    """Δ = 0.25 makes x/Δ exact: ties land on .5 and go to the even integer; + z, then the clamp."""
    k = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.2, 100.0, -100.0])
    x = (k * 0.25).reshape(1, 8)
    # round half even: 0, 2, 2, -0, -2, 3, 100, -100; + z = 10; clamp to [0, 15]
    assert passes.quantize(x, 0.25, 10.0, 0.0, 15.0, 0.0).tolist() == [[10, 12, 12, 10, 8, 13, 15, 0]]
    # symmetric codes: clamp to [-8, 7], then + 8 (the uint8 kernels' offset)
    assert passes.quantize(x, 0.25, 0.0, -8.0, 7.0, 8.0).tolist() == [[8, 10, 10, 8, 6, 11, 15, 0]]
    # the float path's operand: u − zx, in float32 or bf16
    for dtype in (torch.float32, torch.bfloat16):
        operand = passes.operand(x, 0.25, 10.0, 0.0, 15.0, 0.0, 10, dtype=dtype)
        assert operand.dtype == dtype and operand.tolist() == [[0.0, 2.0, 2.0, 0.0, -2.0, 3.0, 5.0, -10.0]]
    # 8-bit codes minus their zero point, ±255 at the ends, are exact in bf16
    ends = passes.operand(torch.tensor([[-1e6, 1e6]]), 1.0, 0.0, 0.0, 255.0, 0.0, 255, dtype=torch.bfloat16)
    assert ends.tolist() == [[-255.0, 0.0]]
    ends = passes.operand(torch.tensor([[-1e6, 1e6]]), 1.0, 0.0, 0.0, 255.0, 0.0, 0, dtype=torch.bfloat16)
    assert ends.tolist() == [[0.0, 255.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layouts", [(torch.contiguous_format, torch.contiguous_format), (torch.contiguous_format, CL),
                                     (CL, torch.contiguous_format), (CL, CL)])
def test_quantize_equals_the_eager_ops(dtype: torch.dtype, layouts) -> None:
    """Against `IntLayer.quantize_input`'s eager ops on values with ties, in and out of either layout."""
    gen = torch.Generator().manual_seed(1)
    delta = 0.0173
    x = (torch.randint(-400, 400, (3, 20, 6, 5), generator=gen) + 0.5) * torch.tensor(delta)
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.5, x, torch.randn(x.shape, generator=gen) * 4).to(dtype)
    x = x.contiguous(memory_format=layouts[0])
    q = torch.div(x, torch.tensor([delta])).round_().add_(41.0).clamp_(0.0, 255.0)
    codes = passes.quantize(x, delta, 41.0, 0.0, 255.0, 0.0)
    assert codes.is_contiguous(memory_format=layouts[0]) and torch.equal(codes, q.to(torch.uint8))
    for op_dtype in (torch.float32, torch.bfloat16):
        operand = passes.operand(x, delta, 41.0, 0.0, 255.0, 0.0, 41, layouts[1], op_dtype)
        assert operand.dtype == op_dtype and operand.is_contiguous(memory_format=layouts[1])
        assert torch.equal(operand, (q - 41).to(op_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_tokens_are_quantized_into_rows(dtype: torch.dtype) -> None:
    """A diffusers attention hands its linears [N, T, C] tokens transposed from [N, C, T] memory: the
    loops read that layout and write contiguous rows, with the eager ops' values."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 20, 12, generator=gen) * 3).to(dtype).transpose(1, 2)  # [N, T=12, C=20], not contiguous
    assert not x.is_contiguous()
    q = torch.div(x, torch.tensor([0.05])).round_().add_(7.0).clamp_(0.0, 63.0)
    codes = passes.quantize(x, 0.05, 7.0, 0.0, 63.0, 0.0)
    assert codes.is_contiguous() and torch.equal(codes, q.to(torch.uint8))
    operand = passes.operand(x, 0.05, 7.0, 0.0, 63.0, 0.0, 7)
    assert operand.is_contiguous() and torch.equal(operand, q - 7)


def test_rescale_by_hand() -> None:
    """Powers of two keep the products exact: ((acc·Δx)·Δw[c]) + b[c] is known; bfloat16 rounds ties
    to even and NaN to 0x7FC0, as c10::BFloat16."""
    acc = torch.tensor([[4.0, -8.0], [257.0, 259.0]])
    out = passes.rescale(acc, 0.5, torch.tensor([0.25, 1.0]), torch.tensor([1.0, -1.0]), False, torch.float32)
    assert out.tolist() == [[1.5, -5.0], [33.125, 128.5]]
    # 257 lies halfway between bf16 256 and 258: to even, 256; 259 halfway between 258 and 260: 260
    out = passes.rescale(acc, 1.0, torch.ones(2), None, False, torch.bfloat16)
    assert out.float().tolist() == [[4.0, -8.0], [256.0, 260.0]]
    nan = passes.rescale(torch.tensor([[float("nan")]]), 1.0, torch.ones(1), None, False, torch.bfloat16)
    assert nan.view(torch.int16).item() == 0x7FC0
    # int32 accumulators beyond 2^24 convert to float32 rounding to nearest even, as Tensor.to does
    big = torch.tensor([[2**24 + 1, 2**24 + 3, -(2**30) - 65]], dtype=torch.int32)
    assert torch.equal(passes.rescale(big, 1.0, torch.ones(3), None, False, torch.float32), big.float())
    # a bf16 output rounds the accumulator to bf16 first: 257 → 256 (tie to even), + 1 = 257 → 256 (tie to
    # even); from the exact 257, 257 + 1 = 258 would be exact. 263 → 264, + 1 = 265 → 264; a bf16 accumulator
    # (a bf16 product's) is taken as it is
    acc = torch.tensor([[257.0, 263.0]])
    for a in (acc, acc.int(), acc.bfloat16()):
        out = passes.rescale(a, 1.0, torch.ones(2), torch.ones(2), False, torch.bfloat16)
        assert out.float().tolist() == [[256.0, 264.0]]
    assert passes.rescale(acc, 1.0, torch.ones(2), torch.ones(2), False, torch.float32).tolist() == [[258.0, 264.0]]


@pytest.mark.parametrize("combined", [False, True])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.int32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescale_equals_the_eager_ops(combined: bool, acc_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """Against `quant.integer.rescale_to`'s eager ops (`round_accumulator`, `rescale`, the cast), for conv outputs
    in every layout pair and linear rows."""
    gen = torch.Generator().manual_seed(2)
    acc = torch.randint(-2**22, 2**22, (2, 33, 4, 7), generator=gen).to(acc_dtype)
    ws, bias = torch.rand(33, generator=gen) * 1e-3, torch.randn(33, generator=gen)
    order = "combined" if combined else "sequential"
    for b in (bias, None):
        expected = eager_rescale(round_accumulator(acc.to(torch.float32, copy=True), dtype), torch.tensor([0.037]), ws,
                                 b, 1, "conv", order=order).to(dtype)
        for lin in (torch.contiguous_format, CL):
            for lout in (torch.contiguous_format, CL):
                got = passes.rescale(acc.to(acc_dtype).contiguous(memory_format=lin), 0.037, ws, b, combined, dtype,
                                     lout)
                assert got.is_contiguous(memory_format=lout) and torch.equal(got, expected)
        rows = acc.permute(0, 2, 3, 1).reshape(-1, 33)
        expected = eager_rescale(round_accumulator(rows.to(torch.float32, copy=True), dtype), torch.tensor([0.037]),
                                 ws, b, -1, "linear", order=order).to(dtype)
        assert torch.equal(passes.rescale(rows.to(acc_dtype), 0.037, ws, b, combined, dtype), expected)


@pytest.mark.parametrize("combined", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescale_adds_a_shifted_layers_correction_as_addcmul(combined: bool, dtype: torch.dtype) -> None:
    """``acc + w_off[c]·sums[position]`` (`torch.addcmul`, then the eager rescale) in the same pass: conv outputs
    in every layout pair with sums one per position ([N, 1, H, W]), linear rows with sums [rows, 1]; by hand too."""
    hand = passes.rescale(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.5, torch.ones(2), None, False, torch.float32,
                          correction=(torch.tensor([[10.0], [-1.0]]), torch.tensor([1.0, -2.0])))
    assert hand.tolist() == [[5.5, -9.0], [1.0, 3.0]]  # (1 + 10) / 2, (2 − 20) / 2, (3 − 1) / 2, (4 + 2) / 2
    gen = torch.Generator().manual_seed(7)
    acc = torch.randint(-2**21, 2**21, (2, 33, 4, 7), generator=gen).float()
    sums = torch.randint(-2**14, 2**14, (2, 1, 4, 7), generator=gen).float()
    w_off = torch.randint(-127, 129, (33,), generator=gen).float()
    ws, bias = torch.rand(33, generator=gen) * 1e-3, torch.randn(33, generator=gen)
    order = "combined" if combined else "sequential"
    shifted = torch.addcmul(acc, sums, w_off.reshape(1, -1, 1, 1))
    expected = eager_rescale(round_accumulator(shifted, dtype), torch.tensor([0.037]), ws, bias, 1, "conv",
                             order=order).to(dtype)
    for lin in (torch.contiguous_format, CL):
        for lout in (torch.contiguous_format, CL):
            got = passes.rescale(acc.contiguous(memory_format=lin), 0.037, ws, bias, combined, dtype, lout,
                                 (sums, w_off))
            assert got.is_contiguous(memory_format=lout) and torch.equal(got, expected)
    rows, row_sums = acc.permute(0, 2, 3, 1).reshape(-1, 33), sums.reshape(-1, 1)
    expected = eager_rescale(round_accumulator(torch.addcmul(rows, row_sums, w_off), dtype), torch.tensor([0.037]),
                             ws, bias, -1, "linear", order=order).to(dtype)
    assert torch.equal(passes.rescale(rows, 0.037, ws, bias, combined, dtype, correction=(row_sums, w_off)), expected)
    # not one sum per position, or not a float32 accumulator: not this pass's
    assert passes.rescale(acc, 1.0, ws, None, combined, dtype, correction=(sums[:1], w_off)) is None
    assert passes.rescale(acc.int(), 1.0, ws, None, combined, dtype, correction=(sums, w_off)) is None


@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 5, 40, 40), (1, 300, 1, 3)])
def test_channel_sums_equal_the_eager_ops(shape: tuple) -> None:
    """Σ_c (u − zx) per position, both layouts (NCHW in blocks of positions: 40x40 is two), and a linear's rows."""
    gen = torch.Generator().manual_seed(8)
    u = torch.randint(0, 256, shape, generator=gen).to(torch.uint8)
    expected = u.sum(1, keepdim=True, dtype=torch.float32) - shape[1] * 37
    for layout in (torch.contiguous_format, CL):
        got = passes.channel_sums(u.contiguous(memory_format=layout), 37)
        assert got.shape == expected.shape and got.is_contiguous() and torch.equal(got, expected)
    rows = u.permute(0, 2, 3, 1).reshape(-1, shape[1]).contiguous()
    assert torch.equal(passes.channel_sums(rows, 200), rows.sum(-1, keepdim=True, dtype=torch.float32) - shape[1] * 200)
    assert passes.channel_sums(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 1).tolist() == [[3.0]]  # by hand
    assert passes.channel_sums(u.float(), 0) is None  # codes only


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(1, 16, 4, 4), (2, 17, 1, 15), (5, 3, 9, 11), (1, 40, 6, 6)])
def test_layout_changes_at_tile_edges_and_thread_counts(threads: int, shape: tuple) -> None:
    """The layout changes split (image, channel tile) pairs between threads and move 16 x 16 tiles (partial
    at the edges): whole, partial and single tiles, more threads than pairs, one thread; eager ops' bits."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen) * 3
    acc = torch.randint(-2**20, 2**20, shape, generator=gen, dtype=torch.int32)
    ws, bias = torch.rand(shape[1], generator=gen) * 1e-3, torch.randn(shape[1], generator=gen)
    q = torch.div(x, torch.tensor([0.05])).round_().add_(9.0).clamp_(0.0, 255.0)
    expected = eager_rescale(acc.float(), torch.tensor([0.5]), ws, bias, 1, "conv", order="sequential")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lin, lout in ((torch.contiguous_format, CL), (CL, torch.contiguous_format)):
            operand = passes.operand(x.contiguous(memory_format=lin), 0.05, 9.0, 0.0, 255.0, 0.0, 9, lout)
            assert operand.is_contiguous(memory_format=lout) and torch.equal(operand, q - 9)
            got = passes.rescale(acc.contiguous(memory_format=lin), 0.5, ws, bias, False, torch.float32, lout)
            assert got.is_contiguous(memory_format=lout) and torch.equal(got, expected)
    finally:
        torch.set_num_threads(before)


def test_what_does_not_apply_returns_none() -> None:
    """Strided views, other dtypes: None, and the caller runs the eager ops."""
    x = torch.randn(2, 8, 4, 4)
    assert passes.quantize(x[:, ::2], 0.1, 0.0, 0.0, 255.0, 0.0) is None
    assert passes.quantize(x.double(), 0.1, 0.0, 0.0, 255.0, 0.0) is None
    assert passes.rescale(x.to(torch.int64), 1.0, torch.ones(8), None, False, torch.float32) is None
    assert passes.rescale(x, 1.0, torch.ones(8), None, False, torch.float16) is None


def _layer(kind: str, kernel: str) -> tuple[torch.nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    shape = (24, 16, 3, 3) if kind == "conv" else (24, 16)
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    args = (codes, torch.randint(100, 156, (24,), generator=gen), torch.rand(24, generator=gen) * 1e-2,
            torch.randn(24, generator=gen), torch.tensor([0.05]), torch.tensor([97]), 8)
    layer = IntConv2d(*args, padding=1) if kind == "conv" else IntLinear(*args)
    layer.set_lowering(kernel)
    x = torch.randn((3, 16, 9, 7) if kind == "conv" else (5, 16, 6), generator=gen).transpose(-1, -2) * 4
    return layer, x.contiguous() if kind == "conv" else x  # linear: transposed tokens, as attention gives them


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("kernel", ["float", "int_mm", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_layers_give_the_same_bits_with_and_without_the_passes(monkeypatch, kind: str, kernel: str,
                                                                       dtype: torch.dtype) -> None:
    """A layer's output is the same bits whether the passes or the eager ops run around its kernel
    (the eager ops being what the fake runtime computes), in both layouts; and the passes do run. The layer
    is a shifted one (8-bit weights, off-centre zero points): on oneDNN its correction's channel sums and the
    correction itself run in the passes too."""
    if kernel == "onednn" and not int_runtime.onednn_available():
        pytest.skip("no oneDNN int8 kernels in this PyTorch")
    layer, x = _layer(kind, kernel)
    assert not layer.direct
    calls = []
    for name in ("quantize", "operand", "rescale", "channel_sums"):
        real = getattr(passes, name)
        monkeypatch.setattr(passes, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    inputs = [x.to(dtype), x.to(dtype).contiguous(memory_format=CL if kind == "conv" else torch.contiguous_format)]
    with torch.no_grad():
        fast = [layer(xi) for xi in inputs]
        assert "rescale" in calls and ("operand" if kernel == "float" else "quantize") in calls
        if layer.lowering == "onednn" and layer.sums_beside:
            assert "channel_sums" in calls
        monkeypatch.setattr(passes, "enabled", lambda: False)
        eager = [layer(xi) for xi in inputs]
    for f, e, xi in zip(fast, eager, inputs, strict=True):
        assert f.dtype == dtype and torch.equal(f, e)
        if kind == "conv":  # the output keeps the input's layout, as the fake layer's does
            cl = xi.is_contiguous(memory_format=CL) and not xi.is_contiguous()
            assert f.is_contiguous(memory_format=CL if cl else torch.contiguous_format)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("a_symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_layers_give_the_same_bits_with_and_without_the_passes(monkeypatch, kind: str, a_symmetric: bool,
                                                                    dtype: torch.dtype) -> None:
    """The fake-quantized layer's integer-exact inference (`QuantLayerMixin._integer_forward`) takes
    one pass for its input codes and one for its rescale; the output is the eager ops' bits, in every
    timestep slot and both input layouts, in float32 and in bf16 (bf16 products), and the passes do run."""
    from test_int_runtime import CONVS, _exact_fake, _random_layer

    from lowbitdm_cli.models.wrapper import set_timestep

    _, fake, codes, zw = _random_layer(kind, 8, 6, a_symmetric, seed=7, conv=CONVS["3x3s2p1"], timesteps=[900, 100])
    fake = _exact_fake(fake, 8, codes, zw, torch.rand(12, generator=torch.Generator().manual_seed(8)) * 0.02 + 0.005)
    x = torch.randn((3, 10, 9, 7) if kind == "conv" else (4, 5, 10), generator=torch.Generator().manual_seed(9)) * 3
    x = x.to(dtype)
    monkeypatch.setenv("LOWBITDM_BF16_PRODUCTS", "1")
    inputs = [x] + ([x.contiguous(memory_format=CL)] if kind == "conv" else [])
    on, calls = [True], []
    monkeypatch.setattr(passes, "enabled", lambda: on[0])
    for name in ("operand", "rescale"):
        real = getattr(passes, name)
        monkeypatch.setattr(passes, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    with torch.no_grad():
        for t in (900, 100):
            set_timestep(fake, t)
            on[0] = True
            fast = [fake(xi) for xi in inputs]
            on[0] = False
            eager = [fake(xi) for xi in inputs]
            for f, e in zip(fast, eager, strict=True):
                assert f.dtype == dtype and torch.equal(f, e) and f.stride() == e.stride()
    assert calls.count("operand") == calls.count("rescale") == 2 * len(inputs)


def _conv(in_ch: int, kernel: int, stride: int, w_bits: int, seed: int, zw_centre: bool = False) -> IntConv2d:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << w_bits, (6, in_ch, kernel, kernel), generator=gen, dtype=torch.uint8)
    zw = torch.full((6,), 128 if zw_centre else 3) if w_bits == 8 else torch.randint(1, (1 << w_bits) - 1, (6,))
    layer = IntConv2d(codes, zw, torch.rand(6, generator=gen) * 1e-2, torch.randn(6, generator=gen),
                      torch.tensor([0.05]), torch.tensor([37]), 8, stride=stride, padding=kernel // 2)
    layer.set_lowering("onednn")
    return layer


@pytest.mark.skipif(not int_runtime.onednn_available(), reason="no oneDNN int8 kernels in this PyTorch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kernel", "stride", "w_bits"), [(3, 1, 8), (3, 2, 8), (1, 1, 8), (3, 1, 4), (3, 2, 4)])
def test_zero_point_free_calls_give_the_bits_of_the_call_with_zx(monkeypatch, kernel: int, stride: int, w_bits: int,
                                                                   dtype: torch.dtype) -> None:
    """oneDNN called with activation zero point 0 plus the border map (`IntConv2d.zero_point_free`) gives the bits
    of the call with zx, shifted (8-bit, off-centre zw) and direct layers, where the layer rescales itself."""
    layer = _conv(5, kernel, stride, w_bits, seed=kernel * 10 + stride + w_bits)
    layer.fused_rescale = False
    assert layer.direct == (w_bits < 8)
    x = (torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    taken = []
    real = IntConv2d.zero_point_free
    monkeypatch.setattr(IntConv2d, "zero_point_free", lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.no_grad():
        free = layer(x)
        assert taken and taken[-1] is not None
        monkeypatch.setattr(IntConv2d, "zero_point_free", lambda *a: None)
        with_zx = layer(x)
    assert torch.equal(free, with_zx)


def test_zero_point_free_map_by_hand_and_its_bound(monkeypatch) -> None:
    """The map is −zx · (the weight sums of the taps inside the image): an all-ones 3x3 weight over a 3x3 input
    with padding 1 counts 4 taps at the corners, 6 at the edges, 9 in the middle; it applies only while
    u_max·max_o Σ|w'| < 2^24 (the kernel's float32 output exact)."""
    codes = torch.full((1, 1, 3, 3), 9, dtype=torch.uint8)  # w − zw = 1 everywhere
    layer = IntConv2d(codes, torch.tensor([8]), torch.ones(1), None, torch.tensor([0.05]), torch.tensor([37]), 8,
                      padding=1)
    layer.set_lowering("onednn")
    u = torch.zeros(2, 1, 3, 3, dtype=torch.uint8).contiguous(memory_format=CL)
    border = layer.zero_point_free(u, 37, torch.bfloat16)
    assert border.tolist() == [[[[-37.0 * 4, -37.0 * 6, -37.0 * 4], [-37.0 * 6, -37.0 * 9, -37.0 * 6],
                                 [-37.0 * 4, -37.0 * 6, -37.0 * 4]]]]
    assert layer.zero_point_free(u, 0, torch.bfloat16) is None  # nothing to correct
    monkeypatch.setenv("LOWBITDM_ZERO_POINT_FREE", "0")  # off: zx passed to the kernel
    assert layer.zero_point_free(u, 37, torch.bfloat16) is None
    monkeypatch.delenv("LOWBITDM_ZERO_POINT_FREE")
    wide = IntConv2d(torch.full((2, 600, 3, 3), 255, dtype=torch.uint8), torch.tensor([128, 128]), torch.ones(2), None,
                     torch.tensor([0.05]), torch.tensor([37]), 8, padding=1)  # 255 · 127 · 5400 ≫ 2^24
    wide.set_lowering("onednn")
    assert wide.zero_point_free(torch.zeros(1, 600, 4, 4, dtype=torch.uint8), 37, torch.bfloat16) is None
