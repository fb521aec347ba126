"""`load_compvis`: a CompVis checkpoint + YAML → diffusers modules (the entry point)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbitdm_cli.models.compvis.files import _fail, read_checkpoint, read_config
from lowbitdm_cli.models.compvis.keymap import (
    COND_PREFIX,
    EMA_PREFIX,
    SCHEDULE_BUFFERS,
    UNET_PREFIX,
    VAE_PREFIX,
    _load_strict,
    _map_unet,
    _map_vae,
    _Mapper,
)
from lowbitdm_cli.models.compvis.modules import CompVisModel, CompVisUNet2DModel, ConditioningKind
from lowbitdm_cli.models.compvis.translate import (
    _KNOWN_TEXT_ENCODERS,
    _alphas_cumprod,
    _diffusers_unet_config,
    _get,
    _schedule,
    _unet_layout,
    _UNetLayout,
    _vae_config,
)

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
