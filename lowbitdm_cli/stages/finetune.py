"""Stage `finetune`: calibrated model → finetuned model.

This version has the explicit pass-through method `none`: it writes a proper finetune
artifact whose quantizer state is the calibrated one, so `merge` and the rest of the
chain see the same shape of lineage whatever the method. The distillation methods
(EfficientDM, MPQ-DM, QuEST, QAT) plug into this stage (issue 5).
"""

from __future__ import annotations

from pathlib import Path

from lowbitdm_cli.artifacts import Artifact, StageRun
from lowbitdm_cli.recipes import Recipe

__all__ = ["finetune"]


def finetune(parent: Artifact, recipe: Recipe, out: Path, resume: bool = False, force: bool = False, replace_stale: bool = False) -> Artifact:
    run = StageRun.start(out, "finetune", parent.manifest.model, recipe.model_dump(mode="json"), parent=parent,
                         resume=resume, force=force,
                         replace_stale=replace_stale)
    if run.done:
        return run.artifact  # type: ignore[return-value]
    state = parent.tensors("quant_state.safetensors")
    run.save_tensors("quant_state.safetensors", state)
    return run.commit(["quant_state.safetensors"],
                      info={"method": recipe.finetune.method, "trainable_parameters": 0})
