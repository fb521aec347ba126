"""The transformer methods' math (`quant.transforms`, per-token quantizers, the bit budget and the
layer roles of a DiT) against hand computations and independent references (scipy's Hadamard
matrix, float64 products, the Eckart–Young optimum)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.calibration.transforms import transform_weight
from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.quant.config import QuantArgs, QuantScheme
from lowbitdm_cli.quant.cost import LOW_RANK_KEY, bit_budget
from lowbitdm_cli.quant.layers import QuantLinear
from lowbitdm_cli.quant.policy import LayerSpec, build_layer_specs, layer_part, layer_role
from lowbitdm_cli.quant.quantizer import UniformQuantizer, token_scale
from lowbitdm_cli.quant.transforms import (
    fold_into_down,
    hadamard_block,
    hadamard_transform,
    low_rank_split,
    smoothing_factors,
    transform_input,
)

U32 = 2.0**-24  # float32 unit roundoff


# --- rotation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [2, 4, 16, 128])
def test_hadamard_is_scipys_normalised_sylvester_matrix(block: int) -> None:
    h = hadamard_transform(torch.eye(block, dtype=torch.float64), block).numpy()
    ref = scipy.linalg.hadamard(block) / np.sqrt(block)
    # float64: butterflies of 0/1 entries are exact, then one scaling each side (≤ u64 of entries ≤ 1)
    assert np.allclose(h, ref, rtol=0, atol=1e-15)
    # sums of ≤ 128 products of magnitude 1/block: ≤ 128·u64 ≈ 1.4e-14
    assert np.allclose(h @ h.T, np.eye(block), rtol=0, atol=1e-13)  # orthogonal (and symmetric)


def test_hadamard_butterfly_order_is_fixed() -> None:
    """The butterfly's float operations and their order (stage h = 1, 2, 4, ...: a + b, a − b, then one
    scaling) are part of the checkpoint format's numerics: the same bits as that sequence written out
    plainly, for float32 inputs of several shapes (so published figures do not move)."""
    def reference(x: torch.Tensor, block: int) -> torch.Tensor:
        y = x.reshape(-1, block)
        h = 1
        while h < block:
            pairs = y.reshape(y.shape[0], block // (2 * h), 2, h)
            y = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), 2)
            y = y.reshape(-1, block)
            h *= 2
        return (y * (1.0 / math.sqrt(block))).reshape(x.shape)

    g = torch.Generator().manual_seed(0)
    for shape, block in [((5, 64, 128), 128), ((7, 3, 192), 64), ((4, 8), 8), ((3, 6), 2), ((3, 5), 1)]:
        x = torch.randn(shape, generator=g) * 10
        assert torch.equal(hadamard_transform(x, block), reference(x, block))
        # with autograd (finetuning through a rotated layer): the same bits, and the gradient is H·g = x·H's
        xg = x.clone().requires_grad_(True)
        y = hadamard_transform(xg, block)
        assert torch.equal(y.detach(), reference(x, block))
        y.backward(torch.ones_like(y))
        assert torch.equal(xg.grad, hadamard_transform(torch.ones_like(x), block))


def test_hadamard_is_block_diagonal_for_other_widths() -> None:
    assert [hadamard_block(k) for k in (128, 768, 48, 7, 1152)] == [128, 256, 16, 1, 128]
    k, block = 48, hadamard_block(48)
    h = hadamard_transform(torch.eye(k, dtype=torch.float64), block).numpy()
    ref = scipy.linalg.block_diag(*[scipy.linalg.hadamard(block) / np.sqrt(block)] * (k // block))
    assert np.allclose(h, ref, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(torch.zeros(2, 48), 32)


def test_rotation_keeps_the_product_and_norms() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g, dtype=torch.float64), torch.randn(7, 64, generator=g, dtype=torch.float64)
    xr, wr = hadamard_transform(x, 64), hadamard_transform(w, 64)
    # float64: 6 butterfly stages on partial sums ≤ ‖x‖₁ (scaled by the exact 1/8), then 64-term sums:
    # each product within 80·u64·(‖x‖₁‖w‖₁ + |x|·|w|ᵀ) of exact
    l1 = x.abs().sum(1)[:, None] * w.abs().sum(1)[None] + x.abs() @ w.abs().T
    assert ((xr @ wr.T - x @ w.T).abs() <= 80 * 2.0**-53 * l1).all()
    # norms: entries of xr within 6·u64·‖x‖₂, the 64-term sum of squares and the sqrt: < 128·u64 relative
    assert torch.allclose(xr.norm(dim=1), x.norm(dim=1), rtol=128 * 2.0**-53, atol=0)


# --- smoothing ----------------------------------------------------------------------------------
def test_smoothing_factors_by_hand() -> None:
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([[1.0, -2.0, 3.0, 0.0], [-4.0, 0.5, 1.0, 0.0]])
    # s_j = max|X_j|^0.5 / max|W_j|^0.5: sqrt(4/4), sqrt(1/2); dead input and dead weight column: 1
    # float32 pow (≤ 2 ulp each, two of them) and a division: within 8·u32 relative
    assert torch.allclose(smoothing_factors(act, w, 0.5), torch.tensor([1.0, 0.5**0.5, 1.0, 1.0]), rtol=8 * U32, atol=0)
    # α = 0.75: 4^0.75 / 4^0.25 = 2, 1 / 2^0.25
    assert torch.allclose(smoothing_factors(act, w, 0.75), torch.tensor([2.0, 2**-0.25, 1.0, 1.0]), rtol=8 * U32,
                          atol=0)
    with pytest.raises(ValueError, match="input channels"):
        smoothing_factors(act[:3], w, 0.5)


def test_smoothing_leaves_the_product_unchanged_to_its_rounding_bound() -> None:
    """(X/s)·(W·s)ᵀ with both operands rounded to float32: each term x_j·w_j picks up (1+δ1)(1+δ2),
    |δ| ≤ u = 2^-24, so the float64 products differ by at most (2u + u²)·Σ_j |x_j|·|w_j|."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 40, generator=g) * torch.logspace(-2, 2, 40)  # outlier channels
    w = torch.randn(24, 40, generator=g)
    s = smoothing_factors(x.abs().amax(0), w, 0.5)
    xs, ws = x / s, (w.double() * s.double()).float()
    ref = x.double() @ w.double().T
    got = xs.double() @ ws.double().T
    bound = (2 * U32 + U32**2) * (x.double().abs() @ w.double().abs().T) + 1e-12
    assert ((got - ref).abs() <= bound).all()
    # and the smoothed input's channel maxima are far more even than the raw ones
    assert xs.abs().amax(0).max() / xs.abs().amax(0).min() < x.abs().amax(0).max() / x.abs().amax(0).min() / 10


