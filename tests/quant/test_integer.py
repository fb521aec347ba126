"""Integer-exact evaluation (`quant.integer`): exact accumulators in float32, the split of wide
weights, the fixed rescale, and the fake layer's inference path against an int64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.quant.init import init_quantizer
from lowbitdm_cli.quant.integer import (
    EXACT_F32,
    KERNELS,
    MAX_CHUNKS,
    RESCALE_ORDERS,
    accumulate,
    chunk_limit,
    chunk_plan,
    chunk_weight,
    conv_chunk_products,
    conv_products,
    exact_route,
    operand_layout,
    partial_sum_bound,
    pointwise,
    rescale,
    rescale_order,
    sign_sums,
    split_plan,
    split_weight,
    sum_chunks,
)
from lowbitdm_cli.quant.layers import QuantConv2d, QuantLinear
from lowbitdm_cli.quant.policy import LayerSpec


def _exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k x·w in int64, rounded once to float32 (what the integer kernels' conversion gives)."""
    return (x.long() @ w.long().t()).to(torch.float64).float()


def test_split_plan_by_hand() -> None:
    assert split_plan(15, 1000, 100) == 0  # 15 · 1000 < 2^24
    # 255 · 100000 ≥ 2^24; s = 1: lo 255·2304·1 < 2^24, hi 255·(50000 + 1152) < 2^24
    assert split_plan(255, 100_000, 2304) == 1
    assert split_plan(255, 10**9, 10**6) is None  # nothing keeps both halves exact
    assert EXACT_F32 == 16_777_216


@pytest.mark.parametrize("s", [1, 3, 7])
def test_split_weight_recombines_exactly(s: int) -> None:
    w = torch.randint(-255, 256, (64, 300), generator=torch.Generator().manual_seed(s)).float()
    hi, lo = split_weight(w, s)
    assert torch.equal(hi * 2**s + lo, w)
    assert float(lo.abs().max()) <= 2 ** (s - 1)
    assert torch.equal(hi, hi.round()) and torch.equal(lo, lo.round())


def test_accumulate_is_exact_where_float32_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    k = 4096
    x = torch.randint(0, 256, (32, k), generator=g).float()  # one-sided 8-bit codes: large sums
    w = torch.randint(0, 256, (16, k), generator=g).float()
    ref = _exact(x, w)
    assert float(ref.abs().max()) > EXACT_F32  # the sums exceed what float32 holds exactly
    plain = F.linear(x, w)
    assert not torch.equal(plain, ref)  # a plain float32 product rounds its partial sums
    w_sum = float(w.abs().sum(1).max())
    plan = split_plan(255, w_sum, k)
    got = accumulate(F.linear, x, w, plan)
    assert torch.equal(got, ref), plan
    assert torch.equal(accumulate(F.linear, x, w, None), ref)  # the float64 route agrees


def test_partial_sum_bound_by_hand() -> None:
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.0, 0.0, -5.0, 0.0]])
    p, n = sign_sums(w, 1)
    assert p.tolist() == [[4.0], [0.0]] and n.tolist() == [[6.0], [5.0]]
    p, n = sign_sums(w, 2)  # chunks [1, −2 | 3, −4] and [0, 0 | −5, 0]
    assert p.tolist() == [[1.0, 3.0], [0.0, 0.0]] and n.tolist() == [[2.0, 4.0], [0.0, 5.0]]
    # x ∈ [−1, 10], row 0 as one chunk: max(10·4 + 1·6, 1·4 + 10·6) = 64, reached with x = −1 on the positive
    # weights and 10 on the negative ones: −1 − 3 − 20 − 40
    assert partial_sum_bound(1, 10, sign_sums(w, 1)) == 64
    assert partial_sum_bound(1, 10, sign_sums(w, 2)) == 50  # row 1, chunk 2: 10·5
    assert partial_sum_bound(10, 10, sign_sums(w, 1)) == 100  # symmetric inputs: max|x| · Σ|w|
    # every partial sum of every order lies within the bound, and some reach it
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(-9, 10, (6, 40), generator=g).float()
    bound = partial_sum_bound(3, 11, sign_sums(wide, 1))
    worst = torch.where(wide > 0, 11.0, -3.0) * wide  # x at the end that makes each term largest
    assert float(worst.sum(1).max()) <= bound
    assert bound in (float(worst.sum(1).max()), float((torch.where(wide > 0, -3.0, 11.0) * wide).sum(1).abs().max()))
    for _ in range(50):
        x = torch.randint(-3, 12, (40,), generator=g).float()
        order = torch.randperm(40, generator=g)
        assert float((x[order] * wide[:, order]).cumsum(1).abs().max()) <= bound


