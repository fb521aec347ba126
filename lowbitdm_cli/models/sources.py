"""Where a model that is not embedded comes from: a folder or checkpoint path, or a hub repository.

- a diffusers pipeline folder (`models.diffusers_loader`);
- a CompVis checkpoint: a ``.ckpt`` / ``.safetensors`` file, or a folder holding ``model.ckpt``
  (or ``model.safetensors``) and ``config.yaml`` as CompVis' model zips do (`models.compvis`);
- a Hugging Face hub repository ``owner/repo``: ``$LOWBITDM_MODELS_DIR/<owner>--<repo>`` when
  that folder exists, else the hub snapshot (cache, or a download when online).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lowbitdm_cli.models.wrapper import DiffusionModel

__all__ = ["hub_folder", "is_compvis", "is_hub_id", "load_path", "models_dir", "path_family"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMPVIS_FILES = ("model.ckpt", "model.safetensors")


def models_dir() -> Path:
    """Where registered models are looked for: $LOWBITDM_MODELS_DIR or ~/.cache/lowbitdm/models."""
    return Path(os.environ.get("LOWBITDM_MODELS_DIR") or Path.home() / ".cache" / "lowbitdm" / "models")


def is_hub_id(name: str) -> bool:
    """``owner/repo`` that is not a path here (registered names have no slash)."""
    return not Path(name).exists() and bool(_HUB_ID.match(name))


def hub_folder(repo_id: str) -> Path:
    """A local copy of hub repository `repo_id`: $LOWBITDM_MODELS_DIR/<owner>--<repo>, else the hub snapshot."""
    from lowbitdm_cli.models.diffusers_loader import download_snapshot

    local = models_dir() / repo_id.replace("/", "--")
    if (local / "model_index.json").is_file():
        return local
    return download_snapshot(repo_id, repo_id, local)


def is_compvis(path: Path) -> bool:
    """A CompVis checkpoint: a .ckpt/.safetensors file, or a folder with model.ckpt + config.yaml."""
    if path.is_file():
        return path.suffix in (".ckpt", ".safetensors")
    return not (path / "model_index.json").exists() and any((path / f).is_file() for f in _COMPVIS_FILES)


def load_path(path: Path, prompts: list[str] | None, with_denoiser: bool, name: str | None = None
              ) -> DiffusionModel:
    """The model at `path` (a diffusers pipeline folder or a CompVis checkpoint); `name` defaults to
    the resolved path."""
    from lowbitdm_cli.models.diffusers_loader import load_folder

    if not is_compvis(path):
        return load_folder(path, prompts, with_denoiser, name=name)
    from lowbitdm_cli.models import compvis
    from lowbitdm_cli.models.families import from_compvis

    cv = compvis.load_compvis(*compvis.compvis_files(path))
    source = str(path.resolve())
    return from_compvis(cv, name or source, source, with_denoiser)


def path_family(path: Path):  # noqa: ANN201 - a models.families.Family
    """The family of the model at `path` (a CompVis config is read, never its checkpoint)."""
    from lowbitdm_cli.models.diffusers_loader import detect_family
    from lowbitdm_cli.models.families import FAMILIES

    if is_compvis(path):
        from lowbitdm_cli.models import compvis

        params = compvis.read_config(compvis.compvis_files(path)[1])["model"]["params"]
        return FAMILIES["ldm" if params.get("cond_stage_config") == "__is_unconditional__" else "ldm-class"]
    return detect_family(path)[0]
