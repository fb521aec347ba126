"""Stage `merge`: finetuned (or calibrated) model → packed low-bit checkpoint.

Everything learned is folded into integer weights (LoRA B·A merged before quantization,
learned step sizes and zero points, per-channel bits) and packed to the bit width; the
activation parameters are stored per timestep. The manifest records the FP and merged
denoiser sizes in bytes. LoRA adapters given to `merge` are folded in first, ``Q(W + s·B·A)`` with
the calibrated weight quantizers (`adapters.branch.fold_loras`); the manifest records each one's
sha256 and scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbitdm_cli.adapters.branch import fold_loras
from lowbitdm_cli.adapters.lora_file import Adapter, lora_inputs
from lowbitdm_cli.artifacts import Artifact, StageRun
from lowbitdm_cli.export.checkpoint import CONFIG_NAME, WEIGHTS_NAME, export_tensors
from lowbitdm_cli.stages.common import load_fp_model, load_quantized_from

__all__ = ["merge"]


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def merge(parent: Artifact, out: Path, force: bool = False, replace_stale: bool = False,
          loras: list | None = None) -> Artifact:
    """Pack `parent`'s quantized model; `loras` (paths, (path, scale) pairs or `Adapter`s) are folded
    into the float weights before quantization."""
    records = [Adapter.of(a).record() for a in loras or []]
    options = {"loras": lora_inputs(records)} if records else None
    run = StageRun.start(out, "merge", parent.manifest.model, parent.manifest.recipe, parent=parent, force=force,
                         replace_stale=replace_stale, options=options)
    if run.done:
        return run.artifact  # type: ignore[return-value]
    with torch.no_grad():
        model = load_quantized_from(parent)
        if loras:
            records = fold_loras(model.denoiser, loras)
        tensors, config = export_tensors(model, scheme=parent.manifest.recipe.get("quant"))
        fp_bytes = _nbytes(load_fp_model(parent.manifest.model.name, parent.manifest.recipe).denoiser.state_dict())
    run.save_tensors(WEIGHTS_NAME, tensors, metadata={"format": "lowbitdm-pack-quantized"})
    run.save_bytes(CONFIG_NAME, (json.dumps(config, indent=1) + "\n").encode())
    merged_bytes = run.path(WEIGHTS_NAME).stat().st_size
    info = {"format": config["format"], "quantized_layers": len(config["layers"]),
            "fp_denoiser_bytes": fp_bytes, "merged_denoiser_bytes": merged_bytes,
            "size_ratio": round(merged_bytes / fp_bytes, 4), **({"loras": records} if records else {})}
    return run.commit([WEIGHTS_NAME, CONFIG_NAME], info=info,
                      metrics={"merged_mb": round(merged_bytes / 2**20, 4)})
