"""lowbitdm: quantize diffusion models to 2–8 bits, finetune them, ship real low-bit checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lowbitdm_cli.version import __version__

if TYPE_CHECKING:
    from lowbitdm_cli.models.wrapper import DiffusionModel

__all__ = ["__version__", "load_quantized"]


def load_quantized(path: str | Path, runtime: Literal["int", "fake"] = "int") -> DiffusionModel:
    """Load a merge artifact folder as a runnable `DiffusionModel` (``runtime`` "int" or "fake").

    The artifact is validated first (manifest, sha256 of every file), so a changed file is an
    `IntegrityError`; only JSON and safetensors are read, nothing is unpickled.
    ``model.meta["runtime"]`` reports how many layers run on integer kernels.
    """
    from lowbitdm_cli.artifacts import Artifact  # imported here so `import lowbitdm_cli` stays light
    from lowbitdm_cli.export.checkpoint import load_merged

    art = Artifact.open(path, ("merge",))
    return load_merged(art.path, runtime=runtime)
