"""Load a diffusers-format model folder (or a hub snapshot of one) as a `DiffusionModel`.

The folder's kind comes from ``model_index.json`` (see `models.families`). Components are
built by whitelisted classes only (``from_pretrained`` of diffusers / transformers model
classes named below), so a folder can never name code to run; their weights are read by
safetensors, or by ``torch.load(weights_only=True)`` for ``.bin`` files (diffusers' and
transformers' own loaders), never by free unpickling. The scheduler is read as JSON only
(its β schedule and prediction type), not instantiated.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from torch import nn

from lowbitdm_cli.errors import ModelFormatError, ModelNotFoundError, RecipeError
from lowbitdm_cli.models.conditioning import ClassEmbedder
from lowbitdm_cli.models.families import (
    FAMILIES,
    Family,
    build_model,
    family_of_pipeline,
    label_conditioner,
    load_class_embedder,
)
from lowbitdm_cli.models.pickled import pickle_refusal, unpickling_error
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule

__all__ = ["HUB_FILES", "detect_family", "download_snapshot", "load_folder"]

DENOISER_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel")
AUTOENCODER_CLASSES = ("VQModel", "AutoencoderKL")
IMAGE_CHANNELS = (1, 3)  # a denoiser with these input channels may work on pixels (no autoencoder)
# what a snapshot needs (no fp16 variants, no .ckpt, no safety checker): configs, tokenizer, and per
# component its safetensors weights, or its .bin ones (read with weights_only=True) where it has none
HUB_FILES = ["model_index.json", "scheduler/*.json", "tokenizer/*", "class_embedder/*",
             *(f"{c}/config.json" for c in ("unet", "transformer", "vae", "vqvae", "text_encoder"))]
_WEIGHTS = {c: ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
            for c in ("unet", "transformer", "vae", "vqvae")} | {"text_encoder": ("model.safetensors",
                                                                                 "pytorch_model.bin")}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing: the model folder is incomplete")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None


def detect_family(path: Path) -> tuple[Family, dict]:
    """(family, model_index) of a diffusers pipeline folder; a clear error for anything else."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelFormatError(f"{path} has no model_index.json: pass a diffusers pipeline folder (DDPMPipeline, "
                               f"LDMPipeline, StableDiffusionPipeline, DiTPipeline or a class-conditional LDM folder)")
    index = _read_json(index_file)
    family = family_of_pipeline(index.get("_class_name"))
    if family is None:
        known = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
        raise ModelFormatError(f"{path}: pipeline {index.get('_class_name')!r} is not supported (supported: {known})")
    return family, index


def _refused_pickle(folder: Path, error: Exception) -> ModelFormatError | None:
    """A one-line error for a component whose .bin weights hold a pickle that weights_only refuses
    (diffusers and transformers wrap that refusal in tracebacks of their own); None for other errors."""
    cause = unpickling_error(error)
    if cause is None:
        return None
    names = [n for names in _WEIGHTS.values() for n in names if n.endswith(".bin")]
    weights = next((folder / n for n in names if (folder / n).is_file()), folder)
    return ModelFormatError(pickle_refusal(weights, cause))


