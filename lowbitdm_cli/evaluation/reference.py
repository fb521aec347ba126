"""Reference sets for Inception metrics: image folders, `.npz` files, sample artifacts, statistics.

A reference is given as one of:

- an image folder (searched recursively), an `.npz` with images in `arr_0` (uint8 NHWC), a
  sample artifact folder (its `samples.npz`), or ``digits-train`` (the embedded model's
  training split, 1497 images);
- an `.npz` of statistics: `mu`/`sigma` (pytorch-fid, clean-fid), optionally `mu_s`/`sigma_s`
  (sFID) and `feats` (pool features, as clean-fid's KID statistics);
- the ADM layout (`VIRTUAL_imagenet256_labeled.npz`): `arr_0` images plus `mu`, `sigma`,
  `mu_s`, `sigma_s` computed by ADM's TF Inception;
- a file written by ``lowbitdm evaluate --make-ref``: `mu`, `sigma`, `mu_s`, `sigma_s`, `feats`
  and `lowbitdm_meta` (JSON: the extractor that made it, the source, the count).

Where the reference statistics come from (``ref_stats``): ``file`` uses the file's `mu`/`sigma`
(and `mu_s`/`sigma_s`, `feats`) where present, as ADM's evaluator does; ``images`` recomputes
everything from the reference images with the samples' extractor; ``auto`` (the default) takes a
`--make-ref` file made by the same extractor as it is (pool statistics from its stored
features), recomputes when the file also holds images (so both sides come from one network and
one resize), and otherwise uses the file.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lowbitdm_cli.artifacts import MANIFEST, Artifact, sha256_file
from lowbitdm_cli.errors import EvaluationError
from lowbitdm_cli.evaluation.frechet import feature_statistics
from lowbitdm_cli.evaluation.images import ArrayImages, FolderImages, ImageSource, NpzImages
from lowbitdm_cli.evaluation.inception import FeatureExtractor, extract_features
from lowbitdm_cli.npz import npz_shapes, read_npz, write_npz

__all__ = ["DIGITS_TRAIN", "META_KEY", "RefStats", "Reference", "ReferenceInput", "load_reference",
           "make_reference", "open_images", "open_reference"]

DIGITS_TRAIN = "digits-train"
META_KEY = "lowbitdm_meta"
REF_FORMAT = "lowbitdm-reference"
RefStats = Literal["auto", "file", "images"]
_STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def _digits_train_images() -> ArrayImages:
    from lowbitdm_cli.models.digits import load_digits_split
    from lowbitdm_cli.sampling import to_uint8

    return ArrayImages(to_uint8(load_digits_split().train_images), kind=DIGITS_TRAIN, name=DIGITS_TRAIN)


def open_images(spec: str | Path) -> ImageSource:
    """Images from an image folder, an `.npz` (`arr_0`), a sample artifact folder or ``digits-train``."""
    ref = open_reference(spec)
    if ref.images is None:
        raise EvaluationError(f"{spec} holds statistics but no images (no arr_0)")
    return ref.images


@dataclass
class ReferenceInput:
    """What a `--ref` names, before any features are computed."""

    kind: str  # folder | npz | samples | digits-train
    path: str
    images: ImageSource | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # an .npz's non-image arrays
    meta: dict[str, Any] | None = None  # a --make-ref file's own description
    _description: dict[str, Any] | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """Kind, path, content sha256 and image count (hashing reads the whole set once; cached)."""
        if self._description is None:
            if self.images is not None and self.kind != "npz":
                desc = {**self.images.describe(), "kind": self.kind}
            else:
                desc = {"kind": self.kind, "path": self.path, "sha256": sha256_file(Path(self.path)),
                        "num_images": self.images.num_images if self.images is not None else None}
            if self.meta is not None:
                desc["made_by"] = self.meta
            self._description = desc
        return self._description


def open_reference(spec: str | Path) -> ReferenceInput:
    """Resolve a reference spec (see the module docstring) without reading image contents."""
    text = str(spec)
    path = Path(text).expanduser()
    if text == DIGITS_TRAIN and not path.exists():
        return ReferenceInput(DIGITS_TRAIN, DIGITS_TRAIN, _digits_train_images())
    if path.is_dir():
        if (path / MANIFEST).is_file():
            art = Artifact.open(path, ("sample",))
            return ReferenceInput("samples", str(path), NpzImages(art.file("samples.npz")))
        return ReferenceInput("folder", str(path), FolderImages(path))
    if not path.is_file():
        raise EvaluationError(f"reference {text!r} does not exist: give an image folder, an .npz (images in arr_0, "
                              f"or mu/sigma statistics), a sample artifact folder, or {DIGITS_TRAIN!r}")
    try:
        shapes = npz_shapes(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"reference {path} is not a readable .npz ({type(e).__name__}: {e})") from None
    images = NpzImages(path) if "arr_0" in shapes else None
    arrays = read_npz(path, [k for k in shapes if k != "arr_0"])
    meta = None
    if META_KEY in arrays:
        try:
            meta = json.loads(str(arrays.pop(META_KEY).reshape(-1)[0]))
        except (json.JSONDecodeError, IndexError):
            raise EvaluationError(f"{path}: {META_KEY} is not valid JSON (the file was damaged)") from None
    if images is None and not any(k in arrays for k in ("mu", "mu_s", "feats")):
        raise EvaluationError(f"{path} holds neither images (arr_0) nor statistics (mu/sigma, mu_s/sigma_s, feats); "
                              f"it has {', '.join(sorted(shapes)) or 'nothing'}")
    return ReferenceInput("npz", str(path), images, arrays, meta)


@dataclass
class Reference:
    """Reference statistics and features for the Inception metrics, and where each came from."""

    description: dict[str, Any]
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # pool / spatial → (mu, sigma)
    features: dict[str, np.ndarray]  # pool / spatial features, when known
    stats_from: dict[str, str]  # pool / spatial → "file" (its mu/sigma), "features" (its feats) or "images"


def _file_stats(ref: ReferenceInput, quantity: str) -> tuple[np.ndarray, np.ndarray] | None:
    mu_key, sigma_key = _STAT_KEYS[quantity]
    if mu_key in ref.arrays and sigma_key in ref.arrays:
        mu, sigma = ref.arrays[mu_key].astype(np.float64), ref.arrays[sigma_key].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise EvaluationError(f"{ref.path}: {mu_key} {list(mu.shape)} and {sigma_key} {list(sigma.shape)} are "
                                  f"not a mean and a covariance of one size")
        return mu, sigma
    return None


def load_reference(ref: ReferenceInput, extractor: FeatureExtractor, stats_needed: set[str], feats_needed: set[str],
                   ref_stats: RefStats = "auto", batch_size: int = 50,
                   progress: Callable[[str, int, int], None] = lambda *_: None) -> Reference:
    """Statistics for `stats_needed` and features for `feats_needed` (each a subset of pool, spatial).

    Computes reference features with `extractor` only where the file does not supply them
    (see the module docstring for `ref_stats`).
    """
    if ref_stats not in ("auto", "file", "images"):
        raise EvaluationError(f"ref_stats must be auto, file or images, got {ref_stats!r}")
    own, same = ref.meta is not None, ref.meta is not None and ref.meta.get("extractor") == extractor.identity()
    if own and not same and (ref.images is None or ref_stats == "file"):
        made = ref.meta.get("extractor", {})
        raise EvaluationError(
            f"{ref.path} was made by the {made.get('backend')} backend ({made.get('mode')}, weights sha256 "
            f"{str(made.get('weights_sha256'))[:12]}…), not by this one ({extractor.backend}, {extractor.mode}, "
            f"{extractor.weights_sha256[:12]}…): remake it with `lowbitdm evaluate --make-ref` and these weights")
    if ref_stats == "images" and ref.images is None:
        raise EvaluationError(f"--ref-stats images needs reference images, and {ref.path} holds none (no arr_0)")
    use_file = ref_stats == "file" or (ref_stats == "auto" and (same or ref.images is None))
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    features: dict[str, np.ndarray] = {}
    stats_from: dict[str, str] = {}
    if use_file:
        if "feats" in ref.arrays and "pool" in feats_needed | stats_needed:
            feats = ref.arrays["feats"]
            if feats.ndim != 2 or feats.shape[1] != 2048:
                raise EvaluationError(f"{ref.path}: feats {list(feats.shape)} are not pool features [N, 2048]")
            features["pool"] = feats
        for q in sorted(stats_needed):
            if same and q in features:
                continue  # a --make-ref file's mu/sigma were computed from these very features
            found = _file_stats(ref, q)
            if found is not None:
                stats[q], stats_from[q] = found, "file"
    compute = (feats_needed - set(features)) | (stats_needed - set(stats) - set(features))
    if compute:
        if ref.images is None:
            what = ", ".join(f"{q} {'features' if q in feats_needed else 'statistics'}" for q in sorted(compute))
            raise EvaluationError(f"{ref.path} has no images (arr_0) and no {what}: precision, recall and KID need "
                                  f"reference images or a --make-ref file; sFID needs mu_s/sigma_s")
        features.update(extract_features(extractor, ref.images, frozenset(compute), batch_size, progress,
                                         label="inception features (reference)"))
    for q in sorted(stats_needed - set(stats)):
        if len(features[q]) < 2:
            raise EvaluationError(f"reference {ref.path} has {len(features[q])} images: statistics need at least 2")
        stats[q], stats_from[q] = feature_statistics(features[q]), "images" if q in compute else "features"
    for q, (mu, _) in stats.items():
        expected = 2048 if q == "pool" else 7 * 17 * 17
        if len(mu) != expected:
            raise EvaluationError(f"{ref.path}: {_STAT_KEYS[q][0]} has {len(mu)} dimensions, Inception {q} "
                                  f"features have {expected}")
    description = {**ref.describe(), "statistics": stats_from, "features": sorted(features), "ref_stats": ref_stats}
    return Reference(description, stats, features, stats_from)


def make_reference(spec: str | Path, extractor: FeatureExtractor, out: Path, batch_size: int = 50, force: bool = False,
                   progress: Callable[[str, int, int], None] = lambda *_: None) -> dict[str, Any]:
    """Write reference statistics for the images of `spec` into `out` (.npz; see the module docstring)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise EvaluationError(f"--make-ref writes an .npz file; got --out {out}")
    if out.exists() and not force:
        raise EvaluationError(f"{out} already exists: pass --force to replace it")
    ref = open_reference(spec)
    if ref.images is None:
        raise EvaluationError(f"{spec} holds no images (arr_0) to make reference statistics from")
    want = frozenset({"pool", "spatial"} & extractor.provides)
    feats = extract_features(extractor, ref.images, want, batch_size, progress, label="inception features (reference)")
    if len(feats["pool"]) < 2:
        raise EvaluationError(f"{spec} has {len(feats['pool'])} images: reference statistics need at least 2")
    meta = {"format": REF_FORMAT, "version": 1, "extractor": extractor.identity(), "source": ref.describe(),
            "num_images": len(feats["pool"])}
    arrays: dict[str, np.ndarray] = {}
    for q in sorted(want):
        mu, sigma = feature_statistics(feats[q])
        arrays[_STAT_KEYS[q][0]], arrays[_STAT_KEYS[q][1]] = mu, sigma
    arrays["feats"] = feats["pool"].astype(np.float32)
    arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out, arrays)
    return {"path": str(out), "sha256": sha256_file(out), **meta}
