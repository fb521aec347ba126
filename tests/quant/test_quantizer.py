"""Quantizer math against hand-computed values and the LSQ paper's gradient formula."""

import pytest
import torch

from lowbitdm_cli.quant.init import init_quantizer, range_to_params, search_params
from lowbitdm_cli.quant.quantizer import UniformQuantizer, fake_quantize, quant_range


def test_quant_range():
    assert [int(v) for v in quant_range(4, "asymmetric")] == [0, 15]
    assert [int(v) for v in quant_range(4, "symmetric")] == [-8, 7]
    assert [int(v) for v in quant_range(8, "unsigned")] == [0, 255]
    lo, hi = quant_range(torch.tensor([2.0, 3.0, 4.0]), "asymmetric")
    assert hi.tolist() == [3, 7, 15]


def test_asymmetric_per_tensor_by_hand():
    # Δ = 0.5, z = 2, 2 bits: codes clamp(round(x/0.5) + 2, 0, 3)
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.2, 0.26, 0.5, 0.74, 3.0])
    # round(x/Δ): -4, -2, -1 (−0.6), 0, 0 (0.4), 1 (0.52), 1, 1 (1.48), 6
    # + z, clamp [0, 3]: 0, 0, 1, 2, 2, 3, 3, 3, 3 → (q − z)·Δ
    expected = torch.tensor([-1.0, -1.0, -0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    out = fake_quantize(x, torch.tensor(0.5), torch.tensor(2.0), torch.tensor(2.0), "asymmetric")
    assert torch.equal(out, expected)  # Δ a power of two: every value is exact


def test_symmetric_per_tensor_by_hand():
    x = torch.tensor([-5.0, -0.74, 0.3, 1.1, 9.0])
    # 3 bits symmetric: codes in [-4, 3], Δ = 1: −5→−4, −0.74→−1, 0.3→0, 1.1→1, 9→3
    out = fake_quantize(x, torch.tensor(1.0), torch.tensor(0.0), torch.tensor(3.0), "symmetric")
    assert torch.equal(out, torch.tensor([-4.0, -1.0, 0.0, 1.0, 3.0]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8], ids=lambda b: f"b{b}")
def test_minmax_per_channel_grid(bits):
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.0, 0.25, 0.5, 1.0]])
    bits_t = torch.full((2, 1), float(bits))
    delta, zero = search_params(w, bits_t, "asymmetric", 0, "minmax")
    levels = 2**bits - 1
    # row 0: range [-1, 2] → Δ = 3/levels, z = round(1/Δ); row 1: range [0, 1] (0 included) → z = 0
    # 3/levels and 1/levels rounded to float32 once on each side (float32 division vs float64 then float32)
    torch.testing.assert_close(delta.flatten(), torch.tensor([3.0 / levels, 1.0 / levels]), rtol=2.0**-23, atol=0)
    assert zero.flatten().tolist() == [round(levels / 3.0), 0.0]
    q = fake_quantize(w, delta, zero, bits_t, "asymmetric")
    # endpoints of each row's range are representable up to half a step; errors never exceed Δ/2
    assert ((q - w).abs() <= delta / 2 + 1e-6).all()


def test_range_includes_zero_and_unsigned():
    delta, zero = range_to_params(torch.tensor([0.2]), torch.tensor([1.0]), torch.tensor([8.0]), "asymmetric")
    assert zero.item() == 0 and delta.item() == pytest.approx(1.0 / 255)
    delta, zero = range_to_params(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([8.0]), "unsigned")
    assert delta.item() == pytest.approx(1.0 / 255) and zero.item() == 0


def test_mse_init_beats_minmax_with_an_outlier():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g)
    x[0] = 40.0
    bits = torch.tensor([4.0])
    errs = {}
    for method in ("minmax", "mse", "percentile"):
        d, z = search_params(x, bits, "asymmetric", None, method)
        errs[method] = (fake_quantize(x, d, z, bits, "asymmetric") - x).pow(2).mean().item()
    assert errs["mse"] < errs["minmax"] / 2
    assert errs["percentile"] < errs["minmax"] / 2


def test_lsq_gradient_matches_paper_formula():
    # Esser et al. 2020, eq. 3 (with zero point): ∂x̂/∂Δ = round(x/Δ) − x/Δ inside the range,
    # (q_min − z) below it and (q_max − z) above it.
    x = torch.tensor([-3.0, -0.3, 0.2, 0.74, 5.0])
    delta = torch.tensor(0.5, requires_grad=True)
    zero = torch.tensor(2.0)
    out = fake_quantize(x, delta, zero, torch.tensor(2.0), "asymmetric")
    grads = [torch.autograd.grad(out[i], delta, retain_graph=True)[0].item() for i in range(len(x))]
    v = x / 0.5
    inside = [(torch.round(v[i]) - v[i]).item() for i in range(len(x))]
    # −3 clips low; 0.74 → round(1.48) + 2 = 3 = q_max exactly, still inside (full gradient, no tie
    # splitting); 5 clips high.
    expected = [0 - 2, inside[1], inside[2], inside[3], 3 - 2]
    assert grads == expected  # the backward's own float32 ops (round(v) − v, q − z): the same bits


