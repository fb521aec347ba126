"""`run`: a recipe's whole chain plus the full-precision baseline, skipping finished stages.

Layout under `runs_dir`::

    <model>-fp-<sampler digest>/sample, evaluate        shared by every recipe with the same sampler
    <model>-<recipe>-<bits>/calibrate, finetune, merge, sample, evaluate
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowbitdm_cli.artifacts import Artifact, digest_of
from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.models.registry import evaluator_of, sampler_defaults
from lowbitdm_cli.recipes import Recipe
from lowbitdm_cli.stages.calibrate import calibrate
from lowbitdm_cli.stages.common import open_source
from lowbitdm_cli.stages.evaluate import evaluate
from lowbitdm_cli.stages.finetune import finetune
from lowbitdm_cli.stages.merge import merge
from lowbitdm_cli.stages.sample import sample

__all__ = ["run_recipe"]


def _row(label: str, evaluated: Artifact, merged: Artifact | None = None) -> dict[str, Any]:
    wall = sum(a.manifest.timings.get("wall_s", 0.0) for a in evaluated.lineage())
    row = {"label": label, "path": str(evaluated.path), "metrics": evaluated.manifest.metrics, "wall_s": wall}
    if merged is not None:
        row["merged_mb"] = merged.manifest.metrics.get("merged_mb")
        row["size_ratio"] = merged.manifest.info.get("size_ratio")
    return row


def run_recipe(recipe: Recipe, runs_dir: Path, force: bool = False,
               progress: Callable[[str, int, int], None] = lambda *_: None,
               log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run FP baseline and the quantized chain; return the rows of the comparison table."""
    defaults = sampler_defaults(recipe.model.name)  # an unknown model fails here
    if evaluator_of(recipe.model.name) != "digits-features":
        raise RecipeError(f"`lowbitdm run` scores with the embedded models' digits metrics; for {recipe.model.name!r} "
                          f"run the stages one by one so that evaluate gets its reference and weights (--ref, "
                          f"--inception-weights, --clip-weights): see the README's paper-model commands")
    recipe = recipe.resolved(defaults)
    name = Path(recipe.model.name).name  # a folder path runs under its folder's name
    metrics = recipe.evaluate.metrics
    fp_dir = runs_dir / f"{name}-fp-{digest_of(recipe.sample.model_dump())[:8]}"
    run_dir = runs_dir / f"{name}-{recipe.name}-{recipe.quant.bits}"

    log(f"full-precision baseline → {fp_dir}")
    fp_samples = sample(open_source(recipe.model.name, prompts=recipe.model.prompts), recipe, fp_dir / "sample", resume=True, replace_stale=True,
                        progress=progress)
    fp_eval = evaluate(fp_samples, metrics, fp_dir / "evaluate", replace_stale=True)

    log(f"{recipe.name} at {recipe.quant.bits} → {run_dir}")
    stale = {"force": force, "replace_stale": True}
    cal = calibrate(recipe, run_dir / "calibrate", resume=True, progress=progress, **stale)
    ft = finetune(cal, recipe, run_dir / "finetune", resume=True, progress=progress, **stale)
    merged = merge(ft, run_dir / "merge", **stale)
    q_samples = sample(open_source(str(merged.path)), recipe, run_dir / "sample", resume=True, progress=progress,
                       **stale)
    q_eval = evaluate(q_samples, metrics, run_dir / "evaluate", **stale)
    return {"run_dir": str(run_dir),
            "rows": [_row(f"{name} fp32", fp_eval), _row(f"{name} {recipe.quant.bits} {recipe.name}", q_eval, merged)]}
