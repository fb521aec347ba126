"""What a conversion gives: `CompVisModel` (the diffusers modules plus what the YAML says), and
`CompVisUNet2DModel` (a UNet2DModel with per-level head counts, LSUN-Church)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

# ----------------------------------------------------------------------------- the result


ConditioningKind = Literal["class", "text", "none"]


@dataclass(eq=False)
class CompVisModel:
    """A converted CompVis LDM: diffusers denoiser and autoencoder plus everything sampling needs.

    `schedule` is a diffusers scheduler config (``num_train_timesteps``, ``beta_start``,
    ``beta_end``, ``beta_schedule``, ``prediction_type``); CompVis ``linear`` (linear in
    sqrt(beta)) is diffusers ``scaled_linear``. Latents follow the CompVis convention: the
    denoiser works on ``scale_factor * encode(x)``; `decode` undoes it. For class conditioning
    the cross-attention context is ``class_embedder(labels)[:, None]`` (see `context`); for
    ``cin256-v2`` class ``null_class`` (1000) is the unconditional label used by classifier-free
    guidance. For ``"text"`` models the text encoder is not converted (`cond_stage_target` names it).
    """

    unet: nn.Module  # UNet2DConditionModel (cross-attention), UNet2DModel or CompVisUNet2DModel (unconditional)
    autoencoder: nn.Module  # VQModel or AutoencoderKL
    class_embedder: nn.Embedding | None
    scale_factor: float
    schedule: dict
    conditioning: ConditioningKind
    num_classes: int | None
    null_class: int | None
    context_dim: int | None
    cond_stage_target: str | None
    latent_shape: tuple[int, int, int]  # (C, H, W) of the denoiser's input
    image_size: int  # pixel resolution the autoencoder was trained at
    unet_config: dict
    autoencoder_config: dict
    ignored_keys: dict[str, int] = field(default_factory=dict)  # key group → count, never mapped
    config: dict = field(default_factory=dict)  # the parsed YAML

    @property
    def vq(self) -> bool:
        """True for a VQ first stage: `decode` snaps latents to the codebook first, as CompVis does."""
        return type(self.autoencoder).__name__ == "VQModel"

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """Cross-attention context (B, 1, context_dim) of class labels (class-conditional models)."""
        if self.class_embedder is None:
            raise ValueError(f"this model's conditioning is {self.conditioning!r}, not class labels")
        return self.class_embedder(labels)[:, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (roughly) from denoiser-space latents: decode(latents / scale_factor)."""
        return self.autoencoder.decode(latents / self.scale_factor).sample

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """Denoiser-space latents of images: scale_factor * (VQ: pre-quantization h; KL: posterior sample/mean)."""
        if self.vq:
            h = self.autoencoder.encode(images).latents
        else:
            dist = self.autoencoder.encode(images).latent_dist
            h = dist.sample(generator) if sample else dist.mean
        return self.scale_factor * h


# ----------------------------------------------------------------------------- per-level heads


def _set_heads(attn: nn.Module, heads: int) -> None:
    """Give a diffusers `Attention` over C channels `heads` heads of C // heads (its linears are unchanged)."""
    channels = attn.to_q.out_features
    if channels % heads:
        raise ValueError(f"{heads} heads do not divide {channels} channels")
    attn.heads = attn.sliceable_head_dim = heads
    attn.scale = (channels // heads) ** -0.5


class CompVisUNet2DModel(UNet2DModel):
    """A diffusers `UNet2DModel` whose attention head COUNT is set per resolution level.

    `UNet2DModel` derives every attention's heads from one `attention_head_dim`. CompVis
    AttentionBlock UNets configured with `num_heads` keep the count fixed instead, so the head dim
    changes with the width (LSUN-Church: 8 heads over 192, 384 and 768 channels). Built with
    ``attention_head_dim=None`` (one head of the full width, so every linear has its CompVis
    shape), then `attention_heads[level]` heads are set on each level's attentions and
    `attention_heads[-1]` on the middle block's. The list is part of the config, so
    ``from_config``/``save_pretrained`` rebuild the same function; code that rebuilds a plain
    ``UNet2DModel(**config)`` fails loudly on the extra key instead of silently losing it.
    """

    def __init__(self, *args: Any, attention_heads: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if attention_heads is None:
            return
        n = len(self.down_blocks)
        if len(attention_heads) != n:
            raise ValueError(f"attention_heads needs one head count per level ({n}), got {attention_heads}")
        for level, block in enumerate(self.down_blocks):
            for attn in getattr(block, "attentions", []):
                _set_heads(attn, attention_heads[level])
        for k, block in enumerate(self.up_blocks):
            for attn in getattr(block, "attentions", []):
                _set_heads(attn, attention_heads[n - 1 - k])
        for attn in getattr(self.mid_block, "attentions", []):
            if attn is not None:
                _set_heads(attn, attention_heads[-1])

    # diffusers reads a model's config keys from its __init__ signature: UNet2DModel's plus ours
    __init__.__signature__ = inspect.signature(UNet2DModel.__init__).replace(  # type: ignore[attr-defined]
        parameters=[*inspect.signature(UNet2DModel.__init__).parameters.values(),
                    inspect.Parameter("attention_heads", inspect.Parameter.KEYWORD_ONLY, default=None)])
    __init__ = register_to_config(__init__)  # type: ignore[method-assign]