def test_chunk_plan_and_route_by_hand() -> None:
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.0, 0.0, -5.0, 0.0]])
    sums = lambda g: sign_sums(w, g)
    # one-sided inputs x ∈ [0, a]: one product while a·6 < 2^24, two chunks while a·5 < 2^24 (row 1's chunk)
    assert chunk_plan(0, 2_000_000, 4, sums) == 1
    assert chunk_plan(0, 3_000_000, 4, sums) == 2
    assert chunk_plan(0, 3_400_000, 4, sums) is None  # every chunking keeps row 1's −5: 3.4e6 · 5 ≥ 2^24
    pair = lambda g: sign_sums(torch.tensor([[5.0, 5.0, 0.0, 0.0]]), g)
    assert chunk_plan(0, 2_000_000, 4, pair) == 4  # 2e6 · 10 ≥ 2^24 for g = 1 and 2 (g = 3 does not divide 4)
    # inputs on both sides: the bound takes the worse of the two signs per row
    # row 0 whole: 1e6·4 + 2.2e6·6 ≥ 2^24; its chunks' worst, 1e6·3 + 2.2e6·4, fits
    assert chunk_plan(1_000_000, 2_200_000, 4, sums) == 2
    assert chunk_plan(0, 3_000_000, 4, sums, max_chunks=1) is None
    # exact_route: where a split works, at most two chunks; else up to MAX_CHUNKS
    assert exact_route(0, 2_000_000, 4, 4, sums) == (None, 0)  # one product: `accumulate`'s plan 0
    assert exact_route(0, 3_000_000, 4, 4, sums) == (2, 0)
    assert exact_route(0, 3_000_000, 4, 4, sums, chunkable=False) == (None, split_plan(3_000_000, 10, 4))
    assert chunk_limit(None) == MAX_CHUNKS and chunk_limit(1) == 2


def test_chunk_weight_groups_input_channels() -> None:
    w = torch.arange(2 * 6 * 1 * 1, dtype=torch.float32).reshape(2, 6, 1, 1)
    got = chunk_weight(w, 3)
    assert got.shape == (6, 2, 1, 1)
    assert torch.equal(got[:2], w[:, 0:2]) and torch.equal(got[2:4], w[:, 2:4]) and torch.equal(got[4:], w[:, 4:6])


def test_sum_chunks_rounds_once() -> None:
    parts = [torch.tensor([2.0**24]), torch.tensor([1.0]), torch.tensor([1.0])]
    # float32 left to right: 2^24 + 1 rounds to 2^24 (tie to even), + 1 again; the exact 2^24 + 2 is a float32
    assert float(parts[0] + parts[1] + parts[2]) == 2.0**24
    assert float(sum_chunks(parts)) == 2.0**24 + 2
    assert sum_chunks(parts).dtype == torch.float32
    assert float(sum_chunks(parts[:2])) == 2.0**24  # one add: the exact 2^24 + 1 rounded once, to even
    assert sum_chunks(parts[:1]) is parts[0]


@pytest.mark.parametrize(("channels", "chunks"), [(128, 2), (512, 8)])
def test_grouped_chunks_are_exact_where_one_conv_is_not(channels: int, chunks: int) -> None:
    """One-sided 8-bit codes: one float32 conv rounds its partial sums, the chunked grouped conv
    summed by `sum_chunks` gives the int64 sum rounded once (two chunks: a float32 add; more: float64)."""
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 256, (2, channels, 5, 5), generator=g).float()
    x = torch.where(x > 16, 255.0, x)
    w = torch.randint(0, 128, (16, channels, 3, 3), generator=g).float()
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, channels * 9)
    ref = _exact(cols, w.reshape(16, -1)).reshape(2, 25, 16).transpose(1, 2).reshape(2, 16, 5, 5)
    assert float(ref.abs().max()) > EXACT_F32
    if chunks == 8:  # sums near 2^26: one float32 conv rounds some of them
        assert not torch.equal(F.conv2d(x, w, padding=1), ref)
    assert chunk_plan(0, 255, channels, lambda n: sign_sums(w, n)) == chunks
    y = F.conv2d(x, chunk_weight(w, chunks), padding=1, groups=chunks)
    assert torch.equal(sum_chunks(y.unflatten(1, (chunks, 16)).unbind(1)), ref)


