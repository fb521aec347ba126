"""Load CompVis latent diffusion checkpoints (`.ckpt`/`.safetensors` + YAML) as diffusers modules.

The papers quantize the original CompVis LDMs: LDM-4 ImageNet (``cin256-v2``, class-conditional
through cross-attention on a one-token ``ClassEmbedder`` context), LDM-4 LSUN-Bedroom and LDM-8
LSUN-Church (unconditional), and Stable Diffusion v1.x (text cross-attention; only UNet and VAE are
converted here, the CLIP text encoder is reported, not loaded). `load_compvis` reads the YAML with
``yaml.safe_load`` and the checkpoint with ``torch.load(weights_only=True)`` (or safetensors), builds
the matching diffusers modules and maps every CompVis key onto them, strictly.

Key mapping (CompVis → diffusers), written here and verified against an independent
re-implementation of the CompVis layout in ``tests/models/compvis_reference.py``:

UNet (``model.diffusion_model.*``; ``nrb`` = ``num_res_blocks``)
  ``time_embed.{0,2}`` → ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` → ``conv_in``;
  ``out.{0,2}`` → ``conv_norm_out``/``conv_out``.
  ``input_blocks.i`` (i ≥ 1): level ``(i-1)//(nrb+1)``, slot ``(i-1)%(nrb+1)``; slots < nrb hold
  ``.0`` ResBlock → ``down_blocks.L.resnets.S`` and ``.1`` attention → ``down_blocks.L.attentions.S``;
  slot nrb is the downsampler: ``.0.op`` conv → ``downsamplers.0.conv`` or, with ``resblock_updown``,
  a ResBlock → ``downsamplers.0``.
  ``middle_block.{0,1,2}`` → ``mid_block.resnets.0``, ``mid_block.attentions.0``, ``mid_block.resnets.1``.
  ``output_blocks.i``: up block ``i//(nrb+1)``, slot ``i%(nrb+1)``: ``.0`` ResBlock → ``resnets.S``,
  ``.1`` attention (on attention levels) → ``attentions.S``, the last layer of the last slot of
  every level but the lowest is the upsampler (``.conv`` → ``upsamplers.0.conv``; a ResBlock with
  ``resblock_updown`` → ``upsamplers.0``).
  ResBlock: ``in_layers.0/2`` → ``norm1``/``conv1``, ``emb_layers.1`` → ``time_emb_proj``,
  ``out_layers.0/3`` → ``norm2``/``conv2``, ``skip_connection`` → ``conv_shortcut``.
  SpatialTransformer → ``Transformer2DModel``: same names (``norm``, ``proj_in``,
  ``transformer_blocks.K.{attn1,attn2,ff,norm1..3}``, ``proj_out``).
  AttentionBlock → diffusers ``Attention``: ``norm`` → ``group_norm``; the ``qkv`` conv1d (3C×C×1) is
  split into ``to_q``/``to_k``/``to_v`` linears — in the legacy head order (default) the output
  channels are ``[head0: q,k,v | head1: q,k,v | ...]``, with ``use_new_attention_order`` they are
  ``[q | k | v]``; ``proj_out`` conv1d → ``to_out.0`` linear.

Autoencoder (``first_stage_model.*``)
  ``encoder.down.I.block.J`` → ``encoder.down_blocks.I.resnets.J``; ``encoder.down.I.downsample.conv``
  → ``encoder.down_blocks.I.downsamplers.0.conv``; ``decoder.up.I.*`` (indexed by resolution level)
  → ``decoder.up_blocks.{L-1-I}.*`` (indexed by execution order), ``upsample.conv`` →
  ``upsamplers.0.conv``; ``{encoder,decoder}.mid.block_{1,2}`` → ``mid_block.resnets.{0,1}``;
  ``mid.attn_1.{norm,q,k,v,proj_out}`` (1×1 convs) → ``mid_block.attentions.0.{group_norm,to_q,
  to_k,to_v,to_out.0}`` (linears); ``norm_out`` → ``conv_norm_out``; ResnetBlock ``nin_shortcut`` →
  ``conv_shortcut``; ``quant_conv``, ``post_quant_conv`` and the VQ codebook
  ``quantize.embedding.weight`` keep their names.

Class embedder (``cond_stage_model.embedding.weight``) → an ``nn.Embedding``.

Head counts: for ``UNet2DConditionModel`` diffusers' ``attention_head_dim`` is the number of heads
(one int, or one per level for ``num_head_channels`` configs); for ``UNet2DModel`` it is the head
dim. An AttentionBlock UNet whose head dim differs between levels (``num_heads`` over levels of
different width, as in LSUN-Church) becomes a `CompVisUNet2DModel`, which records the per-level
head counts in its config.

Anything this module does not know how to map is refused with a one-line error; it never builds
a model that would silently compute something else.
"""

from __future__ import annotations

