"""Quantized layers, the layer policy, and quant-state round trips on a tiny UNet."""

import pytest
import torch
from torch import nn

from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.quant.init import init_quantizer
from lowbitdm_cli.quant.layers import QuantConv2d, QuantLinear, quant_layers
from lowbitdm_cli.quant.model import load_quant_state, quant_state, quantize_denoiser, set_quant_enabled
from lowbitdm_cli.quant.policy import LayerOverride, LayerSpec, QuantPolicy, build_layer_specs, layer_role
from lowbitdm_cli.quant.quantizer import fake_quantize


def _spec(kind, w_bits=4, a_bits=8, **kw):
    return LayerSpec(role="conv", kind=kind, w_bits=w_bits, a_bits=a_bits, **kw)


def test_quant_conv_matches_explicit_fake_quant():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    ref = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    ref.load_state_dict(conv.state_dict())
    q = QuantConv2d.from_float(conv, _spec("conv"))
    init_quantizer(q.w_quant, q.weight.detach(), "minmax")
    x = torch.randn(2, 3, 8, 8)
    init_quantizer(q.a_quant, x, "minmax")
    wq = fake_quantize(ref.weight, q.w_quant.delta, q.w_quant.zero_point, q.w_quant.bits, "asymmetric")
    xq = fake_quantize(x, q.a_quant.delta, q.a_quant.zero_point, q.a_quant.bits, "asymmetric")
    assert torch.equal(q(x), nn.functional.conv2d(xq, wq, ref.bias, stride=2, padding=1))  # the same ops


def test_qalora_merges_before_quantization():
    # Ŵ = Q(W₀ + B·A) equals quantizing the explicitly merged weight (EfficientDM's QALoRA).
    torch.manual_seed(0)
    for layer, x in ((QuantLinear.from_float(nn.Linear(6, 4), _spec("linear")), torch.randn(3, 6)),
                     (QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), _spec("conv")), torch.randn(2, 3, 5, 5))):
        layer.add_lora(rank=2, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer.lora_B.normal_()
        init_quantizer(layer.w_quant, layer.merged_weight().detach(), "minmax")
        init_quantizer(layer.a_quant, x, "minmax")
        merged = layer.weight.detach() + (layer.lora_B @ layer.lora_A).detach().reshape(layer.weight.shape)
        expected_w = layer.w_quant(merged)
        assert torch.equal(layer.qweight(), expected_w)  # the same merge and quantizer ops
        # gradients reach both LoRA factors through the quantizer's STE
        layer(x).sum().backward()
        assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_roles_by_name():
    conv, lin = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)
    assert layer_role("conv_in", conv) == "conv_in"
    assert layer_role("time_embedding.linear_1", lin) == "time_embedding"
    assert layer_role("down_blocks.0.resnets.0.time_emb_proj", lin) == "time_emb_proj"
    assert layer_role("up_blocks.1.resnets.0.conv_shortcut", conv) == "shortcut"
    assert layer_role("down_blocks.0.downsamplers.0.conv", conv) == "downsample"
    assert layer_role("up_blocks.0.upsamplers.0.conv", conv) == "upsample"
    assert layer_role("mid_block.attentions.0.to_q", lin) == "attention"
    assert layer_role("mid_block.attentions.0.to_out.0", lin) == "attention"
    assert layer_role("down_blocks.0.resnets.0.conv1", conv) == "conv"


def test_policy_keeps_first_last_time_embedding_at_8bit_and_overrides():
    model = load_model("tiny-random")
    policy = QuantPolicy(w_bits=4, a_bits=4, skip=["shortcut"],
                         overrides=[LayerOverride(pattern="mid_block.*", w_bits=6, a_bits="fp")])
    specs = build_layer_specs(model.denoiser, policy)
    assert specs["conv_in"].w_bits == 8 and specs["conv_out"].a_bits == 8
    assert specs["time_embedding.linear_1"].w_bits == 8
    assert specs["down_blocks.0.resnets.0.conv1"].w_bits == 4
    assert not any(s.role == "shortcut" for s in specs.values())
    mid = [s for n, s in specs.items() if n.startswith("mid_block.")]
    assert mid and all(s.w_bits == 6 and s.a_bits is None for s in mid)
    assert "class_embedding" not in specs  # embeddings stay full precision


def test_quant_state_round_trip_restores_outputs():
    model = load_model("tiny-random")
    fp_state = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    specs = build_layer_specs(model.denoiser, QuantPolicy(w_bits=4, a_bits=8, a_temporal=True))
    quantize_denoiser(model.denoiser, specs, timesteps=[900, 500, 100])
    x = torch.randn(2, 1, 16, 16)
    for name, layer in quant_layers(model.denoiser).items():
        init_quantizer(layer.w_quant, layer.weight.detach(), "minmax")
        with torch.no_grad():
            layer.a_quant.delta.uniform_(0.01, 0.1)
        if name.startswith("up_blocks.0"):
            layer.add_lora(2)
    state = quant_state(model.denoiser, fp_state)
    assert all(".weight" not in k or "lora" in k for k in state)  # FP weights are not duplicated
    out = model.eps(x, 500, torch.tensor([1, 2]), guidance=2.0)

    fresh = load_model("tiny-random")
    quantize_denoiser(fresh.denoiser, specs, timesteps=[900, 500, 100])
    load_quant_state(fresh.denoiser, state)
    assert torch.equal(fresh.eps(x, 500, torch.tensor([1, 2]), guidance=2.0), out)  # same state, same ops
    set_quant_enabled(fresh.denoiser, weights=False, activations=False)
    fp = load_model("tiny-random")
    # with quantization off and zero LoRA B, the wrapped model is the FP model
    assert torch.equal(fresh.eps(x, 500, torch.tensor([1, 2])), fp.eps(x, 500, torch.tensor([1, 2])))  # W + 0 = W


def test_load_quant_state_rejects_foreign_keys():
    model = load_model("tiny-random")
    quantize_denoiser(model.denoiser, build_layer_specs(model.denoiser, QuantPolicy(w_bits=4, a_bits=4)))
    with pytest.raises(ValueError, match="lacks"):
        load_quant_state(model.denoiser, {"nope.delta": torch.ones(1)})
