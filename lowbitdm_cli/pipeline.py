"""`run`: a recipe's whole chain plus the full-precision baseline, skipping finished stages.

Layout under `runs_dir`::

    <model>-fp-<sampler digest>/sample, evaluate        shared by every recipe with the same sampler
    <model>-<recipe>-<bits>/calibrate, finetune, merge, sample, evaluate
    <model>-<recipe>-<bits>-seed<k>/...                 `run_seeds`: seed offset k >= 1

Several seeds (`run_seeds`, `lowbitdm run --seeds N`): run k adds k to the recipe's
`calibrate.seed`, `finetune.seed` and `sample.seed`, so the whole chain is redrawn (calibration
trajectories, finetune noise and labels, sample noise; sample seeds k are disjoint noise blocks)
and run 0 is the plain run. Each seed gets its own FP baseline (its sampler seed differs).
`lowbitdm report` groups runs that differ only by these seeds.

Any model runs, the embedded ones and a user's diffusers folder alike: what is scored depends on
what is given (`RunEvaluation`: metrics, Inception weights and reference, CLIP weights). Metrics
that cannot be computed are skipped with their reason; with none left, the run stops after
sampling and writes ``<run>/fp_vs_quantized.png`` (the FP and quantized grids side by side).

With an FP cache folder (`lowbitdm run` uses ``$LOWBITDM_FP_CACHE`` or
``~/.cache/lowbitdm/fp-baselines``), the baseline is also shared across runs folders:
``<cache>/<model>-<key>/sample, evaluate``, keyed by the model's weights digest and the resolved
model and sample sections (sampler, steps, guidance, seed, sample count, ...). A runs folder
without the baseline gets a copy (hashes checked before it is used; the sample and evaluate
stages then still check their inputs digests and redo anything stale), and a baseline computed
here is copied in. Both copies go through a temporary folder renamed into place, so a crash leaves
either the whole entry or none, and nothing in the runs folder is ever modified by the cache.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbitdm_cli.artifacts import Artifact, digest_of
from lowbitdm_cli.errors import LowbitError, RecipeError
from lowbitdm_cli.models.registry import evaluator_of, sampler_defaults
from lowbitdm_cli.recipes import Recipe
from lowbitdm_cli.stages.calibrate import calibrate
from lowbitdm_cli.stages.common import open_source, recipe_prompts
from lowbitdm_cli.stages.evaluate import InceptionOptions, evaluate, plan_metrics
from lowbitdm_cli.stages.finetune import finetune
from lowbitdm_cli.stages.merge import merge
from lowbitdm_cli.stages.sample import sample

__all__ = ["RunEvaluation", "default_fp_cache", "run_folders", "run_recipe", "run_seeds", "with_seed_offset"]


@dataclass(frozen=True)
class RunEvaluation:
    """What `run` scores with: metrics (None: the recipe's for the embedded models, else the model's
    defaults), Inception options (weights, reference) and CLIP weights. Metrics that cannot be computed
    with these are skipped, each with its reason (`stages.evaluate.plan_metrics`)."""

    metrics: list[str] | None = None
    inception: InceptionOptions = field(default_factory=InceptionOptions)
    clip_weights: str | Path | None = None


def default_fp_cache() -> Path:
    """Where `lowbitdm run` keeps FP baselines: $LOWBITDM_FP_CACHE or ~/.cache/lowbitdm/fp-baselines."""
    return Path(os.environ.get("LOWBITDM_FP_CACHE") or Path.home() / ".cache" / "lowbitdm" / "fp-baselines")


def _copy_artifacts(src: Path, dst: Path, names: list[str]) -> None:
    """Copy the artifact folders `names` of `src` into a new folder `dst`, atomically: a temporary
    sibling is filled, every copied artifact is re-opened (sha256 of every file), then renamed."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for n in names:
            shutil.copytree(src / n, tmp / n, symlinks=True)
            Artifact.open(tmp / n)  # hashes checked on the copy
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_fp(entry: Path, fp_dir: Path, log: Callable[[str], None]) -> str | None:
    """Copy a cached baseline into `fp_dir` if the runs folder has none (and no interrupted one);
    returns the copied sample artifact's manifest sha256, None when nothing was copied."""
    if not (entry / "sample").is_dir() or any((fp_dir / n).exists() for n in ("sample", "sample.partial")):
        return None
    names = ["sample"] + (["evaluate"] if (entry / "evaluate").is_dir() else [])
    try:
        for n in names:
            Artifact.open(entry / n)
        fp_dir.mkdir(parents=True, exist_ok=True)
        for n in names:  # artifact by artifact: the evaluate's parent path (../sample) stays valid
            if not (fp_dir / n).exists():
                _copy_artifacts(entry, fp_dir / f".restore-{n}", [n])
                os.replace(fp_dir / f".restore-{n}" / n, fp_dir / n)
                shutil.rmtree(fp_dir / f".restore-{n}", ignore_errors=True)
    except (LowbitError, OSError) as e:
        log(f"FP cache entry {entry} not used: {e}")
        return None
    log(f"full-precision baseline copied from the FP cache {entry}")
    return Artifact.open(fp_dir / "sample", verify=False).manifest_sha256


