"""Byte-reproducible `.npz` files (numpy's own `savez` stamps the current time into the zip)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["read_npz", "write_npz"]

_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays like `np.savez`, with fixed timestamps so equal arrays give equal bytes."""
    tmp = Path(str(path) + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), buf.getvalue())
    tmp.replace(path)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read an `.npz` without ever unpickling."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
