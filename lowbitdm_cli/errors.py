"""Typed errors the user can cause. `cli.py` turns them into one-line messages and exit code 2."""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "ArtifactError",
    "EvaluationError",
    "IntegrityError",
    "LowbitError",
    "ManifestError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NonFiniteError",
    "RecipeError",
    "RuntimeUnavailableError",
    "StageOrderError",
    "WeightsNotFoundError",
]


class LowbitError(Exception):
    """Base class: an expected failure with a message that says what to do next."""


class RecipeError(LowbitError):
    """A recipe file, `--bits`, `--set` or another option is invalid."""


class ModelNotFoundError(LowbitError):
    """A model name or path cannot be resolved (unknown, or needs a download)."""


class ModelFormatError(ModelNotFoundError):
    """A model folder or checkpoint exists but is not in a supported form (pipeline kind, prediction type)."""


class ArtifactError(LowbitError):
    """An artifact folder is missing, partial, or otherwise unusable."""


class ManifestError(ArtifactError):
    """A manifest is unreadable, invalid, or from a newer schema."""


class IntegrityError(ArtifactError):
    """A file in an artifact does not match the hash or size its manifest records."""


class StageOrderError(ArtifactError):
    """A stage was given a parent artifact of the wrong stage."""


class NonFiniteError(LowbitError):
    """NaN or inf appeared in a loss or a model output."""


class EvaluationError(LowbitError):
    """A metric, reference set or feature-extractor setting is invalid or unavailable."""


class WeightsNotFoundError(EvaluationError):
    """Feature-extractor weights (Inception) are not on this machine; the message says where to get them."""


class AdapterError(LowbitError):
    """A LoRA adapter file is unreadable or does not fit the model (keys that match no layer, shapes)."""


class RuntimeUnavailableError(LowbitError):
    """A runtime cannot run this model here (a missing package, kernels this CPU lacks, layers it cannot express)."""
