"""Stage `evaluate`: a sample artifact → metrics.

FID-digits and class accuracy (the embedded models' `digits-features` evaluator), and the
Inception metrics of the ADM suite for any model: FID, sFID, IS, precision/recall (k = 3), KID,
against a reference set (see `lowbitdm_cli.evaluation.reference`). The manifest records the
Inception backend, its mode, the weights' sha256, the sample count and the reference.
Text-to-image samples are scored by CLIP score (`evaluation.clip_score`) against their
prompts, with a local CLIP model.

Every metric but recall gets a 95 % interval in the manifest's `intervals` (same key as in
`metrics`): a seeded bootstrap over the samples' features with the reference fixed (a double
bootstrap for FID-digits, FID and sFID; KID, IS; `bootstrap` resamples, 0 for none), Wilson for
class accuracy and precision,
a normal interval of the mean for CLIP score. What they cover: `lowbitdm_cli.evaluation.intervals`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbitdm_cli.artifacts import Artifact, MetricInterval, StageRun
from lowbitdm_cli.errors import EvaluationError
from lowbitdm_cli.evaluation.frechet import feature_statistics
from lowbitdm_cli.evaluation.intervals import DEFAULT_RESAMPLES, DEFAULT_SEED, LEVEL, mean_interval
from lowbitdm_cli.evaluation.suite import INCEPTION_METRICS, requirements, score
from lowbitdm_cli.evaluation.suite import intervals as inception_intervals
from lowbitdm_cli.models.registry import MODELS, evaluator_of
from lowbitdm_cli.npz import read_npz

__all__ = ["CLIP_METRICS", "DIGITS_METRICS", "INCEPTION_METRICS", "InceptionOptions", "default_metrics", "evaluate",
           "plan_metrics"]

DIGITS_METRICS = ("fid_digits", "class_accuracy")
CLIP_METRICS = ("clip_score",)
PAPER_METRICS = ["fid", "sfid", "is", "precision", "recall"]


@dataclass(frozen=True)
class InceptionOptions:
    """How Inception metrics are computed: backend and mode, local weights, reference, device."""

    backend: str = "pytorch-fid"
    mode: str | None = None  # the backend's default
    weights: str | Path | None = None  # None: $LOWBITDM_INCEPTION_WEIGHTS / $LOWBITDM_CLEANFID_WEIGHTS / cache
    reference: str | Path | None = None  # None: digits-train for the embedded models
    ref_stats: str = "auto"
    batch_size: int = 50
    device: str = "auto"


def _evaluator(model_name: str) -> str:
    if model_name in MODELS:
        return MODELS[model_name].evaluator
    # a folder path or a hub repository (owner/repo); other names are the embedded stand-ins of tests
    return evaluator_of(model_name) if Path(model_name).exists() or "/" in model_name else "digits-features"


def default_metrics(model_name: str) -> list[str]:
    """FID-digits and class accuracy for the embedded models, CLIP score for text-to-image models,
    the papers' Inception metrics for the others."""
    evaluator = _evaluator(model_name)
    if evaluator == "digits-features":
        return list(DIGITS_METRICS)
    return list(CLIP_METRICS) if evaluator == "clip" else list(PAPER_METRICS)


def _skip_reason(metric: str, evaluator: str, inception: InceptionOptions, clip_weights: str | Path | None,
                 prompts: list[str] | None) -> str | None:
    """Why `metric` cannot be computed with what was given (None: it can)."""
    import os

    from lowbitdm_cli.errors import WeightsNotFoundError
    from lowbitdm_cli.evaluation.clip_score import CLIP_ENV
    from lowbitdm_cli.evaluation.inception import resolve_weights

    if metric in DIGITS_METRICS and evaluator != "digits-features":
        return "the digits evaluator scores the embedded models only"
    if metric in INCEPTION_METRICS:
        try:
            resolve_weights(inception.backend, inception.weights)
        except WeightsNotFoundError:
            return "no Inception weights (--inception-weights or $LOWBITDM_INCEPTION_WEIGHTS)"
        if metric != "is" and inception.reference is None and evaluator != "digits-features":
            return "no reference (--ref: an image folder or reference .npz)"
    if metric in CLIP_METRICS:
        if not (clip_weights or os.environ.get(CLIP_ENV)):
            return "no CLIP weights (--clip-weights or $LOWBITDM_CLIP_WEIGHTS)"
        if not prompts:
            return "no prompts (--prompts)"
    return None


