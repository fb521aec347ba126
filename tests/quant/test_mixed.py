"""OMQ (MPQ-DM outlier-driven mixed quantization): kurtosis, bit plans, group-size search, and
a calibrate → reload → merge round trip with per-channel weight bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import scipy.stats
import torch
from safetensors.torch import load_file
from torch import nn

from lowbitdm_cli.export.checkpoint import WEIGHTS_NAME, load_merged
from lowbitdm_cli.quant.init import init_quantizer
from lowbitdm_cli.quant.layers import QuantConv2d, QuantLinear, quant_layers
from lowbitdm_cli.quant.mixed import channel_kurtosis, group_size, omq_bits, search_group_size
from lowbitdm_cli.quant.policy import LayerSpec
from lowbitdm_cli.recipes import load_recipe


@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 3, 3)], ids=["linear", "conv"])
def test_kurtosis_matches_scipy(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) ** 3  # heavy tails, so κ varies between channels
    ref = scipy.stats.kurtosis(w.reshape(shape[0], -1).double().numpy(), axis=1, fisher=False, bias=True)
    # both in float64 (they differ by ~1e-15 relative), then rounded to float32: at most one float32 ulp apart
    torch.testing.assert_close(channel_kurtosis(w), torch.tensor(ref, dtype=torch.float32), rtol=2.0**-23, atol=0)


def test_kurtosis_of_constant_channel_is_zero():
    w = torch.randn(3, 8)
    w[1] = 0.5
    assert channel_kurtosis(w)[1] == 0


@pytest.mark.parametrize("base", [2, 4, 7], ids=["w2", "w4", "w7"])
def test_omq_bits_groups_and_average(base):
    kurt = torch.tensor([3.0, 9.0, 1.5, 4.0, 2.0, 20.0, 1.2, 3.5])
    bits = omq_bits(kurt, base, k=2)
    assert bits.mean().item() == base
    expected = torch.full((8,), float(base))
    expected[[5, 1]] = base + 1   # highest κ: 20, 9
    expected[[6, 2]] = base - 1   # lowest κ: 1.2, 1.5
    torch.testing.assert_close(bits, expected)
    if base == 2:
        assert bits.min().item() == 1
    assert torch.equal(omq_bits(kurt, base, k=0), torch.full((8,), float(base)))


def test_omq_bits_rejects_what_breaks_the_average():
    kurt = torch.arange(6.0)
    with pytest.raises(ValueError, match="b±1"):
        omq_bits(kurt, 8, k=1)
    with pytest.raises(ValueError, match="b±1"):
        omq_bits(kurt, 2, k=1, min_bits=2)
    with pytest.raises(ValueError, match="2k"):
        omq_bits(kurt, 4, k=4)


def test_group_size_is_half_the_changed_fraction():
    assert [group_size(f, 40) for f in (0.0, 0.1, 0.2, 0.5, 1.0)] == [0, 2, 4, 10, 20]
    assert group_size(0.1, 16) == 0  # fewer than two channels' worth: nothing changes


def _planted_layer() -> tuple[QuantLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(32, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 32, generator=gen))
        lin.weight[:4, 0] = 30.0  # outlier channels: one huge weight each → high κ
        lin.weight[36:] = torch.randint(0, 2, (4, 32), generator=gen).float() * 2 - 1  # ±1: κ = 1
    layer = QuantLinear.from_float(lin, LayerSpec(role="linear", kind="linear", w_bits=3, a_bits=None))
    init_quantizer(layer.w_quant, layer.weight.detach(), "minmax")
    return layer, torch.randn(256, 32, generator=gen)


def test_search_picks_nonzero_fraction_on_planted_outliers():
    layer, x = _planted_layer()
    bits, errors = search_group_size(layer, [x[:128], x[128:]], 3, [0.0, 0.1, 0.2, 0.3], "minmax")
    assert bits.mean().item() == 3
    assert min(errors.values()) < errors[0.0]
    assert (bits[:4] == 4).all()  # the planted outliers got the extra bit
    # the quantizer is left at the winning bits and re-initialised for them
    torch.testing.assert_close(layer.w_quant.bits.reshape(-1), bits)
    # the winner's error again, as the search sums it (the same halves, float64 sums of float32
    # outputs): the layer's own forward gives the very same products, so the same bits
    with torch.no_grad():
        diffs = [layer(h) - nn.functional.linear(h, layer.weight, layer.bias) for h in (x[:128], x[128:])]
    total = sum(float(d.double().pow(2).sum()) for d in diffs)
    assert total / sum(d.numel() for d in diffs) == min(errors.values())


def test_search_keeps_uniform_bits_when_nothing_helps():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.linspace(-1, 1, 27).repeat(8, 1).reshape(8, 3, 3, 3))  # identical channels
    layer = QuantConv2d.from_float(conv, LayerSpec(role="conv", kind="conv", w_bits=4, a_bits=None))
    init_quantizer(layer.w_quant, layer.weight.detach(), "minmax")
    bits, errors = search_group_size(layer, torch.randn(2, 3, 6, 6), 4, [0.0, 0.5], "minmax")
    assert errors[0.5] >= errors[0.0] and torch.equal(bits, torch.full((8,), 4.0))


def test_calibrate_omq_reload_merge_roundtrip(tmp_path: Path):
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.common import load_quantized_from
    from lowbitdm_cli.stages.merge import merge

    recipe = load_recipe("ptq", model="tiny-random", bits="w3a8",
                         sets=["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4",
                               'calibrate.mixed="omq"'])
    art = calibrate(recipe, tmp_path / "calibrate")
    record = art.manifest.info["omq"]
    assert record and all(sum(r["bits"]) == 3 * len(r["bits"]) for r in record.values())
    assert all(len(r["kurtosis"]) == len(r["bits"]) and "0" in r["errors"] for r in record.values())
    mixed = {n for n, r in record.items() if len(set(r["bits"])) > 1}
    assert mixed, "no layer chose mixed bits"
    layers = art.manifest.info["layers"]
    assert all(layers[n]["w_bits"] == 3 for n in record)
    assert not any(layers[n]["w_bits"] == 8 for n in record)  # 8-bit layers are skipped

    model = load_quantized_from(art)
    for name, layer in quant_layers(model.denoiser).items():
        if name in record:
            assert layer.w_quant.bits.reshape(-1).tolist() == [float(b) for b in record[name]["bits"]]

    merged = merge(art, tmp_path / "merge")
    tensors = load_file(str(merged.path / WEIGHTS_NAME))
    for name in mixed:
        assert tensors[f"{name}.weight_bits"].tolist() == record[name]["bits"]
    fq = load_merged(merged.path, "fake")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *model.sample_shape), generator=gen)
    cond = torch.tensor([1, 7])
    t = art.manifest.info["timesteps"][1]
    with torch.no_grad():
        diff = (fq.eps(x, t, cond, 2.0) - model.eps(x, t, cond, 2.0)).abs().max().item()
    assert diff == 0.0  # the merged fake model dequantizes the same codes: the same operations, the same bits