# --- the low-rank branch ------------------------------------------------------------------------
def test_low_rank_split_reconstructs_the_weight_and_is_optimal() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 32, generator=g)
    up, down, res = low_rank_split(w, 6)
    assert up.shape == (48, 6) and down.shape == (6, 32) and res.dtype == torch.float32
    approx = up.double() @ down.double()
    err = (w.double() - approx - res.double()).abs()
    assert (err <= U32 * res.double().abs() + 1e-12 * (w.double().abs() + approx.abs())).all()  # one rounding
    sv = np.linalg.svd(w.double().numpy(), compute_uv=False)
    # Eckart–Young: the residual's energy is that of the trailing singular values, up to the float32
    # factors (residual moved by δ, ‖δ‖ ≤ 2.01·u32·‖|up|·|down|‖) and its own rounding (≤ u32 each):
    # relative ≤ 2·(‖δ‖ + u32·‖res‖)/‖res‖ to first order; 1e-12 covers the float64 SVD
    lr = float((up.double().abs() @ down.double().abs()).norm() / res.double().norm())
    rel = 1.01 * 2 * U32 * (2.01 * lr + 1.01) + 1e-12
    assert float(res.double().pow(2).sum()) == pytest.approx(float((sv[6:] ** 2).sum()), rel=rel)
    assert torch.linalg.matrix_rank(approx).item() == 6


