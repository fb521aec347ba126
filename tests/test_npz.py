"""`.npz` files: chunked writes give the bytes of whole-array writes; rows stream back without loading all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lowbitdm_cli.npz import ChunkedArray, iter_npz_rows, npz_shapes, read_npz, write_npz


def test_chunked_write_equals_whole_write(tmp_path: Path) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (11, 5, 4, 3), dtype=np.uint8)
    labels = np.arange(11)
    write_npz(tmp_path / "whole.npz", {"arr_0": imgs, "labels": labels})
    chunked = ChunkedArray(imgs.shape, imgs.dtype, lambda: (imgs[i:i + 4] for i in range(0, 11, 4)))
    write_npz(tmp_path / "chunked.npz", {"arr_0": chunked, "labels": labels})
    assert (tmp_path / "chunked.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    back = read_npz(tmp_path / "chunked.npz")
    assert np.array_equal(back["arr_0"], imgs) and np.array_equal(back["labels"], labels)
    assert read_npz(tmp_path / "chunked.npz", ["labels"]).keys() == {"labels"}


def test_chunks_must_fit(tmp_path: Path) -> None:
    imgs = np.zeros((4, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="expected 4"):
        write_npz(tmp_path / "x.npz", {"arr_0": ChunkedArray(imgs.shape, imgs.dtype, lambda: [imgs[:3]])})
    with pytest.raises(ValueError, match="does not fit"):
        write_npz(tmp_path / "x.npz", {"arr_0": ChunkedArray(imgs.shape, imgs.dtype, lambda: [imgs.astype(np.int16)])})


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_rows_stream_back(tmp_path: Path, compressed: bool) -> None:
    imgs = np.random.default_rng(1).integers(0, 256, (7, 3, 3, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    if compressed:
        np.savez_compressed(path, arr_0=imgs, mu=np.zeros(4))
    else:
        write_npz(path, {"arr_0": imgs, "mu": np.zeros(4)})
    assert npz_shapes(path) == {"arr_0": ((7, 3, 3, 3), np.dtype(np.uint8)), "mu": ((4,), np.dtype(np.float64))}
    blocks = list(iter_npz_rows(path, "arr_0", 3))
    assert [len(b) for b in blocks] == [3, 3, 1]
    assert np.array_equal(np.concatenate(blocks), imgs)
    with pytest.raises(KeyError, match="no array 'nope'"):
        list(iter_npz_rows(path, "nope", 3))
