"""Model registry: names → loaders with each family's sampler defaults.

``digits`` ships inside the package and loads with no network. ``tiny-random`` is a
seeded, randomly initialised digits-shaped UNet for smoke tests of the chain. The paper
models load from a local diffusers folder: ``$LOWBITDM_MODELS_DIR/<name>`` (default
``~/.cache/lowbitdm/models/<name>``), else, for those published on the Hugging Face hub, a
hub snapshot (the cache, or a download when online). Offline, one message says what to fetch
and where to put it. ``--model PATH`` takes any supported diffusers folder instead
(`models.diffusers_loader`); its defaults come from its family (`models.families`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbitdm_cli.artifacts import ModelRef
from lowbitdm_cli.errors import ModelFormatError, ModelNotFoundError
from lowbitdm_cli.models import digits
from lowbitdm_cli.models.sources import hub_folder, is_compvis, is_hub_id, load_path, models_dir, path_family
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule

__all__ = ["MODELS", "ModelEntry", "evaluator_of", "load_model", "model_entry", "model_ref", "parts_digest",
           "sampler_defaults"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    sampler: dict = field(default_factory=dict)  # steps, eta, guidance, clip_x0 (and sampler; default ddim)
    evaluator: str = "digits-features"
    loader: Callable[[], DiffusionModel] | None = None  # embedded models
    needs: str = ""  # what the user must provide when it is not on this machine
    hub_id: str | None = None  # a diffusers repository on the Hugging Face hub
    family: str | None = None  # models.families key of the paper models
    conditioning: str = "class"  # what a local copy must be: "none", "class" or "text"
    resolution: int | None = None  # the paper's image size (pixels; informational)

    @property
    def local_dir(self) -> Path:
        return models_dir() / self.name

    @property
    def available(self) -> bool:
        """Loadable without a download: embedded, a local folder, or in the hub cache."""
        if self.loader is not None or _local(self):
            return True
        if self.hub_id is None:
            return False
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.hub_id, "model_index.json"), str)


def _digits_model(denoiser: nn.Module, meta: dict, name: str) -> DiffusionModel:
    return DiffusionModel(denoiser=denoiser, schedule=NoiseSchedule.from_config(meta["schedule"]),
                          sample_shape=(1, digits.IMAGE_SIZE, digits.IMAGE_SIZE), conditioning="class",
                          num_classes=meta["num_classes"], null_class=meta["num_classes"], name=name, meta=meta)


def _load_digits() -> DiffusionModel:
    return _digits_model(*digits.load_digits_unet(), name="digits")


def _load_digits_dit() -> DiffusionModel:
    return _digits_model(*digits.load_digits_dit(), name="digits-dit")


TINY_CONFIG = {**digits.DIGITS_UNET_CONFIG, "block_out_channels": [16, 32],
               "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
               "attention_head_dim": 8, "norm_num_groups": 8}


def _load_tiny_random() -> DiffusionModel:
    torch.manual_seed(0)
    unet = digits.build_digits_unet(TINY_CONFIG).eval()
    return DiffusionModel(denoiser=unet, schedule=NoiseSchedule.from_config(digits.DIGITS_SCHEDULE),
                          sample_shape=(1, digits.IMAGE_SIZE, digits.IMAGE_SIZE), conditioning="class",
                          num_classes=digits.NUM_CLASSES, null_class=digits.NUM_CLASSES, name="tiny-random",
                          meta={"unet": TINY_CONFIG})


def _compvis(what: str) -> str:
    return (f"a local copy: put CompVis latent-diffusion's {what} (model.ckpt + config.yaml, as its model zip holds "
            f"them; or a diffusers folder) at $LOWBITDM_MODELS_DIR/<name> (default ~/.cache/lowbitdm/models/<name>), "
            f"or pass --model PATH")


MODELS: dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry("digits", "embedded class-conditional DDPM on sklearn digits (16x16, 2.6M params)",
               # DPM-Solver++(2M) 10 steps: FID-digits within the 500-sample noise of DDIM 50 at 10, 12, 15
               # and 20 steps, closest at 10 (benchmarks/sampler_fid.py); 5x fewer denoiser calls than DDIM 50
               sampler={"sampler": "dpmpp2m", "steps": 10, "eta": 0.0, "guidance": 1.25, "clip_x0": True},
               loader=_load_digits,
               resolution=16),
    ModelEntry("digits-dit", "embedded class-conditional diffusion transformer (DiT, patch 2, 6 blocks) on sklearn "
               "digits (16x16, 2.1M params)",
               # the digits UNet's sampler with CFG 1.35 instead of 1.25: at 1.25 the DiT's class accuracy is
               # 96.3 %, at 1.35 97.8 % with FID-digits 1.01x the UNet's (docs/transformers.md, guidance sweep)
               sampler={"sampler": "dpmpp2m", "steps": 10, "eta": 0.0, "guidance": 1.35, "clip_x0": True},
               loader=_load_digits_dit, resolution=16),
    ModelEntry("tiny-random", "randomly initialised digits-shaped UNet (seeded) for smoke tests",
               sampler={"steps": 10, "eta": 0.0, "guidance": 2.0, "clip_x0": True}, loader=_load_tiny_random,
               resolution=16),
    ModelEntry("ldm-4", "LDM-4 ImageNet 256, class-conditional (CompVis cin256-v2)",
               sampler={"steps": 20, "eta": 0.0, "guidance": 3.0, "clip_x0": False}, evaluator="inception",
               needs=_compvis("cin256-v2 (models/ldm/cin256-v2)"), family="ldm-class", resolution=256),
    ModelEntry("ldm-bedroom", "LDM-4 LSUN-Bedroom 256, unconditional",
               sampler={"steps": 200, "eta": 1.0, "guidance": 1.0, "clip_x0": False}, evaluator="inception",
               needs=_compvis("lsun_bedrooms"), family="ldm", conditioning="none", resolution=256),
    ModelEntry("ldm-church", "LDM-8 LSUN-Church 256, unconditional",
               sampler={"steps": 500, "eta": 0.0, "guidance": 1.0, "clip_x0": False}, evaluator="inception",
               needs=_compvis("lsun_churches"), family="ldm", conditioning="none", resolution=256),
    ModelEntry("ddpm-cifar10", "DDPM CIFAR-10 32x32, unconditional",
               sampler={"steps": 100, "eta": 0.0, "guidance": 1.0, "clip_x0": True}, evaluator="inception",
               needs="the diffusers folder google/ddpm-cifar10-32", hub_id="google/ddpm-cifar10-32", family="ddpm",
               conditioning="none", resolution=32),
    ModelEntry("sd-v1-4", "Stable Diffusion v1.4, text-to-image 512",
               sampler={"steps": 50, "eta": 0.0, "guidance": 7.5, "clip_x0": False}, evaluator="clip",
               needs="the diffusers folder CompVis/stable-diffusion-v1-4", hub_id="CompVis/stable-diffusion-v1-4",
               family="sd", conditioning="text", resolution=512),
    ModelEntry("dit-xl-2-256", "DiT-XL/2 ImageNet 256, class-conditional transformer",
               sampler={"steps": 50, "eta": 0.0, "guidance": 1.5, "clip_x0": False}, evaluator="inception",
               needs="the diffusers folder facebook/DiT-XL-2-256", hub_id="facebook/DiT-XL-2-256", family="dit",
               resolution=256),
]}
MODELS["ldm-4-imagenet"] = MODELS["ldm-4"]


def model_entry(name: str) -> ModelEntry:
    """The registry entry of `name` (whether or not its weights are on this machine)."""
    entry = MODELS.get(name)
    if entry is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))} "
                                 f"(see `lowbitdm models`), a model folder path, or a hub repository owner/repo")
    return entry


def _family(name: str):  # noqa: ANN202 - the models.families.Family of a path or hub repository
    return path_family(hub_folder(name) if is_hub_id(name) else Path(name))


def _folder_settings(name: str) -> dict:
    """The ``"lowbitdm"`` object of a pipeline folder's ``model_index.json`` ({} for anything else)."""
    path = hub_folder(name) if is_hub_id(name) else Path(name)
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    try:
        extra = json.loads(index.read_text()).get("lowbitdm") or {}
    except (OSError, ValueError):
        return {}
    return extra if isinstance(extra, dict) else {}


