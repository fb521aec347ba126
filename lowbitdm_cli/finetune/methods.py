"""Finetuning methods: small declarative pieces over the one distillation loop.

A method decides what is trainable, at which learning rate, and which losses apply;
the loop (`finetune.loop`) owns data, teacher trajectories, the optimizer and checkpoints.

- `none`: pass-through (no training).
- `qalora` (EfficientDM, arXiv 2310.03270): LoRA on every quantized layer merged before
  weight quantization, temporal LSQ activation step sizes, scale-aware per-layer LoRA
  learning rates, weight quantizer parameters frozen.
- `quest` (QuEST, arXiv 2402.03666): only time-embedding projections (TLA) and attention /
  feed-forward layers (CMA) plus activation step sizes train; local layer-output MSE of
  those layers + 2 × global output MSE.
- `qat`: every weight trains through the STE, plus activation step sizes — the cost and
  quality reference.
The MPQ-DM relation loss (`loss = "trd"`) combines with any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbitdm_cli.quant.layers import QuantLayerMixin, quant_layers
from lowbitdm_cli.quant.model import act_quantizers

__all__ = ["TrainPlan", "plan_method"]

# TLA: the layers that take the time embedding (ResBlock projections; DiT's adaLN modulation);
# CMA: attention-related layers, cross-attention included (QuEST's SD setting)
QUEST_ROLES = ("time_emb_proj", "adaln", "attention", "cross_attention", "feed_forward")


@dataclass
class TrainPlan:
    """What the loop optimises: parameter groups (with lrs) and layers needing local losses."""

    groups: list[dict] = field(default_factory=list)
    local_layers: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def parameters(self) -> list[nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


def _act_params(denoiser: nn.Module, train_zero_point: bool) -> list[nn.Parameter]:
    """Step sizes (and zero points) of every activation quantizer, attention matmuls included
    (not the per-token dynamic ones: their steps come from the values at run time)."""
    out = []
    for q in act_quantizers(denoiser):
        if q.dynamic:
            continue
        out.append(q.delta)
        if train_zero_point and q.mode == "asymmetric":
            out.append(q.zero_point)
    return out


def _mean_weight_step(layer: QuantLayerMixin) -> float:
    return float(layer.w_quant.delta.detach().abs().mean()) if layer.w_quant is not None else 0.0


def plan_method(cfg, denoiser: nn.Module, seed: int) -> TrainPlan:
    """Prepare `denoiser` for `cfg.method` (add LoRA, set requires_grad) and return the plan."""
    layers = quant_layers(denoiser)
    denoiser.requires_grad_(False)
    plan = TrainPlan()
    act = _act_params(denoiser, cfg.train_act_zero_point)
    if cfg.method == "none":
        return plan
    if cfg.method == "qalora":
        gen = torch.Generator().manual_seed(seed)
        steps = {n: _mean_weight_step(lay) for n, lay in layers.items() if lay.w_quant is not None}
        mean_step = sum(steps.values()) / max(len(steps), 1)
        for name, layer in layers.items():
            if layer.w_quant is None:
                continue
            layer.add_lora(cfg.lora_rank, generator=gen)
            lr = cfg.lr
            if cfg.scale_aware == "lr":
                # EfficientDM reference code: each layer's LoRA lr ∝ its mean weight step size.
                lr = cfg.lr * steps[name] / mean_step
            plan.groups.append({"params": [layer.lora_A, layer.lora_B], "lr": lr, "name": name,
                                "grad_scale": steps[name] / mean_step if cfg.scale_aware == "grad" else 1.0})
    elif cfg.method == "quest":
        for name, layer in layers.items():
            if layer.spec.role in QUEST_ROLES:
                layer.weight.requires_grad_(True)
                params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
                plan.groups.append({"params": params, "lr": cfg.lr, "name": name})
                plan.local_layers.append(name)
    elif cfg.method == "qat":
        for name, layer in layers.items():
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            plan.groups.append({"params": params, "lr": cfg.lr, "name": name})
    else:
        raise ValueError(f"unknown finetune method {cfg.method!r}")
    if act:
        plan.groups.append({"params": act, "lr": cfg.act_lr, "name": "activation_quantizers"})
    for p in plan.parameters():
        p.requires_grad_(True)
    total = sum(p.numel() for p in denoiser.parameters())
    trained = sum(p.numel() for p in plan.parameters())
    plan.info = {"trainable_parameters": trained, "total_parameters": total,
                 "trainable_fraction": trained / max(total, 1), "local_layers": len(plan.local_layers)}
    return plan
