"""CompVis YAML → diffusers configs: the UNet layout, the autoencoder and the noise schedule.

Keys are checked against what this converter knows; anything else is refused in one line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbitdm_cli.models.compvis.files import _fail

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