def sampler_defaults(name: str) -> dict:
    """The paper sampler setting of a registered model, or of a path's / hub repository's family
    (a folder's ``model_index.json`` may set its own under ``"lowbitdm": {"sampler": {...}}``)."""
    if name in MODELS:
        return dict(MODELS[name].sampler)
    if Path(name).exists() or is_hub_id(name):
        return {**_family(name).sampler, **(_folder_settings(name).get("sampler") or {})}
    return dict(model_entry(name).sampler)  # raises: unknown model


def evaluator_of(name: str) -> str:
    """Which evaluator scores a model's samples: digits-features, inception or clip (a folder's
    ``model_index.json`` may name its own under ``"lowbitdm": {"evaluator": ...}``)."""
    if name in MODELS:
        return MODELS[name].evaluator
    if Path(name).exists() or is_hub_id(name):
        return _folder_settings(name).get("evaluator") or _family(name).evaluator
    return "inception"


def _local(entry: ModelEntry) -> bool:
    d = entry.local_dir
    return (d / "model_index.json").is_file() or (d.is_dir() and is_compvis(d))


def _load_entry(entry: ModelEntry, prompts: list[str] | None, with_denoiser: bool) -> DiffusionModel:
    from lowbitdm_cli.models.diffusers_loader import download_snapshot

    if entry.loader is not None:
        return entry.loader()
    if _local(entry):
        folder = entry.local_dir
    elif entry.hub_id is None:
        raise ModelNotFoundError(f"model {entry.name!r} needs {entry.needs.replace('<name>', entry.name)}")
    else:
        folder = download_snapshot(entry.hub_id, entry.name, entry.local_dir)
    model = load_path(folder, prompts, with_denoiser, name=entry.name)
    if model.conditioning != entry.conditioning:
        raise ModelFormatError(f"{folder} holds a model with conditioning {model.conditioning!r}, but "
                               f"{entry.name!r} is {entry.conditioning!r}: put {entry.name}'s own files there")
    if not _local(entry):
        model.meta["source"] = f"hub:{entry.hub_id}"
    return model