def plan_metrics(model_name: str, wanted: list[str] | None, inception: InceptionOptions | None = None,
                 clip_weights: str | Path | None = None, prompts: list[str] | None = None
                 ) -> tuple[list[str], dict[str, str]]:
    """(the metrics that can be computed with what was given, {metric: why it is skipped}) of `wanted`
    (default: `default_metrics`). Unknown names are kept, for `evaluate` to refuse."""
    evaluator = _evaluator(model_name)
    keep, skipped = [], {}
    for m in wanted or default_metrics(model_name):
        reason = _skip_reason(m, evaluator, inception or InceptionOptions(), clip_weights, prompts)
        if reason is None:
            keep.append(m)
        else:
            skipped[m] = reason
    return keep, skipped


def evaluate(samples: Artifact, metrics: list[str], out: Path, force: bool = False, replace_stale: bool = False,
             inception: InceptionOptions | None = None, clip_weights: str | Path | None = None,
             progress: Callable[[str, int, int], None] = lambda *_: None,
             bootstrap: int = DEFAULT_RESAMPLES, bootstrap_seed: int = DEFAULT_SEED) -> Artifact:
    """Score the images of `samples`; metrics land in the manifest's `metrics`, their 95 % intervals
    in its `intervals` (`bootstrap`: resamples for the bootstrap intervals, 0 for none)."""
    from lowbitdm_cli.evaluation.inception import extract_features, open_extractor
    from lowbitdm_cli.evaluation.reference import DIGITS_TRAIN, load_reference, open_reference

    model_name = samples.manifest.model.name
    evaluator = _evaluator(model_name)
    if bootstrap < 0 or bootstrap == 1:
        raise EvaluationError(f"bootstrap resamples must be 0 (no bootstrap intervals) or at least 2, got {bootstrap}")
    if not metrics:
        raise EvaluationError("no metric given: use fid, sfid, is, precision, recall, kid or fid_digits, "
                              "class_accuracy")
    unknown = [m for m in metrics if m not in DIGITS_METRICS + INCEPTION_METRICS + CLIP_METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: use "
                              f"{', '.join(INCEPTION_METRICS)} (Inception), {', '.join(DIGITS_METRICS)} "
                              f"(embedded models) or clip_score (text-to-image)")
    digits_metrics = [m for m in metrics if m in DIGITS_METRICS]
    inception_metrics = [m for m in metrics if m in INCEPTION_METRICS]
    if digits_metrics and evaluator != "digits-features":
        raise EvaluationError(f"{', '.join(digits_metrics)} use the digits-features evaluator of the embedded models; "
                              f"{model_name!r} is scored with {', '.join(INCEPTION_METRICS)}")
    options: dict = {"metrics": sorted(metrics), "intervals": {"level": LEVEL, "resamples": bootstrap,
                                                               "seed": bootstrap_seed}}
    clip = None
    if "clip_score" in metrics:
        from lowbitdm_cli.evaluation.clip_score import open_clip
        from lowbitdm_cli.models.text import prompts_digest
        from lowbitdm_cli.stages.common import recipe_prompts

        prompts = recipe_prompts(samples.manifest.recipe)
        if not prompts:
            raise EvaluationError(f"clip_score scores text-to-image samples against their prompts: {samples.path} "
                                  f"was sampled without prompts (model.prompts)")
        recorded = samples.manifest.info.get("prompts_sha256")
        if recorded and recorded != prompts_digest(prompts):
            raise EvaluationError(f"{samples.path}: the prompt file {samples.manifest.recipe['model'].get('prompts')} "
                                  f"changed since sampling (sha256 differs): restore it to score the samples")
        clip = open_clip(clip_weights, (inception or InceptionOptions()).device)
        options["clip"] = clip.identity()
    if inception_metrics:
        opts = inception or InceptionOptions()
        extractor = open_extractor(opts.backend, opts.mode, opts.weights, opts.device)
        want, stats_needed, feats_needed = requirements(inception_metrics)
        if want - extractor.provides:
            raise EvaluationError(f"{', '.join(m for m in inception_metrics if m == 'sfid')} needs the spatial "
                                  f"mixed_6/conv features, which only the pytorch-fid backend gives")
        ref_in = None
        if stats_needed or feats_needed:
            spec = opts.reference or (DIGITS_TRAIN if evaluator == "digits-features" else None)
            if spec is None:
                raise EvaluationError(f"{', '.join(m for m in inception_metrics if m != 'is')} need a reference: pass "
                                      f"--ref (an image folder, an .npz of images or statistics such as ADM's "
                                      f"VIRTUAL_imagenet256_labeled.npz, or a --make-ref file)")
            ref_in = open_reference(spec)
        options["inception"] = {**extractor.identity(), "ref_stats": opts.ref_stats,
                                "reference": ref_in.describe()["sha256"] if ref_in else None}
    run = StageRun.start(out, "evaluate", samples.manifest.model, samples.manifest.recipe, parent=samples,
                         options=options, resume=False, force=force,
                         replace_stale=replace_stale,
                         recipe_sections=("evaluate",))
    if run.done:
        return run.artifact  # type: ignore[return-value]
    files: list[str] = []
    values: dict[str, float] = {}
    intervals: dict[str, dict] = {}
    info: dict = {"evaluator": "+".join(e for e, ms in (("digits-features", digits_metrics),
                                                        ("inception", inception_metrics),
                                                        ("clip", clip is not None)) if ms)}
    if clip is not None:
        values["clip_score"], info["clip"], interval = _clip_score(samples, clip, prompts, progress)
        if interval is not None:
            intervals["clip_score"] = interval
    if digits_metrics:
        from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator

        data = read_npz(samples.file("samples.npz"))
        labels = torch.from_numpy(data["labels"]) if "labels" in data else None
        ev = DigitsEvaluator()
        progress("bootstrap intervals", 0, 1)
        result, found, mu, sigma = ev.evaluate_with_intervals(torch.from_numpy(data["arr_0"]), labels, bootstrap,
                                                              bootstrap_seed)
        progress("bootstrap intervals", 1, 1)
        intervals.update({m: found[m] for m in digits_metrics if m in found})
        run.save_tensors("stats.safetensors", {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)})
        files.append("stats.safetensors")
        values.update({m: result[m] for m in digits_metrics if m in result})
        info.update(num_images=len(data["arr_0"]), reference="digits train split (shipped statistics)")
    if inception_metrics:
        from lowbitdm_cli.evaluation.images import NpzImages

        images = NpzImages(samples.file("samples.npz"))
        feats = extract_features(extractor, images, want, opts.batch_size, progress, "inception features (samples)")
        reference = None
        if ref_in is not None:
            reference = load_reference(ref_in, extractor, stats_needed, feats_needed, opts.ref_stats, opts.batch_size,
                                       progress)
        scores, details = score(feats, reference, inception_metrics, device=extractor.device)
        values.update(scores)
        progress("bootstrap intervals", 0, 1)
        intervals.update(inception_intervals(feats, reference, scores, bootstrap, bootstrap_seed))
        progress("bootstrap intervals", 1, 1)
        stats = {}
        for q, (mu_key, sigma_key) in (("pool", ("mu", "sigma")), ("spatial", ("mu_s", "sigma_s"))):
            if q in feats and len(feats[q]) >= 2:
                mu, sigma = feature_statistics(feats[q])
                stats[mu_key], stats[sigma_key] = torch.from_numpy(mu), torch.from_numpy(sigma)
        if stats:
            run.save_tensors("inception_stats.safetensors", stats)
            files.append("inception_stats.safetensors")
        info["num_images"] = images.num_images
        info["inception"] = {**extractor.info(), "num_samples": images.num_images,
                             "reference": reference.description if reference else None, **details}
    missing = sorted(set(values) - set(intervals))
    if missing:
        info["no_interval"] = {m: ("no interval: its k-NN radii on the samples do not survive resampling"
                                   if m == "recall" else "bootstrap off (0 resamples)") for m in missing}
    return run.commit(files, metrics=values, info=info,
                      intervals={k: MetricInterval(**v) for k, v in intervals.items()})