def _store_fp(entry: Path, fp_dir: Path, evaluated: Artifact, log: Callable[[str], None]) -> None:
    """Copy the runs folder's complete baseline into the cache unless the entry already holds it,
    intact: the same evaluate manifest is not enough, every file of the entry's evaluate and sample
    must match its sha256 (a runs folder that filled the entry finds its own manifests there even
    after the entry's files were damaged, and would otherwise leave them so)."""
    try:
        held = Artifact.open(entry / "evaluate")  # verified
        if held.manifest_sha256 == evaluated.manifest_sha256:
            sample = held.parent  # the entry's own sample, its manifest checked against the evaluate's record
            if sample is not None:
                sample.verify()
                return
    except LowbitError:
        pass  # a missing or broken entry is (re)written
    try:
        _copy_artifacts(fp_dir, entry, ["sample", "evaluate"])
    except (LowbitError, OSError) as e:
        log(f"could not store the full-precision baseline in the FP cache {entry}: {e}")


def _row(label: str, last: Artifact, samples: Artifact, merged: Artifact | None = None) -> dict[str, Any]:
    """One table row: `last` is the evaluate artifact (or the sample one when nothing was scored)."""
    wall = sum(a.manifest.timings.get("wall_s", 0.0) for a in last.lineage())
    sample_s = samples.manifest.timings.get("wall_s", 0.0)
    num = samples.manifest.info.get("num_samples", 0)
    row = {"label": label, "path": str(last.path), "metrics": last.manifest.metrics, "wall_s": wall,
           "sample_s": sample_s, "images_per_s": num / sample_s if sample_s else None,
           "intervals": {k: v.model_dump() for k, v in last.manifest.intervals.items()}}
    if merged is not None:
        row["merged_mb"] = row["denoiser_mb"] = merged.manifest.metrics.get("merged_mb")
        row["size_ratio"] = merged.manifest.info.get("size_ratio")
    return row


def with_seed_offset(recipe: Recipe, offset: int) -> Recipe:
    """`recipe` with `offset` added to calibrate.seed, finetune.seed and sample.seed."""
    if offset == 0:
        return recipe
    return recipe.model_copy(update={
        section: getattr(recipe, section).model_copy(update={"seed": getattr(recipe, section).seed + offset})
        for section in ("calibrate", "finetune", "sample")})


def _side_by_side(fp_grid: Path, q_grid: Path, out: Path, gap: int = 8) -> Path:
    """The FP and quantized sample grids in one PNG, FP on the left, a white gap between them."""
    from PIL import Image

    a, b = Image.open(fp_grid).convert("RGB"), Image.open(q_grid).convert("RGB")
    both = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), "white")
    both.paste(a, (0, 0))
    both.paste(b, (a.width + gap, 0))
    both.save(out)
    return out


def _run_folders(recipe: Recipe, runs_dir: Path, seed_offset: int) -> tuple[Path, Path]:
    """(FP baseline folder, quantized run folder) of a seed-offset, resolved recipe."""
    name = Path(recipe.model.name).name  # a folder path runs under its folder's name
    fp_sample = recipe.with_sample_dtype().sample  # the FP baseline's key names the dtype it samples in
    return (runs_dir / f"{name}-fp-{digest_of(fp_sample.model_dump())[:8]}",
            runs_dir / (f"{name}-{recipe.name}-{recipe.quant.bits}" + (f"-seed{seed_offset}" if seed_offset else "")))


def run_folders(recipe: Recipe, runs_dir: Path, seed_offset: int = 0) -> tuple[Path, Path]:
    """Where `run_recipe(recipe, runs_dir, seed_offset=...)` writes: (FP baseline folder, run folder)."""
    recipe = with_seed_offset(recipe, seed_offset).resolved(sampler_defaults(recipe.model.name))
    return _run_folders(recipe, runs_dir, seed_offset)