def test_lsq_grad_scale_option():
    x = torch.randn(64)
    q = UniformQuantizer(4, lsq_grad_scale=True)
    q.delta.data.fill_(0.1)
    q.train()
    q(x).sum().backward()
    g_scaled = q.delta.grad.clone()
    q2 = UniformQuantizer(4)
    q2.delta.data.fill_(0.1)
    q2(x).sum().backward()
    # gradient scale g = 1 / sqrt(N · Q_p) with N = 64 elements per Δ, Q_p = 15. Scaling each of the 64
    # terms (|∂x̂/∂Δ| ≤ 8 at 4 bits) before the sum instead of after: ≤ (64 + 3)·u32·g·64·8 apart
    g = (64 * 15) ** -0.5
    torch.testing.assert_close(g_scaled, q2.delta.grad * g, rtol=0, atol=67 * 2.0**-24 * g * 64 * 8)


def test_ste_passes_gradient_inside_range_only():
    x = torch.tensor([-10.0, 0.3, 10.0], requires_grad=True)
    out = fake_quantize(x, torch.tensor(0.1), torch.tensor(8.0), torch.tensor(4.0), "asymmetric")
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_temporal_quantizer_selects_by_timestep_value():
    q = UniformQuantizer(8, timesteps=[980, 500, 20])
    with torch.no_grad():
        q.delta.copy_(torch.tensor([[1.0], [0.1], [0.01]]).reshape(q.delta.shape))
    x = torch.tensor([0.123])
    q.set_timestep(500)
    assert q(x).item() == pytest.approx(0.1)
    q.set_timestep(20)
    assert q(x).item() == pytest.approx(0.12)
    q.set_timestep(980)
    assert q(x).item() == pytest.approx(0.0)
    # a timestep that was not calibrated maps to the nearest one and is reported
    q.set_timestep(30)
    assert q(x).item() == pytest.approx(0.12)
    assert q.unmatched_timesteps == {30}
    # parameters are real tensors in the state dict, not Python state
    assert set(q.state_dict()) >= {"delta", "zero_point", "timesteps", "bits"}


def test_temporal_init_per_slot():
    q = UniformQuantizer(8, timesteps=[10, 20])
    q.set_timestep(20)
    init_quantizer(q, torch.tensor([-1.0, 1.0]), "minmax", timestep_index=q._index)
    assert q.delta[1].item() == pytest.approx(2.0 / 255)
    assert q.delta[0].item() == 1.0  # untouched slot


def test_per_channel_mixed_bits():
    w = torch.tensor([[0.0, 0.3, 0.6, 1.0], [0.0, 0.3, 0.6, 1.0]])
    q = UniformQuantizer(2, channel_axis=0, num_channels=2, ndim=2)
    q.bits.copy_(torch.tensor([[1.0], [3.0]]))
    init_quantizer(q, w, "minmax")
    out = q(w)
    # row 0 has 1 bit: levels {0, 1}; row 1 has 3 bits: 8 levels over [0, 1]
    assert torch.equal(out[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # k·fl(1/7) against fl(k/7): ≤ 2 float32 roundings of values ≤ 1 on one side, 1 on the other
    torch.testing.assert_close(out[1], torch.round(w[1] * 7) / 7, rtol=0, atol=3 * 2.0**-24)


def test_quantizer_state_dict_round_trip():
    q = UniformQuantizer(4, channel_axis=0, num_channels=3, ndim=4, timesteps=None)
    init_quantizer(q, torch.randn(3, 2, 3, 3), "mse")
    q2 = UniformQuantizer(4, channel_axis=0, num_channels=3, ndim=4)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(3, 2, 3, 3)
    assert torch.equal(q(x), q2(x))


def test_bad_bits_rejected():
    with pytest.raises(ValueError):
        UniformQuantizer(9)
    with pytest.raises(ValueError):
        UniformQuantizer(0)


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_integer_values_times_delta_is_the_fake_quantized_value(mode: str, bits: int) -> None:
    """(q − z)·Δ from `integer_values` equals `forward` bit for bit, at ties, beyond the range,
    at values whose quotient passes 2^24, and for NaN."""
    q = UniformQuantizer(bits, mode)
    with torch.no_grad():
        q.delta.fill_(0.037)
        q.zero_point.fill_(2.6 if mode == "asymmetric" else 0.0)
    g = torch.Generator().manual_seed(0)
    ties = (torch.arange(-300, 300) + 0.5) * 0.037
    x = torch.cat([torch.randn(2000, generator=g) * 3, ties, torch.tensor([1e9, -1e9, 1e30, float("nan")])])
    x_int, delta, bound = q.integer_values(x)
    with torch.no_grad():
        ref = q(x)
    assert torch.equal(x_int[:-1] * delta, ref[:-1]) and x_int[-1].isnan() and ref[-1].isnan()
    neg, pos = bound  # the clamp range of q − z: both ends reached by the ±1e9 inputs
    assert float(x_int[:-1].min()) == -neg and float(x_int[:-1].max()) == pos
    assert torch.equal(x_int[:-1], x_int[:-1].round())