def _load_diffusers(folder: Path, allowed: tuple[str, ...]) -> nn.Module:
    import diffusers

    name = _read_json(folder / "config.json").get("_class_name")
    if name not in allowed:
        raise ModelFormatError(f"{folder}: model class {name!r} is not supported here ({', '.join(allowed)})")
    try:
        module = getattr(diffusers, name).from_pretrained(str(folder), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        refused = _refused_pickle(folder, e)
        if refused is None:
            raise
        raise refused from None
    return module.eval().requires_grad_(False)


def _text_conditioner(path: Path, prompts: list[str] | None):  # noqa: ANN202
    from transformers import CLIPTextModel, CLIPTokenizer

    from lowbitdm_cli.models.text import PromptEncoder

    if not prompts:
        raise RecipeError(f"{path} is a text-to-image model: give prompts (--prompts FILE, one per line, or "
                          f"model.prompts in the recipe)")
    try:
        encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder"))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        refused = _refused_pickle(path / "text_encoder", e)
        if refused is None:
            raise
        raise refused from None
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    return PromptEncoder(encoder, tokenizer, prompts)


def _autoencoder(path: Path, family: Family, index: dict, den_cfg: dict) -> nn.Module | None:
    """The family's autoencoder, or None for a denoiser that works on the images themselves.

    The autoencoder is optional wherever the denoiser's input channels are an image's (1 or 3)
    and the folder has none (absent or ``[null, null]`` in ``model_index.json``, no folder), e.g. a
    pixel-space `DiTTransformer2DModel` in a DiTPipeline folder; a component that
    ``model_index.json`` names must be there."""
    if family.autoencoder is None:
        return None
    folder = path / family.autoencoder
    listed = index.get(family.autoencoder)
    if (folder / "config.json").is_file() or (isinstance(listed, list) and any(listed)) or folder.is_dir():
        return _load_diffusers(folder, AUTOENCODER_CLASSES)
    channels = den_cfg.get("in_channels")
    if channels not in IMAGE_CHANNELS:
        raise ModelFormatError(f"{path} has no {family.autoencoder}/ and its {family.denoiser} takes {channels} "
                               f"input channels, not an image's ({' or '.join(map(str, IMAGE_CHANNELS))}): a latent "
                               f"model needs its autoencoder folder")
    return None


def load_folder(path: Path | str, prompts: list[str] | None = None, with_denoiser: bool = True,
                name: str | None = None) -> DiffusionModel:
    """Load a pipeline folder. `with_denoiser=False` loads only the other parts (autoencoder,
    conditioner), for a merged checkpoint that brings its own denoiser (`model.denoiser` is None)."""
    path = Path(path).resolve()
    family, index = detect_family(path)
    extra = index.get("lowbitdm") or {}
    schedule = NoiseSchedule.from_config(_read_json(path / "scheduler" / "scheduler_config.json"))
    den_dir = path / family.denoiser
    den_cfg = _read_json(den_dir / "config.json")
    denoiser = _load_diffusers(den_dir, DENOISER_CLASSES) if with_denoiser else None
    autoencoder = _autoencoder(path, family, index, den_cfg)
    if family.conditioning == "text":
        conditioner = _text_conditioner(path, prompts)
    elif family.name == "ldm-class":
        emb, cfg = load_class_embedder(path / "class_embedder")
        conditioner = ClassEmbedder(emb.eval().requires_grad_(False), int(cfg["num_classes"]), int(cfg["null_class"]))
    else:
        try:
            conditioner = label_conditioner(family, den_cfg, extra)
        except ValueError as e:
            raise ModelFormatError(f"{path}: {e}") from None
    return build_model(family, denoiser, den_cfg, schedule, conditioner, autoencoder, name or str(path),
                       {"source": str(path), "pipeline": index.get("_class_name")}, extra.get("latent_scale"))


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def download_snapshot(repo_id: str, name: str, local_hint: Path) -> Path:
    """The local snapshot folder of `repo_id` (from the hub cache, else downloaded when online).

    Offline, or with the hub unreachable, one `ModelNotFoundError` says what to fetch and where
    to put it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _offline()

    def fetch(weights: list[str]) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, *weights], local_files_only=offline,
                                      cache_dir=constants.HF_HUB_CACHE))

    try:
        folder = fetch([f"{c}/{names[0]}" for c, names in _WEIGHTS.items()])
        # components without safetensors weights: their .bin (torch.load(weights_only=True) reads it)
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() \
            else {}
        missing = [c for c in _WEIGHTS if c in index and not (folder / c / _WEIGHTS[c][0]).is_file()]
        if missing:
            folder = fetch([f"{c}/{names[0]}" for c, names in _WEIGHTS.items()] +
                           [f"{c}/{_WEIGHTS[c][1]}" for c in missing])
        return folder
    except HfHubHTTPError as e:  # reachable, but refused: gated (license not accepted), private or missing
        raise ModelNotFoundError(
            f"the hub refused {repo_id} for model {name!r} ({str(e).splitlines()[0]}): accept its license and log "
            f"in (`hf auth login`), or download it elsewhere with `hf download {repo_id} --local-dir {local_hint}` "
            f"and copy the folder here") from None
    except (LocalEntryNotFoundError, OSError):
        raise ModelNotFoundError(
            f"model {name!r} is not on this machine and the hub is unreachable: on a machine with internet run "
            f"`hf download {repo_id} --local-dir {local_hint}` (copy the folder here), then rerun, "
            f"or pass --model PATH of that folder") from None
