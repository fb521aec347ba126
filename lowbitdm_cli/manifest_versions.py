"""Manifest schema versions and the explicit migrations between them.

An artifact keeps the manifest it was written with (its bytes, hence its sha256 that children
record, never change); opening it migrates the parsed dict step by step to `SCHEMA_VERSION`,
after its digest was checked as written. A version newer than `SCHEMA_VERSION` is refused.

- 1 → 2: the manifest records ``quantization`` (`quant.config.QuantizationRecord`): the format its
  quantized model is stored in (calibrate and finetune: ``fake-quant``; merge: ``pack-quantized``;
  none for sample and evaluate) and the quantization schema version of its records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["SCHEMA_VERSION", "STAGE_FORMAT", "migrate_manifest"]

SCHEMA_VERSION = 2
# the format a stage stores its quantized model in (`quant.config.FORMATS`)
STAGE_FORMAT = {"calibrate": "fake-quant", "finetune": "fake-quant", "merge": "pack-quantized"}


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    fmt = STAGE_FORMAT.get(data.get("stage"))
    # version-1 records are quantization schema 1 (quantization_config.json "format_version": 1)
    return {**data, "schema_version": 2, "quantization": {"format": fmt, "config_version": 1} if fmt else None}


# MIGRATIONS[v] turns a version-v manifest dict into a version-(v+1) one
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a parsed manifest of version <= SCHEMA_VERSION) as a current-version dict.
    ValueError for a version that is not a positive integer or is newer than this lowbitdm reads."""
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"schema_version {version!r} is not a version")
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this lowbitdm reads (up to {SCHEMA_VERSION})")
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return data
