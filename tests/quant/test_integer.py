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
    RESCALE_ORDERS,
    accumulate,
    rescale,
    rescale_order,
    split_plan,
    split_weight,
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


@pytest.mark.parametrize("kind", ["linear", "wide-linear", "conv"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_layer_inference_is_integer_exact(kind: str, bits: int) -> None:
    """No-grad forward of a quantized layer equals ((Σ(qx−zx)(qw−zw))·Δx)·Δw + b from int64 sums,
    and the STE (training) path agrees with it to float rounding. The wide 8-bit linear needs
    the split weight (its sums exceed float32's exact integers)."""
    g = torch.Generator().manual_seed(bits)
    torch.manual_seed(bits)
    width = 8192 if kind == "wide-linear" else 600
    kind = kind.removeprefix("wide-")
    base = nn.Linear(width, 24) if kind == "linear" else nn.Conv2d(64, 24, 3, padding=1)
    spec = LayerSpec(role=kind, kind=kind, w_bits=bits, a_bits=bits)
    layer = (QuantLinear if kind == "linear" else QuantConv2d).from_float(base, spec)
    x = torch.randn((8, width) if kind == "linear" else (2, 64, 6, 6), generator=g) * 3 + 1
    init_quantizer(layer.w_quant, layer.weight.detach(), "minmax")
    init_quantizer(layer.a_quant, x, "minmax")
    with torch.no_grad():
        out = layer(x)
        x_int, x_scale, _ = layer.a_quant.integer_values(x)
        w_int, w_scale, _, _ = layer.integer_weight()
    if kind == "linear":
        acc = _exact(x_int, w_int)
    else:
        cols = F.unfold(x_int, 3, padding=1).transpose(1, 2).reshape(-1, 64 * 9)  # [N·H·W, K]
        acc = _exact(cols, w_int.reshape(24, -1)).reshape(2, 36, 24).transpose(1, 2).reshape(2, 24, 6, 6)
    ref = rescale(acc, x_scale.detach(), w_scale, layer.bias.detach(), -1 if kind == "linear" else 1,
                  "linear" if kind == "linear" else "conv")
    assert torch.equal(out, ref)
    if width > 600 and bits == 8:
        assert split_plan(255, float(w_int.abs().sum(1).max()), width) not in (0, None)
    ste = layer(x).detach()  # autograd on: the float path
    # the float path rounds the dequantized values (1 rounding each), then sums K products in float32
    # in any order, then adds the bias: |error| <= (K + 3)·u·(Σ_k |x_k||w_k| + |b|) with u = 2^-24
    # (Higham's γ_{K+3}, (K+3)·u < 0.01 here), whatever kernel or summation order the CPU picks
    abs_acc = (x_int.abs().double() if kind == "linear" else
               F.unfold(x_int.abs().double(), 3, padding=1).transpose(1, 2).reshape(-1, 64 * 9))
    mags = abs_acc @ w_int.abs().double().reshape(24, -1).t()
    if kind == "conv":
        mags = mags.reshape(2, 36, 24).transpose(1, 2).reshape(2, 24, 6, 6)
    shape = (1, -1) if kind == "linear" else (1, -1, 1, 1)
    mags = mags * float(x_scale.abs().max()) * w_scale.abs().double().reshape(shape) + \
        layer.bias.detach().abs().double().reshape(shape)
    k = abs_acc.shape[-1]
    assert ((ste.double() - out.double()).abs() <= 1.01 * (k + 3) * 2.0**-24 * mags).all()