def _clip_score(samples: Artifact, clip, prompts: list[str], progress: Callable[[str, int, int], None],  # noqa: ANN001
                batch_size: int = 50) -> tuple[float, dict]:
    """Mean CLIP score of the samples, each against the prompt its label indexes."""
    from lowbitdm_cli.evaluation.images import NpzImages
    from lowbitdm_cli.npz import npz_shapes

    if "labels" not in npz_shapes(samples.file("samples.npz")):
        raise EvaluationError(f"{samples.path}/samples.npz has no labels (prompt indices) to score against")
    labels = read_npz(samples.file("samples.npz"), keys=["labels"])["labels"].tolist()
    images = NpzImages(samples.file("samples.npz"))
    if max(labels) >= len(prompts):
        raise EvaluationError(f"{samples.path}: prompt index {max(labels)} is outside the {len(prompts)} prompts of "
                              f"model.prompts: the prompt file changed since sampling")

    def batches():  # noqa: ANN202
        start = 0
        for block in images.batches(batch_size):
            yield np.stack(block), [prompts[i] for i in labels[start:start + len(block)]]
            start += len(block)

    per_image = clip.scores(batches(), progress=lambda n: progress("clip score", n, images.num_images))
    interval = None
    if len(per_image) >= 2:
        low, high = mean_interval(np.asarray(per_image, dtype=np.float64))
        interval = {"low": low, "high": high, "level": LEVEL, "method": "normal"}
    return float(per_image.mean()), {**clip.identity(), "num_images": images.num_images,
                                     "std": float(per_image.std())}, interval
