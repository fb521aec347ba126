"""Model families: how each diffusers pipeline kind becomes a `DiffusionModel`, and its defaults.

A family is detected from a folder's ``model_index.json`` (``_class_name``) and names its
denoiser and autoencoder components, its conditioning and the paper setting used when a
user passes ``--model PATH`` (the registry's named entries carry their own paper settings):

=================  ===============================  ============  ===================
family             pipeline (`_class_name`)         conditioning  denoiser
=================  ===============================  ============  ===================
ddpm               DDPMPipeline, DDIMPipeline       none / class  UNet2DModel
ldm                LDMPipeline                      none          UNet2DModel + VQModel
ldm-class          LowbitdmClassLDMPipeline         class (ctx)   UNet2DConditionModel
sd                 StableDiffusionPipeline          text (CLIP)   UNet2DConditionModel
dit                DiTPipeline                      class         DiT / Transformer2DModel
=================  ===============================  ============  ===================

A folder without its autoencoder (no folder, not named in ``model_index.json``) is a pixel-space
model where the denoiser takes an image's 1 or 3 channels, e.g. a DiTPipeline of a pixel-space DiT
(`diffusers_loader`); a latent denoiser without it is refused.

``LowbitdmClassLDMPipeline`` is lowbitdm's folder layout for class-conditional LDMs such as
CompVis cin256 LDM-4, which diffusers has no pipeline for: ``unet/`` (UNet2DConditionModel),
``class_embedder/`` (``config.json`` with num_embeddings / embedding_dim / num_classes /
null_class and ``model.safetensors`` holding ``weight``), ``vqvae/`` (VQModel or
AutoencoderKL), ``scheduler/``. `class_ldm_model` builds the same model from in-memory
modules (what the CompVis ``.ckpt`` converter returns), and `save_class_ldm_folder` writes it.
An optional ``"lowbitdm"`` object in ``model_index.json`` may set ``latent_scale``,
``num_classes`` and ``null_class`` where a folder's own configs do not say them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from lowbitdm_cli.models.conditioning import ClassEmbedder, ClassLabels, Conditioner, NoCondition
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule

__all__ = [
    "CLASS_LDM_PIPELINE",
    "FAMILIES",
    "Family",
    "build_model",
    "class_ldm_model",
    "family_of_pipeline",
    "from_compvis",
    "label_conditioner",
    "latent_scale_of",
    "load_class_embedder",
    "sample_shape_of",
    "save_class_ldm_folder",
]

CLASS_LDM_PIPELINE = "LowbitdmClassLDMPipeline"


@dataclass(frozen=True)
class Family:
    name: str
    pipelines: tuple[str, ...]
    denoiser: str  # component folder of the denoiser
    autoencoder: str | None  # component folder of the autoencoder (latent models)
    conditioning: str  # "none", "class" or "text" (ddpm: "class" when the UNet has class embeddings)
    sampler: dict = field(default_factory=dict)  # paper setting for --model PATH
    evaluator: str = "inception"


FAMILIES: dict[str, Family] = {f.name: f for f in [
    # Q-Diffusion / PTQ4DM CIFAR-10 setting: DDIM 100 steps, η = 0
    Family("ddpm", ("DDPMPipeline", "DDIMPipeline"), "unet", None, "none",
           {"steps": 100, "eta": 0.0, "guidance": 1.0, "clip_x0": True}),
    # LDM-4 LSUN-Bedroom setting of Q-Diffusion / QuEST: 200 steps, η = 1
    Family("ldm", ("LDMPipeline",), "unet", "vqvae", "none",
           {"steps": 200, "eta": 1.0, "guidance": 1.0, "clip_x0": False}),
    # LDM-4 ImageNet setting of EfficientDM / QuEST / MPQ-DM: 20 steps, η = 0, CFG 3.0
    Family("ldm-class", (CLASS_LDM_PIPELINE,), "unet", "vqvae", "class",
           {"steps": 20, "eta": 0.0, "guidance": 3.0, "clip_x0": False}),
    # SD v1.4 as QuEST samples it: 50 steps, CFG 7.5 (PLMS there, DDIM η = 0 here)
    Family("sd", ("StableDiffusionPipeline",), "unet", "vae", "text",
           {"steps": 50, "eta": 0.0, "guidance": 7.5, "clip_x0": False}, evaluator="clip"),
    # DiT-XL/2 256 with CFG 1.5 (DiT paper's guided setting), 50 DDIM steps (PTQ4DiT's shortest)
    Family("dit", ("DiTPipeline",), "transformer", "vae", "class",
           {"steps": 50, "eta": 0.0, "guidance": 1.5, "clip_x0": False}),
]}


def family_of_pipeline(class_name: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if class_name in f.pipelines), None)


def sample_shape_of(denoiser_config: dict) -> tuple[int, int, int]:
    """(C, H, W) of x_t from a denoiser config (`in_channels`, `sample_size` int or pair)."""
    size = denoiser_config.get("sample_size")
    if size is None:
        raise ValueError("the denoiser config has no sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(denoiser_config["in_channels"]), int(h), int(w)


def latent_scale_of(autoencoder: nn.Module | None, override: float | None = None) -> float:
    if override is not None:
        return float(override)
    if autoencoder is None:
        return 1.0
    return float(getattr(autoencoder.config, "scaling_factor", 1.0) or 1.0)


def build_model(family: Family, denoiser: nn.Module | None, denoiser_config: dict, schedule: NoiseSchedule,
                conditioner: Conditioner, autoencoder: nn.Module | None, name: str, meta: dict,
                latent_scale: float | None = None) -> DiffusionModel:
    """A `DiffusionModel` from loaded parts (`denoiser` None: parts only, for a merged checkpoint)."""
    kind = conditioner.kind
    return DiffusionModel(denoiser=denoiser, schedule=schedule, sample_shape=sample_shape_of(denoiser_config),
                          conditioning=kind, num_classes=conditioner.num_conditions, null_class=conditioner.null,
                          name=name, meta={"family": family.name, **meta}, conditioner=conditioner,
                          autoencoder=autoencoder, latent_scale=latent_scale_of(autoencoder, latent_scale))


def label_conditioner(family: Family, denoiser_config: dict, extra: dict) -> Conditioner:
    """Labels for DiT (``num_embeds_ada_norm`` classes, null = that count, as DiT's table has one
    more row) and class-embedding UNet2DModels (``num_class_embeds`` rows, the last one null)."""
    if family.name == "dit":
        n = int(extra.get("num_classes", denoiser_config.get("num_embeds_ada_norm") or 0))
        if n <= 0:
            raise ValueError("the DiT transformer config has no num_embeds_ada_norm (class count)")
        return ClassLabels(n, int(extra.get("null_class", n)))
    rows = denoiser_config.get("num_class_embeds")
    if not rows:
        return NoCondition()
    n = int(extra.get("num_classes", rows - 1))
    return ClassLabels(n, int(extra.get("null_class", rows - 1)))


def class_ldm_model(unet: nn.Module, class_embedder: nn.Embedding, autoencoder: nn.Module,
                    scheduler_config: dict, num_classes: int, null_class: int, name: str,
                    latent_scale: float | None = None, meta: dict | None = None) -> DiffusionModel:
    """A class-conditional LDM (CompVis cin256 style) from diffusers modules: the class embedding
    row is the UNet's cross-attention context [B, 1, D]."""
    cond = ClassEmbedder(class_embedder.eval().requires_grad_(False), num_classes, null_class)
    return build_model(FAMILIES["ldm-class"], unet, dict(unet.config), NoiseSchedule.from_config(scheduler_config),
                       cond, autoencoder.eval().requires_grad_(False), name, meta or {}, latent_scale)


