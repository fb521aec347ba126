"""Inception metrics of a sample set against a reference: which features each metric needs, and scoring.

`fid` and `sfid` need reference statistics (pool / spatial), `precision`, `recall` and `kid`
reference pool features, `is` nothing from the reference. Settings follow the ADM suite:
IS over splits of 5000, precision/recall with k = 3; KID as clean-fid (100 subsets of 1000).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbitdm_cli.errors import EvaluationError
from lowbitdm_cli.evaluation.frechet import feature_statistics
from lowbitdm_cli.evaluation.intervals import (
    LEVEL,
    frechet_interval,
    inception_score_replicates,
    kid_replicates,
    recentred_interval,
    wilson_interval,
)
from lowbitdm_cli.evaluation.metrics import (
    frechet_distance_features,
    frechet_distance_psd,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from lowbitdm_cli.evaluation.reference import Reference

__all__ = ["INCEPTION_METRICS", "IS_SPLIT_SIZE", "KID_SUBSETS", "KID_SUBSET_SIZE", "PR_K", "intervals",
           "requirements", "score"]

INCEPTION_METRICS = ("fid", "sfid", "is", "precision", "recall", "kid")
IS_SPLIT_SIZE = 5000
PR_K = 3
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
_FRECHET = {"fid": "pool", "sfid": "spatial"}


def requirements(metrics: list[str]) -> tuple[frozenset[str], set[str], set[str]]:
    """(extractor outputs for the samples, reference statistics, reference features) that `metrics` need."""
    sample: set[str] = set()
    ref_stats: set[str] = set()
    ref_feats: set[str] = set()
    for m in metrics:
        if m in _FRECHET:
            sample.add(_FRECHET[m])
            ref_stats.add(_FRECHET[m])
        elif m == "is":
            sample.add("probs")
        elif m in ("precision", "recall", "kid"):
            sample.add("pool")
            ref_feats.add("pool")
        else:
            raise EvaluationError(f"unknown Inception metric {m!r}: use {', '.join(INCEPTION_METRICS)}")
    return frozenset(sample), ref_stats, ref_feats


def score(sample: dict[str, np.ndarray], reference: Reference | None, metrics: list[str], device: str = "cpu"
          ) -> tuple[dict[str, float], dict[str, Any]]:
    """Metric values and the settings/side results a manifest should record."""
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    n = len(next(iter(sample.values())))
    for m in (m for m in metrics if m in _FRECHET):
        q = _FRECHET[m]
        if n < 2:
            raise EvaluationError(f"{m} needs at least 2 samples, got {n}")
        if reference.stats_from[q] != "file" and q in reference.features:
            values[m] = frechet_distance_features(sample[q], reference.features[q])
        else:
            values[m] = frechet_distance_psd(*feature_statistics(sample[q]), *reference.stats[q])
    if "is" in metrics:
        values["is"], details["is_std"] = inception_score(sample["probs"], IS_SPLIT_SIZE)
        details["is_split_size"] = IS_SPLIT_SIZE
    if {"precision", "recall"} & set(metrics):
        ref = reference.features["pool"]
        if min(n, len(ref)) <= PR_K:
            raise EvaluationError(f"precision/recall with k = {PR_K} need more than {PR_K} samples and reference "
                                  f"images, got {n} and {len(ref)}")
        precision, recall = precision_recall(ref, sample["pool"], k=PR_K, device=device)
        values.update({k: v for k, v in (("precision", precision), ("recall", recall)) if k in metrics})
        details["precision_recall_k"] = PR_K
    if "kid" in metrics:
        ref = reference.features["pool"]
        if min(n, len(ref)) < 2:
            raise EvaluationError(f"kid needs at least 2 samples and 2 reference images, got {n} and {len(ref)}")
        values["kid"] = kernel_inception_distance(ref, sample["pool"], KID_SUBSETS, KID_SUBSET_SIZE)
        details.update(kid_subsets=KID_SUBSETS, kid_subset_size=min(n, len(ref), KID_SUBSET_SIZE))
    return values, details


def intervals(sample: dict[str, np.ndarray], reference: Reference | None, values: dict[str, float],
              resamples: int, seed: int, level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """95 % intervals (`MetricInterval` fields) of the Inception metrics in `values`
    (see `lowbitdm_cli.evaluation.intervals`): a bootstrap over the samples' features with the
    reference fixed for FID, sFID (double bootstrap), KID and IS (none when `resamples` < 2), Wilson for
    precision.
    Recall gets none (its k-NN radii on the samples do not survive resampling)."""
    out: dict[str, dict[str, Any]] = {}
    boot = {"method": "bootstrap", "level": level, "resamples": resamples, "seed": seed}
    n = len(next(iter(sample.values())))
    if resamples >= 2:
        for m in (m for m in values if m in _FRECHET):
            q = _FRECHET[m]
            out[m] = frechet_interval(values[m], sample[q], *reference.stats[q], resamples, seed, level)
        if "is" in values:
            reps = inception_score_replicates(sample["probs"], IS_SPLIT_SIZE, resamples, seed)
            out["is"] = dict(zip(("low", "high"), recentred_interval(values["is"], reps, level)), **boot)
        if "kid" in values:
            reps, scale = kid_replicates(sample["pool"], reference.features["pool"], resamples, seed)
            lo, hi = recentred_interval(0.0, reps, level)
            out["kid"] = {"low": values["kid"] + scale * lo, "high": values["kid"] + scale * hi, **boot}
    if "precision" in values:
        k = round(values["precision"] * n)
        out["precision"] = dict(zip(("low", "high"), wilson_interval(k, n, level)), method="wilson", level=level)
    return out
