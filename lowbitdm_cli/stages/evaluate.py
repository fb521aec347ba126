"""Stage `evaluate`: a sample artifact → metrics (FID-digits and class accuracy for `digits`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbitdm_cli.artifacts import Artifact, StageRun
from lowbitdm_cli.errors import LowbitError
from lowbitdm_cli.models.registry import MODELS
from lowbitdm_cli.npz import read_npz

__all__ = ["evaluate"]

DIGITS_METRICS = ("fid_digits", "class_accuracy")


def evaluate(samples: Artifact, metrics: list[str], out: Path, force: bool = False, replace_stale: bool = False) -> Artifact:
    """Score the images of `samples`; metrics land in the manifest's `metrics`."""
    entry = MODELS.get(samples.manifest.model.name)
    evaluator = entry.evaluator if entry else "digits-features"
    unknown = [m for m in metrics if m not in DIGITS_METRICS]
    if evaluator != "digits-features" or unknown:
        raise LowbitError(f"metrics {unknown or metrics} are not available for {samples.manifest.model.name!r} "
                          f"yet: this version computes {', '.join(DIGITS_METRICS)} with the digits-features "
                          f"evaluator (Inception metrics are tracked in issue 7)")
    run = StageRun.start(out, "evaluate", samples.manifest.model, samples.manifest.recipe, parent=samples,
                         options={"metrics": sorted(metrics)}, resume=False, force=force,
                         replace_stale=replace_stale,
                         recipe_sections=("evaluate",))
    if run.done:
        return run.artifact  # type: ignore[return-value]
    from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator

    data = read_npz(samples.file("samples.npz"))
    labels = torch.from_numpy(data["labels"]) if "labels" in data else None
    ev = DigitsEvaluator()
    result, mu, sigma = ev.evaluate_with_stats(torch.from_numpy(data["arr_0"]), labels)
    run.save_tensors("stats.safetensors", {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)})
    values = {m: result[m] for m in metrics if m in result}
    return run.commit(["stats.safetensors"], metrics=values,
                      info={"evaluator": evaluator, "num_images": int(len(data["arr_0"])),
                            "reference": "digits train split (shipped statistics)"})