def from_compvis(cv, name: str, source: str, with_denoiser: bool = True) -> DiffusionModel:  # noqa: ANN001
    """A `DiffusionModel` from a converted CompVis LDM (`models.compvis.load_compvis`'s result:
    ``unet``, ``autoencoder``, ``class_embedder``, ``scale_factor``, ``schedule`` (a diffusers
    scheduler config), ``conditioning``, ``num_classes``, ``null_class``, ``latent_shape``)."""
    from lowbitdm_cli.errors import ModelFormatError

    if cv.conditioning == "text":
        raise ModelFormatError(f"{source}: a CompVis text-to-image checkpoint (its text encoder is not converted): "
                               f"use the diffusers StableDiffusionPipeline folder of the model instead")
    if cv.conditioning == "class":
        cond: Conditioner = ClassEmbedder(cv.class_embedder.eval().requires_grad_(False), int(cv.num_classes),
                                          cv.null_class)
        family = FAMILIES["ldm-class"]
    else:
        cond, family = NoCondition(), FAMILIES["ldm"]
    c, h, w = cv.latent_shape
    return build_model(family, cv.unet.eval().requires_grad_(False) if with_denoiser else None,
                       {"in_channels": c, "sample_size": [h, w]}, NoiseSchedule.from_config(cv.schedule), cond,
                       cv.autoencoder.eval().requires_grad_(False), name,
                       {"source": source, "pipeline": "CompVis"}, latent_scale=float(cv.scale_factor))


def load_class_embedder(folder: Path) -> tuple[nn.Embedding, dict]:
    cfg = json.loads((folder / "config.json").read_text())
    emb = nn.Embedding(int(cfg["num_embeddings"]), int(cfg["embedding_dim"]))
    emb.load_state_dict(load_file(str(folder / "model.safetensors")))
    return emb, cfg


def save_class_ldm_folder(path: Path, unet: nn.Module, class_embedder: nn.Embedding, autoencoder: nn.Module,
                          scheduler_config: dict, num_classes: int, null_class: int,
                          latent_scale: float | None = None) -> Path:
    """Write a class-conditional LDM as a ``LowbitdmClassLDMPipeline`` folder (safetensors + JSON)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    autoencoder.save_pretrained(path / "vqvae", safe_serialization=True)
    (path / "class_embedder").mkdir(exist_ok=True)
    save_file({"weight": class_embedder.weight.detach().contiguous()}, str(path / "class_embedder" / "model.safetensors"))
    (path / "class_embedder" / "config.json").write_text(json.dumps(
        {"num_embeddings": class_embedder.num_embeddings, "embedding_dim": class_embedder.embedding_dim,
         "num_classes": num_classes, "null_class": null_class}, indent=1))
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=1))
    index = {"_class_name": CLASS_LDM_PIPELINE, "unet": ["diffusers", type(unet).__name__],
             "vqvae": ["diffusers", type(autoencoder).__name__], "class_embedder": ["torch", "Embedding"],
             "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")]}
    if latent_scale is not None:
        index["lowbitdm"] = {"latent_scale": latent_scale}
    (path / "model_index.json").write_text(json.dumps(index, indent=1))
    return path