import inspect
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from lowbitdm_cli.errors import ModelNotFoundError
from lowbitdm_cli.models.pickled import pickle_refusal

__all__ = ["CompVisModel", "CompVisUNet2DModel", "compvis_files", "load_compvis", "read_checkpoint", "read_config"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."

#: LatentDiffusion buffers stored next to the sub-models; read for cross-checks, never mapped.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "scale_factor",
})

# unet_config.params keys: how each is handled. Values: None = read/ignored (no effect on the function),
# a tuple = the only accepted values.
_UNET_KEYS: dict[str, tuple[Any, ...] | None] = {
    "image_size": None, "in_channels": None, "out_channels": None, "model_channels": None,
    "attention_resolutions": None, "num_res_blocks": None, "channel_mult": None, "num_heads": None,
    "num_head_channels": None, "use_spatial_transformer": None, "transformer_depth": None, "context_dim": None,
    "use_scale_shift_norm": None, "resblock_updown": None, "use_new_attention_order": None, "legacy": None,
    "dropout": None, "use_checkpoint": None, "use_fp16": None,
    "conv_resample": (True,), "dims": (2,), "num_classes": (None,), "n_embed": (None,),
    "use_linear_in_transformer": (False,), "num_heads_upsample": None,
}
_DDCONFIG_KEYS: dict[str, tuple[Any, ...] | None] = {
    "double_z": None, "z_channels": None, "resolution": None, "in_channels": None, "out_ch": None, "ch": None,
    "ch_mult": None, "num_res_blocks": None, "attn_resolutions": None, "dropout": None,
    "resamp_with_conv": (True,), "give_pre_end": (False,), "tanh_out": (False,), "use_linear_attn": (False,),
    "attn_type": ("vanilla",),
}
_KNOWN_TEXT_ENCODERS = ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "BERTEmbedder", "FrozenT5Embedder")


def _fail(msg: str) -> ModelNotFoundError:
    return ModelNotFoundError(msg)


# ----------------------------------------------------------------------------- files


