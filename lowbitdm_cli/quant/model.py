"""Model-level verbs: wrap a denoiser's layers by their specs, toggle, save and load quant state."""

from __future__ import annotations

import torch
from torch import nn

from lowbitdm_cli.quant.attention import QuantAttnProcessor, attn_processors
from lowbitdm_cli.quant.layers import QuantConv2d, QuantLinear, quant_layers
from lowbitdm_cli.quant.policy import LayerSpec
from lowbitdm_cli.quant.quantizer import UniformQuantizer

__all__ = ["act_quantizers", "load_quant_state", "quant_state", "quantize_denoiser", "set_quant_enabled"]


def quantize_denoiser(denoiser: nn.Module, specs: dict[str, LayerSpec], timesteps: list[int] | None = None
                      ) -> nn.Module:
    """Replace each layer named in `specs` by its quantized wrapper (in place; parameters shared).

    `timesteps` are the timestep values temporal activation quantizers hold slots for.
    """
    modules = dict(denoiser.named_modules())
    for name, spec in specs.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"layer {name!r} of the layer policy is not in the model")
        if spec.kind == "matmul":
            module.set_processor(QuantAttnProcessor(spec, timesteps))
            continue
        wrapper = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        parent_name, _, leaf = name.rpartition(".")
        parent = modules[parent_name] if parent_name else denoiser
        setattr(parent, leaf, wrapper.from_float(module, spec, timesteps))
    return denoiser


def set_quant_enabled(denoiser: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Switch weight and/or activation fake quantization on or off (off = the FP model)."""
    for layer in quant_layers(denoiser).values():
        if layer.w_quant is not None:
            layer.w_quant.enabled = weights
    for q in act_quantizers(denoiser):
        q.enabled = activations


def act_quantizers(denoiser: nn.Module) -> list[UniformQuantizer]:
    """Every activation quantizer: quantized layers' inputs and attention matmul inputs."""
    owners = [*quant_layers(denoiser).values(), *attn_processors(denoiser).values()]
    return [q for owner in owners for q in owner.act_quantizers()]


def quant_state(denoiser: nn.Module, fp_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries of the quantized denoiser's state that are new or differ from the FP state.

    That is everything a stage learned (quantizer parameters, LoRA factors, changed
    weights) and nothing the FP model already has, so artifacts stay small.
    """
    out = {}
    for key, value in denoiser.state_dict().items():
        ref = fp_state.get(key)
        if ref is None or ref.shape != value.shape or not torch.equal(ref, value):
            out[key] = value.detach().contiguous().clone()
    return out


def load_quant_state(denoiser: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `quant_state` into a denoiser already wrapped by `quantize_denoiser`.

    LoRA factors present in the state are created first (their rank comes from A's shape).
    Every key must exist in the model: a mismatch means the artifact belongs to another model.
    """
    for name, layer in quant_layers(denoiser).items():
        a = state.get(f"{name}.lora_A")
        if a is not None and layer.lora_A is None:
            layer.add_lora(a.shape[0])
    own = denoiser.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"quant state has {len(unknown)} entries the model lacks, e.g. {unknown[0]!r}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"quant state entry {key!r} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    denoiser.load_state_dict(state, strict=False)

