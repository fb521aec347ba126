"""Byte-reproducible `.npz` files (numpy's own `savez` stamps the current time into the zip).

Large arrays (50,000 ImageNet samples are ~10 GB) are written from chunks and read back in
batches of rows, so neither side needs the whole array in memory.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ChunkedArray", "iter_npz_rows", "npz_shapes", "read_npz", "write_npz"]

_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ChunkedArray:
    """An array given as consecutive blocks of rows: `chunks()` yields C-ordered arrays whose
    concatenation along axis 0 has `shape` and `dtype` (checked while writing)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterable[np.ndarray]]


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def write_npz(path: Path, arrays: dict[str, np.ndarray | ChunkedArray]) -> None:
    """Write arrays like `np.savez`, with fixed timestamps so equal arrays give equal bytes.

    A `ChunkedArray` is streamed into the file; the bytes equal those of the whole array.
    """
    tmp = Path(str(path) + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            if not isinstance(arr, ChunkedArray):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                zf.writestr(info, buf.getvalue())
                continue
            dtype = np.dtype(arr.dtype)
            header = _header(arr.shape, dtype)
            # ZipFile.writestr sets file_size before opening the entry; doing the same keeps the bytes
            # identical to writing the concatenated array (and picks zip64 for entries over 2 GiB)
            info.file_size = len(header) + int(np.prod(arr.shape, dtype=np.int64)) * dtype.itemsize
            rows = 0
            with zf.open(info, mode="w") as dest:
                dest.write(header)
                for chunk in arr.chunks():
                    chunk = np.asarray(chunk)
                    if chunk.dtype != dtype or chunk.shape[1:] != tuple(arr.shape[1:]):
                        raise ValueError(f"{name}: chunk {chunk.dtype}{list(chunk.shape)} does not fit "
                                         f"{dtype}{list(arr.shape)}")
                    dest.write(np.ascontiguousarray(chunk).tobytes())
                    rows += chunk.shape[0]
            if rows != arr.shape[0]:
                raise ValueError(f"{name}: chunks gave {rows} rows, expected {arr.shape[0]}")
    tmp.replace(path)


def read_npz(path: Path, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read an `.npz` (all arrays, or only `keys`) without ever unpickling."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in (data.files if keys is None else keys)}


def _open_member(zf: zipfile.ZipFile, key: str):  # noqa: ANN202 - a readable zip member
    try:
        return zf.open(f"{key}.npy")
    except KeyError:
        raise KeyError(f"no array {key!r}") from None


def npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an `.npz`, from the headers only."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".npy"):
                with zf.open(name) as f:
                    out[name[:-4]] = _read_header(f)[:2]
    return out


def _read_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:  # noqa: ANN001
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would need unpickling)")
    return tuple(shape), dtype, fortran


def iter_npz_rows(path: Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Yield the rows of array `key` of an `.npz` in blocks of `batch_size`, reading only those bytes."""
    with zipfile.ZipFile(path) as zf, _open_member(zf, key) as f:
        shape, dtype, fortran = _read_header(f)
        if fortran and len(shape) > 1:
            raise ValueError(f"{key} is stored in Fortran order; rows cannot be streamed")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0] if shape else 0, batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise ValueError(f"{path}: array {key} ends early (truncated file)")
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape((n, *row_shape))