def compvis_files(path: str | Path, config_path: str | Path | None = None) -> tuple[Path, Path]:
    """Resolve (checkpoint, config) for a CompVis model.

    `path` is either a folder holding ``model.ckpt`` (or ``model.safetensors``) and ``config.yaml``
    — the layout of the CompVis model zips — or the checkpoint file itself; then `config_path`
    names the YAML, or a ``config.yaml``/``<stem>.yaml`` next to the checkpoint is used.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        ckpts = [p / n for n in ("model.ckpt", "model.safetensors") if (p / n).is_file()]
        if not ckpts:
            raise _fail(f"{p}: no model.ckpt or model.safetensors in this folder")
        ckpt = ckpts[0]
        cfg = Path(config_path).expanduser() if config_path else p / "config.yaml"
    elif p.is_file():
        ckpt = p
        if config_path:
            cfg = Path(config_path).expanduser()
        else:
            cands = [p.with_name("config.yaml"), p.with_suffix(".yaml")]
            cfg = next((c for c in cands if c.is_file()), cands[0])
    else:
        raise _fail(f"{p}: no such CompVis checkpoint or folder")
    if not cfg.is_file():
        raise _fail(f"{cfg}: config YAML not found (pass the model's original YAML config)")
    return ckpt, cfg


def read_config(path: str | Path) -> dict:
    """The YAML config as a dict (``yaml.safe_load``: plain data only), with ``model.params`` checked."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _fail(f"{path}: unreadable YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) \
            or not isinstance(data["model"].get("params"), dict):
        raise _fail(f"{path}: not a CompVis config (expected a top-level `model: {{target, params}}` mapping)")
    return data


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a CompVis checkpoint, read without executing any pickled code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``, which only rebuilds tensors and plain
    containers. A checkpoint that needs other objects unpickled (e.g. a pickled training callback)
    is refused. A top-level ``state_dict`` entry (Lightning checkpoints) is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (OSError, SafetensorError) as e:
            raise _fail(f"{path}: unreadable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _fail(pickle_refusal(path, e)) from None
        except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise _fail(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise _fail(f"{path}: no state dict in this checkpoint")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise _fail(f"{path}: the state dict holds non-tensor entries ({', '.join(map(str, bad[:5]))})")
    return obj


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


# ----------------------------------------------------------------------------- config parsing


def _get(d: dict, key: str, default: Any, kind: Callable[[Any], Any], where: str) -> Any:
    v = d.get(key, default)
    try:
        return None if v is None else kind(v)
    except (TypeError, ValueError):
        raise _fail(f"{where}.{key}: expected {kind.__name__}, got {v!r}") from None


def _check_keys(params: dict, allowed: dict[str, tuple[Any, ...] | None], where: str) -> None:
    for k, v in params.items():
        if k not in allowed:
            raise _fail(f"{where}.{k}: not supported by this converter (refusing rather than ignoring it)")
        ok = allowed[k]
        if ok is not None and v not in ok:
            raise _fail(f"{where}.{k}={v!r}: not supported (supported: {', '.join(map(repr, ok))})")


@dataclass(frozen=True)
class _UNetLayout:
    """What the CompVis UNet looks like, derived from its YAML params."""

    mc: int
    mult: list[int]
    nrb: int
    attn_levels: list[bool]  # per level, attention after each ResBlock
    heads: list[int]  # per level (and heads[-1] for the middle block)
    spatial: bool  # SpatialTransformer (cross-attention) vs AttentionBlock
    depth: int
    context_dim: int | None
    scale_shift: bool
    updown: bool
    new_order: bool
    params: dict

    @property
    def channels(self) -> list[int]:
        return [self.mc * m for m in self.mult]

    @property
    def head_dims(self) -> list[int]:
        """Distinct head dims of the attentions that exist (attention levels and the middle block)."""
        used = {ch // h for ch, h, a in zip(self.channels, self.heads, self.attn_levels, strict=True) if a}
        return sorted(used | {self.channels[-1] // self.heads[-1]})


def _unet_layout(p: dict) -> _UNetLayout:
    where = "model.params.unet_config.params"
    _check_keys(p, _UNET_KEYS, where)
    mc = _get(p, "model_channels", None, int, where)
    mult = list(p.get("channel_mult") or [])
    nrb = _get(p, "num_res_blocks", None, int, where)
    if not mc or not mult or not nrb:
        raise _fail(f"{where}: model_channels, channel_mult and num_res_blocks are required")
    attn_res = [int(a) for a in (p.get("attention_resolutions") or [])]
    attn_levels = [2**i in attn_res for i in range(len(mult))]
    num_heads = _get(p, "num_heads", -1, int, where)
    nhc = _get(p, "num_head_channels", -1, int, where)
    nhu = _get(p, "num_heads_upsample", -1, int, where)
    if nhu not in (-1, num_heads):
        raise _fail(f"{where}.num_heads_upsample={nhu}: a head count different from num_heads is not supported")
    spatial = bool(p.get("use_spatial_transformer", False))
    heads = []
    for ch in [mc * m for m in mult]:
        if nhc == -1:
            if num_heads is None or num_heads < 1 or ch % num_heads:
                raise _fail(f"{where}: num_heads={num_heads} does not divide {ch} channels (set num_head_channels?)")
            heads.append(num_heads)
        else:
            if nhc < 1 or ch % nhc:
                raise _fail(f"{where}: num_head_channels={nhc} does not divide {ch} channels")
            heads.append(ch // nhc)
    if isinstance(p.get("context_dim"), list):
        raise _fail(f"{where}.context_dim: per-level lists are not supported")
    ctx = _get(p, "context_dim", None, int, where)
    if spatial and ctx is None:
        raise _fail(f"{where}: use_spatial_transformer without context_dim is not supported")
    depth = p.get("transformer_depth", 1)
    if not isinstance(depth, int) or depth < 1:
        raise _fail(f"{where}.transformer_depth={depth!r}: only one integer depth for all levels is supported")
    layout = _UNetLayout(mc=mc, mult=mult, nrb=nrb, attn_levels=attn_levels, heads=heads, spatial=spatial,
                         depth=depth, context_dim=ctx if spatial else None,
                         scale_shift=bool(p.get("use_scale_shift_norm", False)),
                         updown=bool(p.get("resblock_updown", False)),
                         new_order=bool(p.get("use_new_attention_order", False)), params=p)
    if spatial and (layout.scale_shift or layout.updown):
        raise _fail(f"{where}: use_scale_shift_norm / resblock_updown with a spatial transformer UNet are not supported")
    return layout


def _diffusers_unet_config(lay: _UNetLayout) -> tuple[str, dict]:
    p = lay.params
    n = len(lay.mult)
    common = {
        "sample_size": int(p.get("image_size", 64)), "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]), "block_out_channels": lay.channels,
        "layers_per_block": lay.nrb, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "center_input_sample": False,
    }
    if lay.spatial:
        return "UNet2DConditionModel", {
            **common,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay.attn_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(lay.attn_levels)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": lay.context_dim,
            # diffusers' historical naming: for this class `attention_head_dim` is the number of heads
            "attention_head_dim": lay.heads[0] if len(set(lay.heads)) == 1 else list(lay.heads),
            "transformer_layers_per_block": lay.depth, "use_linear_projection": False,
            "resnet_time_scale_shift": "default",
        }
    down = ["AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if lay.updown and i < n - 1 else "DownBlock2D")
            for i, a in enumerate(lay.attn_levels)]
    up = ["AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if lay.updown and i > 0 else "UpBlock2D")
          for i, a in reversed(list(enumerate(lay.attn_levels)))]
    cfg = {
        **common, "down_block_types": down, "up_block_types": up,
        "attention_head_dim": lay.head_dims[0],  # the head *dim* for this class
        "attn_norm_num_groups": 32, "add_attention": True,
        "resnet_time_scale_shift": "scale_shift" if lay.scale_shift else "default",
        "downsample_type": "resnet" if lay.updown else "conv", "upsample_type": "resnet" if lay.updown else "conv",
    }
    if len(lay.head_dims) == 1:
        return "UNet2DModel", cfg
    # a fixed head count over levels of different width: per-level heads (see CompVisUNet2DModel)
    return "CompVisUNet2DModel", {**cfg, "attention_head_dim": None, "attention_heads": list(lay.heads)}


def _vae_config(fs: dict) -> tuple[str, dict]:
    """(diffusers class name, config) of the first stage."""
    target = str(fs.get("target", ""))
    fp = fs.get("params") or {}
    dd = fp.get("ddconfig")
    where = "model.params.first_stage_config.params.ddconfig"
    if not isinstance(dd, dict):
        raise _fail(f"{where}: missing")
    _check_keys(dd, _DDCONFIG_KEYS, where)
    if dd.get("attn_resolutions"):
        raise _fail(f"{where}.attn_resolutions={dd['attn_resolutions']}: attention inside the autoencoder's "
                    "levels is not supported (only the middle-block attention of the VQ-f4 / KL-f8 models)")
    ch = int(dd["ch"])
    chans = [ch * int(m) for m in dd["ch_mult"]]
    z = int(dd["z_channels"])
    embed = int(fp["embed_dim"])
    cfg = {
        "in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * len(chans), "up_block_types": ["UpDecoderBlock2D"] * len(chans),
        "block_out_channels": chans, "layers_per_block": int(dd["num_res_blocks"]), "act_fn": "silu",
        "latent_channels": z, "norm_num_groups": 32, "sample_size": int(dd["resolution"]),
    }
    if target.endswith(".VQModelInterface"):
        if dd.get("double_z", True):
            raise _fail(f"{where}.double_z: a VQ first stage must have double_z: false")
        if fp.get("remap") is not None:
            raise _fail("model.params.first_stage_config.params.remap: codebook remapping is not supported")
        return "VQModel", {**cfg, "num_vq_embeddings": int(fp["n_embed"]), "vq_embed_dim": embed,
                           "scaling_factor": 1.0, "norm_type": "group"}
    if target.endswith(".AutoencoderKL"):
        if not dd.get("double_z", True):
            raise _fail(f"{where}.double_z: a KL first stage must have double_z: true")
        if embed != z:
            raise _fail(f"first_stage_config: embed_dim {embed} != z_channels {z}; diffusers AutoencoderKL "
                        "needs them equal")
        return "AutoencoderKL", {**cfg, "scaling_factor": 1.0}
    raise _fail(f"model.params.first_stage_config.target={target!r}: only ldm.models.autoencoder.VQModelInterface "
                "and AutoencoderKL are supported")


def _schedule(mp: dict) -> dict:
    where = "model.params"
    if mp.get("given_betas") is not None:
        raise _fail(f"{where}.given_betas: explicit betas are not supported")
    param = mp.get("parameterization", "eps")
    if param != "eps":
        raise _fail(f"{where}.parameterization={param!r}: only eps-prediction models are supported")
    kind = mp.get("beta_schedule", "linear")
    mapping = {"linear": "scaled_linear", "sqrt_linear": "linear"}
    if kind not in mapping:
        raise _fail(f"{where}.beta_schedule={kind!r}: supported are linear (diffusers scaled_linear) and sqrt_linear")
    return {"num_train_timesteps": _get(mp, "timesteps", 1000, int, where),
            "beta_start": _get(mp, "linear_start", 1e-4, float, where),
            "beta_end": _get(mp, "linear_end", 2e-2, float, where),
            "beta_schedule": mapping[kind], "prediction_type": "epsilon", "clip_sample": False}


def _alphas_cumprod(s: dict) -> torch.Tensor:
    n, a, b = s["num_train_timesteps"], s["beta_start"], s["beta_end"]
    if s["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(a**0.5, b**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(a, b, n, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


# ----------------------------------------------------------------------------- key mapping


_RES_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


class _Mapper:
    """Collects target tensors and remembers which source keys found no place."""

    def __init__(self, src: dict[str, torch.Tensor], what: str) -> None:
        self.src, self.what = src, what
        self.out: dict[str, torch.Tensor] = {}
        self.unmapped: list[str] = []

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.out:
            raise _fail(f"{self.what}: two checkpoint keys map to {key}")
        self.out[key] = value


def _resnet(m: _Mapper, rest: str, value: torch.Tensor, dst: str, src_key: str) -> None:
    for old, new in _RES_NAMES.items():
        if rest.startswith(old + "."):
            m.put(f"{dst}.{new}{rest[len(old):]}", value)
            return
    m.unmapped.append(src_key)


def _attention_block(m: _Mapper, prefix: str, dst: str, heads: int, new_order: bool) -> None:
    """CompVis AttentionBlock (norm, qkv conv1d, proj_out conv1d) → diffusers Attention."""
    for leaf in ("weight", "bias"):
        for old, new in (("norm", "group_norm"), ("proj_out", "to_out.0")):
            k = f"{prefix}.{old}.{leaf}"
            if k in m.src:
                t = m.src[k]
                m.put(f"{dst}.{new}.{leaf}", t[..., 0] if t.ndim == 3 else t)
        k = f"{prefix}.qkv.{leaf}"
        if k not in m.src:
            continue
        t = m.src[k]
        t = t[..., 0] if t.ndim == 3 else t  # conv1d (3C, C, 1) → (3C, C); bias (3C,)
        c3 = t.shape[0]
        if c3 % (3 * heads):
            raise _fail(f"{m.what}: {k} has {c3} output channels, not 3 x {heads} heads x head dim")
        if new_order:  # [q | k | v]
            q, kk, v = t.chunk(3, dim=0)
        else:  # legacy: [h0:(q,k,v) | h1:(q,k,v) | ...]
            per = t.reshape(heads, 3, c3 // (3 * heads), *t.shape[1:])
            q, kk, v = (per[:, i].reshape(c3 // 3, *t.shape[1:]) for i in range(3))
        for name, part in (("to_q", q), ("to_k", kk), ("to_v", v)):
            m.put(f"{dst}.{name}.{leaf}", part.contiguous())


def _map_unet(src: dict[str, torch.Tensor], lay: _UNetLayout) -> _Mapper:
    m = _Mapper(src, "UNet")
    n, per = len(lay.mult), lay.nrb + 1
    attn_done: set[str] = set()
    simple = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}

    def attention(src_prefix: str, dst: str, heads: int, key: str) -> None:
        if lay.spatial:  # SpatialTransformer ↔ Transformer2DModel share their names
            m.put(dst + key[len(src_prefix):], src[key])
        elif src_prefix not in attn_done:
            attn_done.add(src_prefix)
            _attention_block(m, src_prefix, dst, heads, lay.new_order)
            used = {f"{src_prefix}.{a}.{b}" for a in ("norm", "qkv", "proj_out") for b in ("weight", "bias")}
            m.unmapped.extend(k for k in src if k.startswith(src_prefix + ".") and k not in used)

    for key, value in src.items():
        head = key.rsplit(".", 1)[0]
        leaf = key.rsplit(".", 1)[1]
        if head in simple:
            m.put(f"{simple[head]}.{leaf}", value)
            continue
        mt = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.+)$", key)
        if not mt:
            m.unmapped.append(key)
            continue
        part, i, j, rest = mt.group(1), int(mt.group(2)), mt.group(3), mt.group(4)
        if part == "middle_block":
            j, rest = i, (mt.group(3) + "." if mt.group(3) else "") + rest
            if j in (0, 2):
                _resnet(m, rest, value, f"mid_block.resnets.{j // 2}", key)
            elif j == 1:
                attention("middle_block.1", "mid_block.attentions.0", lay.heads[-1], key)
            else:
                m.unmapped.append(key)
            continue
        if j is None:
            m.unmapped.append(key)
            continue
        j = int(j)
        if part == "input_blocks":
            if i == 0:
                m.unmapped.append(key)
                continue
            level, slot = divmod(i - 1, per)
            if level >= n:
                m.unmapped.append(key)
            elif slot < lay.nrb:
                if j == 0:
                    _resnet(m, rest, value, f"down_blocks.{level}.resnets.{slot}", key)
                elif j == 1 and lay.attn_levels[level]:
                    attention(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{slot}", lay.heads[level], key)
                else:
                    m.unmapped.append(key)
            elif j == 0 and level < n - 1:
                if lay.updown:
                    _resnet(m, rest, value, f"down_blocks.{level}.downsamplers.0", key)
                elif rest in ("op.weight", "op.bias"):
                    m.put(f"down_blocks.{level}.downsamplers.0.conv.{leaf}", value)
                else:
                    m.unmapped.append(key)
            else:
                m.unmapped.append(key)
        else:  # output_blocks
            block, slot = divmod(i, per)
            level = n - 1 - block
            has_attn = level >= 0 and lay.attn_levels[level]
            up_j = (2 if has_attn else 1) if (level > 0 and slot == lay.nrb) else None
            if level < 0:
                m.unmapped.append(key)
            elif j == 0:
                _resnet(m, rest, value, f"up_blocks.{block}.resnets.{slot}", key)
            elif j == 1 and has_attn:
                attention(f"output_blocks.{i}.1", f"up_blocks.{block}.attentions.{slot}", lay.heads[level], key)
            elif j == up_j:
                if lay.updown:
                    _resnet(m, rest, value, f"up_blocks.{block}.upsamplers.0", key)
                elif rest in ("conv.weight", "conv.bias"):
                    m.put(f"up_blocks.{block}.upsamplers.0.conv.{leaf}", value)
                else:
                    m.unmapped.append(key)
            else:
                m.unmapped.append(key)
    return m


_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _map_vae(src: dict[str, torch.Tensor], n_levels: int) -> _Mapper:
    m = _Mapper(src, "autoencoder")

    def resnet(rest: str, value: torch.Tensor, dst: str, key: str) -> None:
        mt = re.match(r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)$", rest)
        if not mt:
            m.unmapped.append(key)
            return
        name = "conv_shortcut" if mt.group(1) == "nin_shortcut" else mt.group(1)
        m.put(f"{dst}.{name}.{mt.group(2)}", value)

    for key, value in src.items():
        if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
                   "quantize.embedding.weight"):
            m.put(key, value)
            continue
        mt = re.match(r"(encoder|decoder)\.(.+)$", key)
        if not mt:
            m.unmapped.append(key)
            continue
        side, rest = mt.group(1), mt.group(2)
        if re.match(r"(conv_in|conv_out)\.(weight|bias)$", rest):
            m.put(key, value)
        elif re.match(r"norm_out\.(weight|bias)$", rest):
            m.put(f"{side}.conv_norm_out.{rest.split('.')[-1]}", value)
        elif mt2 := re.match(r"mid\.block_([12])\.(.+)$", rest):
            resnet(mt2.group(2), value, f"{side}.mid_block.resnets.{int(mt2.group(1)) - 1}", key)
        elif mt2 := re.match(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", rest):
            v = value[:, :, 0, 0] if value.ndim == 4 else value  # 1x1 conv → linear
            m.put(f"{side}.mid_block.attentions.0.{_VAE_ATTN[mt2.group(1)]}.{mt2.group(2)}", v)
        elif side == "encoder" and (mt2 := re.match(r"down\.(\d+)\.block\.(\d+)\.(.+)$", rest)):
            resnet(mt2.group(3), value, f"encoder.down_blocks.{mt2.group(1)}.resnets.{mt2.group(2)}", key)
        elif side == "encoder" and (mt2 := re.match(r"down\.(\d+)\.downsample\.conv\.(weight|bias)$", rest)):
            m.put(f"encoder.down_blocks.{mt2.group(1)}.downsamplers.0.conv.{mt2.group(2)}", value)
        elif side == "decoder" and (mt2 := re.match(r"up\.(\d+)\.block\.(\d+)\.(.+)$", rest)):
            blk = n_levels - 1 - int(mt2.group(1))
            resnet(mt2.group(3), value, f"decoder.up_blocks.{blk}.resnets.{mt2.group(2)}", key)
        elif side == "decoder" and (mt2 := re.match(r"up\.(\d+)\.upsample\.conv\.(weight|bias)$", rest)):
            blk = n_levels - 1 - int(mt2.group(1))
            m.put(f"decoder.up_blocks.{blk}.upsamplers.0.conv.{mt2.group(2)}", value)
        else:
            m.unmapped.append(key)
    return m


def _load_strict(module: nn.Module, m: _Mapper, prefix: str, where: str) -> None:
    """Load `m.out` into `module` with strict=True, after a check that names what does not fit."""
    if m.unmapped:
        keys = ", ".join(prefix + k for k in sorted(m.unmapped)[:5])
        more = f" (+{len(m.unmapped) - 5} more)" if len(m.unmapped) > 5 else ""
        raise _fail(f"{where}: checkpoint keys this converter cannot place: {keys}{more} — the config does not "
                    "describe this checkpoint, or the layout is unsupported")
    expected = module.state_dict()
    missing = [k for k in expected if k not in m.out]
    extra = [k for k in m.out if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing for diffusers {', '.join(missing[:5])}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
        if extra:
            parts.append(f"no diffusers slot for {', '.join(extra[:5])}" + (f" (+{len(extra) - 5})" if len(extra) > 5 else ""))
        raise _fail(f"{where}: checkpoint does not match its config: {'; '.join(parts)}")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in m.out.items() if v.shape != expected[k].shape]
    if bad:
        k, got, want = bad[0]
        raise _fail(f"{where}: {k}: checkpoint shape {got} != {want} from the config"
                    + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""))
    module.load_state_dict(m.out, strict=True)


# ----------------------------------------------------------------------------- entry point


def _group_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    groups: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "cond": {}, "ema": {}}
    other: list[str] = []
    for k, v in sd.items():
        for g, pre in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("cond", COND_PREFIX), ("ema", EMA_PREFIX)):
            if k.startswith(pre):
                groups[g][k[len(pre):]] = v
                break
        else:
            other.append(k)
    unknown = [k for k in other if k not in SCHEDULE_BUFFERS]
    if unknown:
        raise _fail(f"checkpoint keys outside model.diffusion_model / first_stage_model / cond_stage_model / "
                    f"model_ema that are not LatentDiffusion buffers: {', '.join(sorted(unknown)[:5])}")
    return groups, {"schedule_buffers": len(other)}


def _ema_unet(ema: dict[str, torch.Tensor], unet_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The EMA copy of the UNet: LitEma stores `model.<name>` as `model_ema.<name without dots>`."""
    out, missing = {}, []
    for k in unet_keys:
        flat = ("diffusion_model." + k).replace(".", "")
        if flat in ema:
            out[k] = ema[flat]
        else:
            missing.append(k)
    if missing:
        raise _fail(f"ema=True but the checkpoint's model_ema lacks {len(missing)} UNet tensors "
                    f"(first: model_ema.{('diffusion_model.' + missing[0]).replace('.', '')})")
    return out


def _plan(mp: dict) -> tuple[dict, _UNetLayout, str, dict, str, dict, ConditioningKind, str | None, Any]:
    """Everything the YAML's ``model.params`` decides: schedule, UNet layout and diffusers configs, conditioning."""
    schedule = _schedule(mp)
    for key, ok in (("cond_stage_forward", None), ("use_positional_encodings", False)):
        if mp.get(key, ok) != ok:
            raise _fail(f"model.params.{key}={mp[key]!r}: not supported")
    uc = mp.get("unet_config") or {}
    lay = _unet_layout(uc.get("params") or {})
    unet_cls, unet_cfg = _diffusers_unet_config(lay)
    vae_cls, vae_cfg = _vae_config(mp.get("first_stage_config") or {})

    # conditioning (LatentDiffusion: unconditional wins; else conditioning_key, default from concat_mode)
    cs = mp.get("cond_stage_config")
    if cs == "__is_unconditional__":
        conditioning: ConditioningKind = "none"
        cond_target = None
    else:
        key = mp.get("conditioning_key") or ("concat" if mp.get("concat_mode", True) else "crossattn")
        if key != "crossattn":
            raise _fail(f"model.params.conditioning_key={key!r}: only crossattn and unconditional models are supported")
        if not isinstance(cs, dict) or "target" not in cs:
            raise _fail(f"model.params.cond_stage_config={cs!r}: not supported")
        cond_target = str(cs["target"])
        cls_name = cond_target.rsplit(".", 1)[-1]
        if cls_name == "ClassEmbedder":
            conditioning = "class"
        elif cls_name in _KNOWN_TEXT_ENCODERS:
            conditioning = "text"
        else:
            raise _fail(f"cond_stage_config.target={cond_target!r}: only ClassEmbedder and text encoders "
                        f"({', '.join(_KNOWN_TEXT_ENCODERS)}) are supported")
    if (conditioning == "none") == lay.spatial:
        raise _fail("model.params: a cross-attention UNet needs a conditioning stage and an unconditional model "
                    "an AttentionBlock UNet (use_spatial_transformer does not match cond_stage_config)")
    return schedule, lay, unet_cls, unet_cfg, vae_cls, vae_cfg, conditioning, cond_target, cs


def load_compvis(ckpt_path: str | Path, config_path: str | Path, *, null_class: int | None = None,
                 ema: bool = False) -> CompVisModel:
    """Convert a CompVis LDM checkpoint + YAML config to diffusers modules (eval mode, float32).

    `null_class` overrides the unconditional label of a class-conditional model; by default it is
    ``n_classes - 1`` when ``n_classes`` is 1001 (cin256-v2: ImageNet's 1000 classes plus the
    null class 1000), else None (no classifier-free guidance). `ema=True` takes the UNet from the
    checkpoint's ``model_ema`` copy instead of ``model.diffusion_model``.

    Raises `ModelNotFoundError` with a one-line reason for unreadable or pickle-requiring
    checkpoints, unsupported configs, and any key that does not map 1:1 onto the diffusers modules.
    """
    import diffusers

    cfg = read_config(config_path)
    mp = cfg["model"]["params"]
    target = str(cfg["model"].get("target", ""))
    if not target.endswith(".LatentDiffusion"):
        raise _fail(f"model.target={target!r}: only ldm.models.diffusion.ddpm.LatentDiffusion is supported")
    try:
        schedule, lay, unet_cls, unet_cfg, vae_cls, vae_cfg, conditioning, cond_target, cs = _plan(mp)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _fail(f"{config_path}: malformed CompVis config ({type(e).__name__}: {e})") from None

    sd = read_checkpoint(ckpt_path)
    groups, ignored = _group_keys(sd)
    where = str(ckpt_path)

    if not groups["unet"]:
        raise _fail(f"{where}: no model.diffusion_model.* keys: not a LatentDiffusion checkpoint")
    unet_src = _ema_unet(groups["ema"], groups["unet"]) if ema else groups["unet"]
    if groups["ema"]:  # with ema=True what is left are LitEma's decay/num_updates buffers
        ignored["model_ema"] = len(groups["ema"]) - (len(unet_src) if ema else 0)

    unet = (CompVisUNet2DModel if unet_cls == "CompVisUNet2DModel" else getattr(diffusers, unet_cls))(**unet_cfg)
    _load_strict(unet, _map_unet(unet_src, lay), UNET_PREFIX, f"{where}: UNet")

    # scale factor (scale_by_std models store the measured one as a buffer) and schedule cross-check
    if mp.get("scale_by_std", False):
        if "scale_factor" not in sd:
            raise _fail(f"{where}: scale_by_std: true but the checkpoint has no scale_factor buffer")
        scale = float(sd["scale_factor"])
    else:
        scale = _get(mp, "scale_factor", 1.0, float, "model.params")
    if not math.isfinite(scale) or scale <= 0:
        raise _fail(f"{where}: scale_factor {scale} is not a positive number")
    if "alphas_cumprod" in sd:
        want = _alphas_cumprod(schedule)
        got = sd["alphas_cumprod"].double()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
            raise _fail(f"{where}: the checkpoint's alphas_cumprod does not match the config's schedule "
                        f"({mp.get('beta_schedule', 'linear')}, {schedule['beta_start']}..{schedule['beta_end']}, "
                        f"{schedule['num_train_timesteps']} steps)")
    vae_cfg["scaling_factor"] = scale

    vae_src = {k: v for k, v in groups["vae"].items() if not k.startswith("loss.")}
    if len(vae_src) != len(groups["vae"]):
        ignored["first_stage_model.loss"] = len(groups["vae"]) - len(vae_src)
    autoencoder = getattr(diffusers, vae_cls)(**vae_cfg)
    _load_strict(autoencoder, _map_vae(vae_src, len(vae_cfg["block_out_channels"])), VAE_PREFIX,
                 f"{where}: autoencoder")

    class_embedder = None
    num_classes = None
    ctx_dim = lay.context_dim
    if conditioning == "class":
        cp = cs.get("params") or {}
        n_cls = _get(cp, "n_classes", 1000, int, "cond_stage_config.params")
        dim = _get(cp, "embed_dim", None, int, "cond_stage_config.params")
        if dim != ctx_dim:
            raise _fail(f"cond_stage_config.params.embed_dim={dim} != unet context_dim={ctx_dim}")
        class_embedder = nn.Embedding(n_cls, dim)
        m = _Mapper(groups["cond"], "class embedder")
        for k, v in groups["cond"].items():
            (m.put("weight", v) if k == "embedding.weight" else m.unmapped.append(k))
        _load_strict(class_embedder, m, COND_PREFIX, f"{where}: class embedder")
        if null_class is None and n_cls == 1001:
            null_class = 1000
        if null_class is not None and not 0 <= null_class < n_cls:
            raise _fail(f"null_class={null_class} is not a label of this {n_cls}-class embedder")
        num_classes = n_cls - 1 if null_class == n_cls - 1 else n_cls
    elif conditioning == "text":
        if groups["cond"]:
            ignored["cond_stage_model"] = len(groups["cond"])
        null_class = None
    else:
        if groups["cond"]:
            raise _fail(f"{where}: an unconditional config, but the checkpoint has cond_stage_model keys "
                        f"({next(iter(groups['cond']))}, ...)")
        null_class = None

    latent_c = _get(mp, "channels", unet_cfg["in_channels"], int, "model.params")
    latent_hw = _get(mp, "image_size", unet_cfg["sample_size"], int, "model.params")
    if latent_c != unet_cfg["in_channels"] or latent_c != vae_cfg["latent_channels"]:
        raise _fail(f"model.params.channels={latent_c}: the UNet takes {unet_cfg['in_channels']} and the "
                    f"autoencoder gives {vae_cfg['latent_channels']} channels")
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return CompVisModel(
        unet=unet.eval(), autoencoder=autoencoder.eval(),
        class_embedder=class_embedder.eval() if class_embedder is not None else None,
        scale_factor=scale, schedule=schedule, conditioning=conditioning, num_classes=num_classes,
        null_class=null_class, context_dim=ctx_dim, cond_stage_target=cond_target,
        latent_shape=(latent_c, latent_hw, latent_hw), image_size=latent_hw * factor,
        unet_config={"_class_name": unet_cls, **unet_cfg}, autoencoder_config={"_class_name": vae_cls, **vae_cfg},
        ignored_keys=ignored, config=cfg,
    )
