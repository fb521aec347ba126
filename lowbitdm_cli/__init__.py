"""lowbitdm: quantize diffusion models to 2–8 bits, finetune them, ship real low-bit checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lowbitdm_cli.version import __version__

# With torchao installed (the compiled runtime's extra), `import diffusers` imports it too and two
# warnings reach every command's stderr: torchao registering enums with the deprecated pytree call,
# and diffusers missing tensor classes that torchao 0.18 dropped (only diffusers' own torchao
# quantizer needs them; lowbitdm never does). Errors still get through.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

if TYPE_CHECKING:
    from lowbitdm_cli.models.wrapper import DiffusionModel

__all__ = ["__version__", "load_quantized"]


def load_quantized(path: str | Path, runtime: Literal["int", "fake", "compiled"] | None = None, loras: list | None = None
                   ) -> DiffusionModel:
    """Load a calibrate, finetune or merge artifact folder as a runnable `DiffusionModel`.

    ``runtime``: "int" (integer kernels; merge artifacts, their default), "fake" (fake-quantized;
    calibrate and finetune artifacts run only so) or "compiled" (merge artifacts: the integer layers
    compiled with the whole denoiser by Inductor; faster, not bit-equal to "fake"; needs torchao). The artifact is validated first (manifest,
    sha256 of every file), so a changed file is an `IntegrityError`; only JSON and safetensors
    are read, nothing is unpickled. ``model.meta["runtime"]`` of a merged checkpoint reports how
    many layers run on integer kernels. ``loras``: LoRA adapter files (paths or ``(path, scale)``
    pairs) run as float branches beside the layers they target, the packed weights untouched
    (``model.meta["loras"]`` records each file's sha256 and scale). See `lowbitdm_cli.export.load`.
    """
    from lowbitdm_cli.export.load import load_quantized as load  # imported here so `import lowbitdm_cli` stays light

    return load(path, runtime=runtime, loras=loras)