def test_rescale_op_order() -> None:
    acc = torch.tensor([[3.0, -7.0], [1e6 + 1, 5.0]])
    xs, ws, b = torch.tensor([0.1]), torch.tensor([0.3, 0.7]), torch.tensor([1.0, 0.0])
    sequential = (acc * xs.reshape(())) * ws + b  # ((acc·Δx)·Δw) + b, one rounding each
    combined = acc * (xs.reshape(()) * ws) + b  # (acc·(Δx·Δw)) + b
    # the two orders round differently: (−7·0.1)·0.7 and −7·(0.1·0.7) are one float32 ulp apart
    assert sequential[0, 1] != combined[0, 1]
    for kernel in KERNELS:
        assert torch.equal(rescale(acc.clone(), xs, ws, b, -1, kernel, order="sequential"), sequential)
        assert torch.equal(rescale(acc.clone(), xs, ws, b, -1, kernel, order="combined"), combined)
        assert torch.equal(rescale(acc.clone(), xs, ws, None, -1, kernel, order="sequential"),
                           (acc * xs.reshape(())) * ws)
        assert torch.equal(rescale(acc.clone(), xs, ws, None, -1, kernel, order="combined"), acc * (xs * ws))
        default = sequential if rescale_order(kernel) == "sequential" else combined
        assert torch.equal(rescale(acc.clone(), xs, ws, b, -1, kernel), default)
        for order in RESCALE_ORDERS:
            buffer = acc.clone()
            assert rescale(buffer, xs, ws, b, -1, kernel, order=order).data_ptr() == buffer.data_ptr()  # in place


def test_rescale_order_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for order in RESCALE_ORDERS:
        monkeypatch.setenv("LOWBITDM_RESCALE_ORDER", order)
        assert [rescale_order(k) for k in KERNELS] == [order, order]
    monkeypatch.setenv("LOWBITDM_RESCALE_ORDER", "fastest")
    with pytest.raises(ValueError, match="LOWBITDM_RESCALE_ORDER"):
        rescale_order("conv")
    with pytest.raises(ValueError, match="kernel"):
        rescale_order("matmul")