def test_branch_folded_onto_the_raw_input() -> None:
    """transform_input(x)·downᵀ == x·fold_into_down(down)ᵀ, and the layer's pieces add up to W:
    (transform_input(x))·Rᵀ + x·Dᵀ·upᵀ == x·Wᵀ (float64 reference, float32 factors)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(9, 32, generator=g), torch.randn(16, 32, generator=g)
    s = torch.rand(32, generator=g) + 0.5
    residual, (down_raw, up) = transform_weight(w, s, 16, 4)
    xt = transform_input(x.double(), s.double(), 16)
    out = xt @ residual.double().T + x.double() @ down_raw.double().T @ up.double().T
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert ((out - ref).abs() <= 64 * U32 * scale).all()
    _, down, _ = low_rank_split(hadamard_transform(w.double() * s.double(), 16), 4)
    # D = (down·H)/s is computed in float64 and rounded to float32 once (≤ u32·|D| each); both sides are
    # float64 sums of ≤ 32 terms otherwise (≤ 64·u64 ≈ 7e-15 of their magnitudes, inside the 1e-12 term)
    d64 = hadamard_transform(down.double(), 16) / s.double()
    bound = 2 * U32 * (x.double().abs() @ d64.abs().T) + 1e-12 * (xt.abs() @ down.double().abs().T)
    assert ((xt @ down.double().T - x.double() @ fold_into_down(down, s, 16).double().T).abs() <= bound).all()


# --- per-token activations -------------------------------------------------------------------------
def test_token_scale_and_codes_by_hand() -> None:
    x = torch.tensor([[1.0, -3.0, 2.0], [0.0, 0.0, 0.0], [7.0, 3.5, -2.5]])
    delta = token_scale(x, 4)  # 4 bits: max|x| / 7
    assert torch.equal(delta, torch.tensor([[3.0 / 7], [1e-8], [1.0]]))
    q = UniformQuantizer(4, "symmetric", dynamic=True)
    codes, d, bound = q.integer_values(x)
    assert torch.equal(codes, torch.tensor([[2.0, -7.0, 5.0], [0.0, 0.0, 0.0], [7.0, 4.0, -2.0]]))  # ties to even
    assert torch.equal(d, delta) and bound == (8.0, 7.0)
    assert torch.equal(q(x), codes * delta)  # the STE forward dequantizes the same codes
    with pytest.raises(ValueError, match="dynamic"):
        UniformQuantizer(4, "asymmetric", dynamic=True)


def test_per_token_args_are_symmetric_and_dynamic() -> None:
    QuantArgs(num_bits=4, symmetric=True, strategy="token", dynamic=True)
    for bad in ({"strategy": "token"}, {"dynamic": True}, {"strategy": "token", "dynamic": True},
                {"strategy": "token", "dynamic": True, "symmetric": True, "per_timestep": True}):
        with pytest.raises(ValueError):
            QuantArgs(num_bits=4, **{"symmetric": False, **bad})


# --- a transformed layer ------------------------------------------------------------------------------
def test_transformed_layer_with_quantizers_off_is_the_float_layer() -> None:
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(32, 16)
    w0 = lin.weight.detach().clone()
    spec = LayerSpec(role="linear", kind="linear", w_bits=4, a_bits=4, smooth=True, rotate=32, low_rank=4,
                     a_dynamic=True, a_symmetric=True)
    layer = QuantLinear.from_float(lin, spec)
    s = torch.rand(32, generator=g) + 0.5
    residual, (down, up) = transform_weight(w0, s, 32, 4)
    with torch.no_grad():
        layer.smooth.copy_(s), layer.weight.copy_(residual), layer.low_rank_down.copy_(down)
        layer.low_rank_up.copy_(up)
    layer.w_quant.enabled = layer.a_quant.enabled = False
    x = torch.randn(3, 5, 32, generator=g)
    ref = F.linear(x.double(), w0.double(), lin.bias.double())
    # float32: x/s and the 32-wide Hadamard (≤ 7 roundings on partial sums ≤ Σ|x/s|/√32), the 32-term
    # residual product, the rank-4 branch (32 + 4 terms), the bias, and W split into float32 R, D, up:
    # fewer than 64 roundings, each on magnitudes within `scale`
    xt_mag = ((x.double().abs() / s.double()).sum(-1, keepdim=True) / 32**0.5).expand(-1, -1, 32)
    scale = xt_mag @ residual.double().abs().T + (x.double().abs() @ down.double().abs().T) @ up.double().abs().T \
        + lin.bias.double().abs()
    assert ((layer(x).double() - ref).abs() <= 64 * U32 * scale).all()


# --- roles, parts and scopes on a DiT ----------------------------------------------------------------
def _dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4)


def test_dit_layers_have_distinct_roles_and_parts() -> None:
    den = _dit()
    got = {n: (layer_role(n, m), layer_part(n)) for n, m in den.named_modules()
           if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith("transformer_blocks.1.")}
    b = "transformer_blocks.0."
    assert got == {
        "pos_embed.proj": ("conv_in", None),
        b + "norm1.emb.timestep_embedder.linear_1": ("time_embedding", None),
        b + "norm1.emb.timestep_embedder.linear_2": ("time_embedding", None),
        b + "norm1.linear": ("adaln", None),
        b + "attn1.to_q": ("attention", "attention_qkv"), b + "attn1.to_k": ("attention", "attention_qkv"),
        b + "attn1.to_v": ("attention", "attention_qkv"), b + "attn1.to_out.0": ("attention", "attention_out"),
        b + "ff.net.0.proj": ("feed_forward", "ff_in"), b + "ff.net.2": ("feed_forward", "ff_out"),
        "proj_out_1": ("conv_out", None), "proj_out_2": ("conv_out", None)}


def test_scopes_pick_layers_by_role_part_and_pattern() -> None:
    den = _dit()
    scheme = QuantScheme(bits="w4a4", a_temporal=True, keep_8bit=["attention_out"], skip=["ff_out"],
                         a_per_token=["attention_qkv", "adaln"], smooth=["feed_forward", "pos_embed.proj"],
                         rotate=["*.to_out.0"], low_rank=["attention"], low_rank_dim=4)
    specs = build_layer_specs(den, scheme)
    b = "transformer_blocks.0."
    assert "transformer_blocks.0.ff.net.2" not in specs  # skipped by its part
    assert (specs[b + "attn1.to_out.0"].w_bits, specs[b + "attn1.to_out.0"].a_bits) == (8, 8)
    q = specs[b + "attn1.to_q"]
    assert q.a_dynamic and q.a_symmetric and not q.a_temporal and q.low_rank == 4 and not q.smooth
    assert specs[b + "norm1.linear"].a_dynamic and specs[b + "attn1.to_out.0"].a_temporal
    assert specs[b + "ff.net.0.proj"].smooth and not specs[b + "ff.net.0.proj"].a_dynamic
    assert specs[b + "attn1.to_out.0"].rotate == 16 and specs[b + "attn1.to_q"].rotate is None
    assert not specs["pos_embed.proj"].transformed  # a conv: the methods apply to linears only
    assert not any(s.transformed or s.a_dynamic for n, s in specs.items() if "timestep_embedder" in n)
    # a rank that is not below min(O, K) gives no branch
    assert build_layer_specs(den, scheme.model_copy(update={"low_rank_dim": 16}))[b + "attn1.to_q"].low_rank is None
    with pytest.raises(RecipeError, match="matches no layer"):
        build_layer_specs(den, QuantScheme(smooth=["feedforward"]))
    with pytest.raises(ValueError, match="unknown role"):
        QuantScheme(keep_8bit=["attention_q"])


# --- the bit budget ------------------------------------------------------------------------------
def test_bit_budget_counts_the_branch_at_32_bits() -> None:
    specs = {"a": LayerSpec(role="linear", kind="linear", w_bits=4, a_bits=4, low_rank=2),
             "b": LayerSpec(role="linear", kind="linear", w_bits=8, a_bits=8)}
    # "a": 10 tokens x K=16 x O=8 = 1280 MACs, branch 10 x 2 x (16 + 8) = 480; "b": 240
    budget = bit_budget(specs, {"a": 1280, LOW_RANK_KEY.format(name="a"): 480, "b": 240})
    assert budget["macs_per_sample"] == 2000
    assert budget["mean_w_bits"] == pytest.approx((1280 * 4 + 480 * 32 + 240 * 8) / 2000, abs=1e-3)
    assert budget["a_bits_mac_share"] == {"4": 0.64, "8": 0.12, "fp": 0.24}