def load_model(name: str, prompts: list[str] | None = None, with_denoiser: bool = True) -> DiffusionModel:
    """Load a registered model, a diffusers folder, a CompVis checkpoint or a hub repository
    (``owner/repo``: from the hub cache, downloaded when online) in eval mode, gradients off.

    `prompts` are the prompt list of a text-to-image model. `with_denoiser=False` loads only
    the parts beside the denoiser (for a merged checkpoint, which brings its own).
    """
    if name in MODELS:
        model = _load_entry(MODELS[name], prompts, with_denoiser)
    elif Path(name).exists():
        model = load_path(Path(name), prompts, with_denoiser)
    elif is_hub_id(name):
        model = load_path(hub_folder(name), prompts, with_denoiser, name=name)
        model.meta["source"] = f"hub:{name}"
    else:
        model_entry(name)  # raises: unknown model
        raise AssertionError("unreachable")
    if model.denoiser is not None:
        model.denoiser.eval().requires_grad_(False)
    for part in model.parts().values():
        part.eval().requires_grad_(False)
    return model


def _update(h: hashlib._Hash, state: dict[str, torch.Tensor]) -> None:
    for key, value in sorted(state.items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _prefixed(parts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}


def parts_digest(model: DiffusionModel) -> str:
    """sha256 of the parts beside the denoiser (autoencoder, conditioner weights)."""
    h = hashlib.sha256()
    _update(h, _prefixed(model.parts()))
    return h.hexdigest()


def model_ref(model: DiffusionModel) -> ModelRef:
    """Name, source and a digest of the model's weights (so an artifact knows what it came from).

    The digest covers the denoiser and every part beside it (a model without such parts, like
    digits, has the digest of its denoiser alone). `source` is ``embedded``, ``hub:<repo>`` or
    the folder the model was loaded from; `name` is the registry name or the folder path.
    """
    h = hashlib.sha256()
    _update(h, {**model.denoiser.state_dict(), **_prefixed(model.parts())})
    source = "embedded" if model.name in MODELS and MODELS[model.name].loader else model.meta.get("source", "path")
    return ModelRef(name=model.name, source=source, digest=h.hexdigest())