@pytest.mark.parametrize("kind", ["linear", "wide-linear", "conv", "wide-conv"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_layer_inference_is_integer_exact(kind: str, bits: int) -> None:
    """No-grad forward of a quantized layer equals ((Σ(qx−zx)(qw−zw))·Δx)·Δw + b from int64 sums,
    and the STE (training) path agrees with it to float rounding. The wide 8-bit layers' sums
    exceed float32's exact integers: they run as products over input-channel chunks."""
    g = torch.Generator().manual_seed(bits)
    torch.manual_seed(bits)
    width = 8192 if kind == "wide-linear" else 600
    channels = 320 if kind == "wide-conv" else 64  # K = 2880: sums may pass 2^24, each half's not
    wide, kind = kind.startswith("wide-"), kind.removeprefix("wide-")
    base = nn.Linear(width, 24) if kind == "linear" else nn.Conv2d(channels, 24, 3, padding=1)
    spec = LayerSpec(role=kind, kind=kind, w_bits=bits, a_bits=bits)
    layer = (QuantLinear if kind == "linear" else QuantConv2d).from_float(base, spec)
    x = torch.randn((8, width) if kind == "linear" else (2, channels, 6, 6), generator=g) * 3 + 1
    init_quantizer(layer.w_quant, layer.weight.detach(), "minmax")
    init_quantizer(layer.a_quant, x, "minmax")
    chunked = []
    products = layer._chunk_products
    layer._chunk_products = lambda *a: chunked.append(a[2]) or products(*a)
    with torch.no_grad():
        out = layer(x)
        x_int, x_scale, (x_neg, x_pos) = layer.a_quant.integer_values(x)
        w_int, w_scale, _, _ = layer.integer_weight()
    if kind == "linear":
        acc = _exact(x_int, w_int)
    else:
        cols = F.unfold(x_int, 3, padding=1).transpose(1, 2).reshape(-1, channels * 9)  # [N·H·W, K]
        acc = _exact(cols, w_int.reshape(24, -1)).reshape(2, 36, 24).transpose(1, 2).reshape(2, 24, 6, 6)
    ref = rescale(acc, x_scale.detach(), w_scale, layer.bias.detach(), -1 if kind == "linear" else 1,
                  "linear" if kind == "linear" else "conv")
    assert torch.equal(out, ref)
    if wide and bits == 8:  # one float32 product would not do; chunks do
        k = w_int[0].numel()
        assert float(x_int.min()) >= -x_neg and float(x_int.max()) <= x_pos
        expected, _ = exact_route(x_neg, x_pos, w_int.shape[1], k, lambda n: sign_sums(w_int, n))
        assert chunked == ([expected] if expected else [])  # chunked where one product is not exact
        if kind == "conv":
            assert expected == 2
    else:
        assert not chunked
    ste = layer(x).detach()  # autograd on: the float path
    # the float path rounds the dequantized values (1 rounding each), then sums K products in float32
    # in any order, then adds the bias: |error| <= (K + 3)·u·(Σ_k |x_k||w_k| + |b|) with u = 2^-24
    # (Higham's γ_{K+3}, (K+3)·u < 0.01 here), whatever kernel or summation order the CPU picks
    abs_acc = (x_int.abs().double() if kind == "linear" else
               F.unfold(x_int.abs().double(), 3, padding=1).transpose(1, 2).reshape(-1, channels * 9))
    mags = abs_acc @ w_int.abs().double().reshape(24, -1).t()
    if kind == "conv":
        mags = mags.reshape(2, 36, 24).transpose(1, 2).reshape(2, 24, 6, 6)
    shape = (1, -1) if kind == "linear" else (1, -1, 1, 1)
    mags = mags * float(x_scale.abs().max()) * w_scale.abs().double().reshape(shape) + \
        layer.bias.detach().abs().double().reshape(shape)
    k = abs_acc.shape[-1]
    assert ((ste.double() - out.double()).abs() <= 1.01 * (k + 3) * 2.0**-24 * mags).all()


def test_pointwise_geometry() -> None:
    w1, w3 = torch.zeros(4, 2, 1, 1), torch.zeros(4, 2, 3, 3)
    assert pointwise(w1, (1, 1), (0, 0), (1, 1)) and pointwise(w1, 1, 0, 1)
    assert not pointwise(w1, 2, 0, 1) and not pointwise(w1, 1, 1, 1) and not pointwise(w3, 1, 0, 1)
    assert operand_layout(w1, 1, 0, 1, torch.contiguous_format) == torch.contiguous_format
    assert operand_layout(w1, 1, 0, 1, torch.channels_last) == torch.channels_last
    assert operand_layout(w3, 1, 1, 1, torch.contiguous_format) == torch.channels_last


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_products_pointwise_matmul(groups: int, layout: torch.memory_format) -> None:
    """A 1x1 conv on NCHW memory runs as one batched matmul: the float64 conv's values (integer operands with
    sums below 2^24: exact in any order), NCHW out; on channels-last input it stays the conv."""
    g = torch.Generator().manual_seed(groups)
    x = torch.randint(-128, 128, (3, 8, 5, 6), generator=g).float().contiguous(memory_format=layout)
    w = torch.randint(-127, 128, (6, 8 // groups, 1, 1), generator=g).float()
    ref = F.conv2d(x.double(), w.double(), None, 1, 0, 1, groups)
    got = conv_products(x, w, (1, 1), (0, 0), (1, 1), groups)
    assert got.dtype == torch.float32 and torch.equal(got.double(), ref)
    assert got.is_contiguous(memory_format=layout)
    parts = conv_chunk_products(x, chunk_weight(w, 2), 2, 1, 0, 1) if groups == 1 else None
    if parts is not None:  # the chunks' products: each half of the input channels
        assert torch.equal(parts[0].double(), F.conv2d(x[:, :4].double(), w[:, :4].double()))
        assert torch.equal(parts[1].double(), F.conv2d(x[:, 4:].double(), w[:, 4:].double()))
    w3 = torch.randint(-127, 128, (6, 8 // groups, 3, 3), generator=g).float()
    ref3 = F.conv2d(x.double(), w3.double(), None, 1, 1, 1, groups)
    assert torch.equal(conv_products(x, w3, 1, 1, 1, groups).double(), ref3)
