"""Image sets for evaluation, read in batches: an `.npz` (ADM layout `arr_0`), a folder, an array.

Every source yields lists of uint8 HWC images (1, 3 or 4 channels as stored); the feature
extractor makes them RGB. Large `.npz` files are streamed, never loaded whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lowbitdm_cli.artifacts import sha256_file
from lowbitdm_cli.errors import EvaluationError
from lowbitdm_cli.npz import iter_npz_rows, npz_shapes

__all__ = ["IMAGE_EXTENSIONS", "ArrayImages", "FolderImages", "ImageSource", "NpzImages", "to_rgb"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageSource(Protocol):
    """A fixed, ordered set of images."""

    num_images: int

    def describe(self) -> dict[str, Any]:
        """What the set is (kind, path, sha256 of the content, count), for manifests."""

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        """The images in order, `batch_size` at a time, as uint8 [H, W, C] arrays."""


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] → uint8 [H, W, 3] (gray repeated, alpha dropped)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise EvaluationError(f"images must be uint8, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise EvaluationError(f"images must be [H, W, C] with C in 1, 3, 4, got shape {img.shape}")
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    return img[:, :, :3]


@dataclass
class ArrayImages:
    """Images already in memory: uint8 [N, H, W, C]."""

    images: np.ndarray
    kind: str = "array"
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise EvaluationError(f"expected uint8 images [N, H, W, C], got {self.images.dtype} "
                                  f"{list(self.images.shape)}")
        self.num_images = len(self.images)

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()
        return {"kind": self.kind, "path": self.name, "sha256": digest, "num_images": self.num_images}

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        for start in range(0, self.num_images, batch_size):
            yield list(self.images[start:start + batch_size])


@dataclass
class NpzImages:
    """Array `key` (default `arr_0`, the ADM layout) of an `.npz`: uint8 [N, H, W, C], streamed."""

    path: Path
    key: str = "arr_0"
    _sha256: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        shapes = npz_shapes(self.path)
        if self.key not in shapes:
            raise EvaluationError(f"{self.path} holds no images (no {self.key!r} array; it has "
                                  f"{', '.join(sorted(shapes)) or 'nothing'})")
        shape, dtype = shapes[self.key]
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3, 4):
            raise EvaluationError(f"{self.path}: {self.key} must be uint8 images [N, H, W, C] (C = 1, 3 or 4), "
                                  f"got {dtype} {list(shape)}")
        self.num_images = int(shape[0])

    def describe(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return {"kind": "npz", "path": str(self.path), "sha256": self._sha256, "num_images": self.num_images}

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        for block in iter_npz_rows(self.path, self.key, batch_size):
            yield list(block)


@dataclass
class FolderImages:
    """Every image file under a folder (recursively), in sorted relative-path order."""

    path: Path
    files: list[Path] = field(init=False)
    _sha256: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.files = sorted((p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                            key=lambda p: p.relative_to(self.path).as_posix())
        if not self.files:
            raise EvaluationError(f"{self.path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.num_images = len(self.files)

    def describe(self) -> dict[str, Any]:
        if self._sha256 is None:  # names and contents, so renaming or editing a file changes it
            h = hashlib.sha256()
            for p in self.files:
                h.update(p.relative_to(self.path).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(p)))
            self._sha256 = h.hexdigest()
        return {"kind": "folder", "path": str(self.path), "sha256": self._sha256, "num_images": self.num_images}

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        from PIL import Image

        for start in range(0, self.num_images, batch_size):
            batch = []
            for p in self.files[start:start + batch_size]:
                try:
                    with Image.open(p) as img:
                        batch.append(np.array(img.convert("RGB")))
                except OSError as e:
                    raise EvaluationError(f"cannot read image {p}: {e}") from None
            yield batch
