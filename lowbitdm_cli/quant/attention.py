"""Quantized attention matmuls: a diffusers attention processor that fake-quantizes the
inputs of both activation-activation products, QKᵀ (Q and K) and softmax·V (the softmax
output P and V), as Q-Diffusion and PTQ4DM do.

Q, K and V get asymmetric quantizers at the layer policy's activation bits; P lies in [0, 1],
so it gets an *unsigned* quantizer (zero point fixed at 0) at `attn_softmax_bits` (8 by
default: P's small entries vanish first at low bits). All four are the one `UniformQuantizer`
family, temporal when the policy is, and live as submodules of the processor, which diffusers
registers under ``<attention>.processor``, so they are saved, loaded, initialised and trained
like every other activation quantizer.

The projections around the matmuls (to_q/to_k/to_v/to_out) stay ordinary `QuantLinear`
layers with their own specs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbitdm_cli.quant.policy import LayerSpec
from lowbitdm_cli.quant.quantizer import UniformQuantizer

__all__ = ["MATMUL_INPUTS", "QuantAttnProcessor", "attn_processors"]

MATMUL_INPUTS = ("q", "k", "p", "v")  # QKᵀ takes q and k; softmax·V takes p and v


class QuantAttnProcessor(nn.Module):
    """Attention with fake-quantized matmul inputs (the attention math of diffusers' classic
    `AttnProcessor`: explicit scores, softmax, bmm, so the softmax output can be quantized)."""

    def __init__(self, spec: LayerSpec, timesteps: list[int] | None = None) -> None:
        super().__init__()
        if not spec.a_bits:
            raise ValueError("attention matmul spec needs a_bits")
        self.spec = spec
        temporal = timesteps if spec.a_temporal else None
        mode = "symmetric" if spec.a_symmetric else "asymmetric"
        self.q_quant = UniformQuantizer(spec.a_bits, mode, timesteps=temporal, lsq_grad_scale=spec.lsq_grad_scale)
        self.k_quant = UniformQuantizer(spec.a_bits, mode, timesteps=temporal, lsq_grad_scale=spec.lsq_grad_scale)
        self.v_quant = UniformQuantizer(spec.a_bits, mode, timesteps=temporal, lsq_grad_scale=spec.lsq_grad_scale)
        self.p_quant = UniformQuantizer(spec.p_bits or spec.a_bits, "unsigned", timesteps=temporal,
                                        lsq_grad_scale=spec.lsq_grad_scale)
        self.observer: Callable[[str, torch.Tensor], None] | None = None  # (input name, x), calibration

    def act_quantizers(self) -> list[UniformQuantizer]:
        return [self.q_quant, self.k_quant, self.p_quant, self.v_quant]

    def quantizer(self, which: str) -> UniformQuantizer:
        return getattr(self, f"{which}_quant")

    def _q(self, which: str, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(which, x)
        return self.quantizer(which)(x).to(x.dtype)  # float32 scales: back to the compute dtype (bf16)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs
                ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        # QKᵀ on quantized inputs; scores in float (they are the product's accumulator)
        scores = torch.bmm(self._q("q", query), self._q("k", key).transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1).to(value.dtype)
        out = torch.bmm(self._q("p", probs), self._q("v", value))  # softmax·V on quantized inputs
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs
                 ) -> torch.Tensor:
        # spelled out (not `*args`): diffusers drops keyword arguments the signature does not name
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def extra_repr(self) -> str:
        return f"matmul inputs q, k, v at {self.spec.a_bits} bit, softmax output unsigned at {self.p_quant.max_bits} bit"


def attn_processors(module: nn.Module) -> dict[str, QuantAttnProcessor]:
    """Quantized attention processors by the qualified name of their `Attention` module."""
    return {n.removesuffix(".processor"): m for n, m in module.named_modules() if isinstance(m, QuantAttnProcessor)}