def run_recipe(recipe: Recipe, runs_dir: Path, force: bool = False,
               progress: Callable[[str, int, int], None] = lambda *_: None,
               log: Callable[[str], None] = lambda _: None, seed_offset: int = 0,
               fp_cache: Path | None = None, evaluation: RunEvaluation | None = None) -> dict[str, Any]:
    """Run FP baseline and the quantized chain; return the rows of the comparison table.

    `seed_offset` k > 0: the seeds moved by k (`with_seed_offset`), run folder suffixed ``-seed<k>``.
    `fp_cache`: a folder sharing FP baselines across runs folders (None: no sharing).
    `evaluation`: what to score with (`RunEvaluation`); metrics it cannot compute are skipped and
    listed with their reasons under ``skipped``; with none left, the run stops after sampling and
    ``grids`` names the FP and quantized grids side by side."""
    recipe = with_seed_offset(recipe, seed_offset)
    evaluation = evaluation or RunEvaluation()
    defaults = sampler_defaults(recipe.model.name)  # an unknown model fails here
    recipe = recipe.resolved(defaults)
    fp_dir, run_dir = _run_folders(recipe, runs_dir, seed_offset)
    digits = evaluator_of(recipe.model.name) == "digits-features"
    wanted = evaluation.metrics or (recipe.evaluate.metrics if digits else None)
    metrics, skipped = plan_metrics(recipe.model.name, wanted, evaluation.inception, evaluation.clip_weights,
                                    recipe_prompts(recipe))
    scoring = {"inception": evaluation.inception, "clip_weights": evaluation.clip_weights}
    name = Path(recipe.model.name).name  # a folder path runs under its folder's name
    fp_sample = recipe.with_sample_dtype().sample  # the FP baseline's key names the dtype it samples in

    log(f"full-precision baseline → {fp_dir}")
    fp_source = open_source(recipe.model.name, prompts=recipe.model.prompts)
    entry = restored = None
    if fp_cache is not None and metrics:  # the cache holds evaluated baselines
        key = digest_of({"model": fp_source.ref.model_dump(), "model_section": recipe.model.model_dump(mode="json"),
                         "sample": fp_sample.model_dump(mode="json")})
        entry = Path(fp_cache) / f"{name}-{key[:16]}"
        restored = _restore_fp(entry, fp_dir, log)
    fp_samples = sample(fp_source, recipe, fp_dir / "sample", resume=True, replace_stale=True, progress=progress)
    fp_last = fp_samples
    if metrics:
        fp_last = evaluate(fp_samples, metrics, fp_dir / "evaluate", replace_stale=True, **scoring)
        if entry is not None:
            _store_fp(entry, fp_dir, fp_last, log)

    log(f"{recipe.name} at {recipe.quant.bits} → {run_dir}")
    stale = {"force": force, "replace_stale": True}
    cal = calibrate(recipe, run_dir / "calibrate", resume=True, progress=progress, **stale)
    ft = finetune(cal, recipe, run_dir / "finetune", resume=True, progress=progress, **stale)
    merged = merge(ft, run_dir / "merge", **stale)
    q_samples = sample(open_source(str(merged.path)), recipe, run_dir / "sample", resume=True, progress=progress,
                       **stale)
    q_last = evaluate(q_samples, metrics, run_dir / "evaluate", **stale, **scoring) if metrics else q_samples
    suffix = f" (seed +{seed_offset})" if seed_offset else ""
    fp_bytes = merged.manifest.info.get("fp_denoiser_bytes")
    fp_row = _row(f"{name} fp32{suffix}", fp_last, fp_samples)
    if fp_bytes:
        fp_row["denoiser_mb"] = round(fp_bytes / 2**20, 4)
    result = {"run_dir": str(run_dir),
              "fp_from_cache": restored is not None and restored == fp_samples.manifest_sha256,
              "rows": [fp_row,
                       _row(f"{name} {recipe.quant.bits} {recipe.name}{suffix}", q_last, q_samples, merged)],
              "skipped": skipped}
    grids = [a.path / "grid.png" for a in (fp_samples, q_samples)]
    if not metrics and all(g.is_file() for g in grids):
        result["grids"] = str(_side_by_side(*grids, run_dir / "fp_vs_quantized.png"))
    return result


def run_seeds(recipe: Recipe, runs_dir: Path, seeds: int, force: bool = False,
              progress: Callable[[str, int, int], None] = lambda *_: None,
              log: Callable[[str], None] = lambda _: None, fp_cache: Path | None = None,
              evaluation: RunEvaluation | None = None) -> dict[str, Any]:
    """`run_recipe` for seed offsets 0 .. seeds − 1, then the configurations over seeds (mean and
    95 % t interval per metric, as `lowbitdm report` shows them)."""
    from lowbitdm_cli.report import collect_runs, group_runs

    if seeds < 1:
        raise RecipeError(f"--seeds must be at least 1, got {seeds}")
    results = []
    for k in range(seeds):
        if seeds > 1:
            log(f"seed {k + 1} of {seeds} (seed offset {k})")
        results.append(run_recipe(recipe, runs_dir, force=force, progress=progress, log=log, seed_offset=k,
                                  fp_cache=fp_cache, evaluation=evaluation))
    rows = [row for r in results for row in r["rows"]]
    if seeds == 1:
        return {**results[0], "seeds": 1}
    fp_dirs = [str(Path(r["rows"][0]["path"]).parent) for r in results]
    q_dirs = [r["run_dir"] for r in results]
    configs = group_runs(collect_runs(fp_dirs + q_dirs))
    return {"run_dir": q_dirs[0], "run_dirs": q_dirs, "fp_dirs": fp_dirs, "seeds": seeds, "rows": rows,
            "fp_from_cache": [r["fp_from_cache"] for r in results], "skipped": results[0]["skipped"],
            **({"grids": [r["grids"] for r in results if "grids" in r]} if "grids" in results[0] else {}),
            "configurations": [c.to_dict() for c in configs]}
