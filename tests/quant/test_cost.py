"""MAC counting and the MAC-weighted bit budget, against hand-computed values."""

import pytest
from torch import nn

from lowbitdm_cli.quant.cost import bit_budget, layer_macs
from lowbitdm_cli.quant.policy import LayerSpec
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.stages.common import load_fp_model


def test_layer_macs_match_the_conv_and_linear_formulas():
    model = load_fp_model("tiny-random", load_recipe("ptq", model="tiny-random"))
    modules = dict(model.denoiser.named_modules())
    conv_in = modules["conv_in"]
    linear = next(n for n, m in modules.items() if isinstance(m, nn.Linear))
    macs = layer_macs(model, ["conv_in", linear])
    _c, h, w = model.sample_shape  # conv_in keeps the resolution (3x3, padding 1)
    assert macs["conv_in"] == conv_in.out_channels * conv_in.in_channels * 3 * 3 * h * w
    lin = modules[linear]
    assert macs[linear] % (lin.in_features * lin.out_features) == 0  # one row per token
    assert macs[linear] >= lin.in_features * lin.out_features


def test_bit_budget_weights_bits_by_macs():
    specs = {"a": LayerSpec(role="conv", kind="conv", w_bits=4, a_bits=4),
             "b": LayerSpec(role="conv", kind="conv", w_bits=4, a_bits=8),
             "c": LayerSpec(role="conv", kind="conv", w_bits=8, a_bits=None)}
    budget = bit_budget(specs, {"a": 600, "b": 300, "c": 100})
    assert budget["macs_per_sample"] == 1000
    assert budget["mean_w_bits"] == pytest.approx((600 * 4 + 300 * 4 + 100 * 8) / 1000)
    assert budget["mean_a_bits"] == pytest.approx((600 * 4 + 300 * 8 + 100 * 32) / 1000)
    assert budget["a_bits_mac_share"] == {"4": 0.6, "8": 0.3, "fp": 0.1}
    assert budget["w_bits_mac_share"] == {"4": 0.9, "8": 0.1}
    assert bit_budget(specs, {}) == {}
    # attention-matmul specs are no conv / linear layers: left out, whatever MACs a caller passes
    with_matmul = {**specs, "m": LayerSpec(role="attention_matmul", kind="matmul", a_bits=4)}
    assert bit_budget(with_matmul, {"a": 600, "b": 300, "c": 100, "m": 500}) == budget
