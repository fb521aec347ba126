"""Reference sets: folders, image .npz, statistics .npz, the ADM layout, --make-ref files; where stats come from.

A cheap deterministic stand-in extractor (a fixed random projection of the image) keeps these
tests about the reference logic; the Inception network itself is tested in test_inception.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbitdm_cli.errors import EvaluationError
from lowbitdm_cli.evaluation.frechet import feature_statistics
from lowbitdm_cli.evaluation.images import FolderImages, NpzImages
from lowbitdm_cli.evaluation.inception import FeatureExtractor, extract_features
from lowbitdm_cli.evaluation.reference import META_KEY, load_reference, make_reference, open_images, open_reference
from lowbitdm_cli.npz import read_npz, write_npz

ALL = frozenset({"pool", "spatial", "probs"})


def _stub(sha: str = "a" * 64) -> FeatureExtractor:
    gen = torch.Generator().manual_seed(0)
    proj = {"pool": torch.randn(3 * 16, 2048, generator=gen), "spatial": torch.randn(3 * 16, 2023, generator=gen),
            "probs": torch.randn(3 * 16, 1008, generator=gen)}

    def run(images: list[np.ndarray], want: frozenset[str]) -> dict[str, torch.Tensor]:
        flat = torch.stack([torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(img).permute(2, 0, 1).float() / 255, 4).flatten() for img in images])
        out = {k: flat @ proj[k] for k in want}
        if "probs" in out:
            out["probs"] = torch.softmax(out["probs"].double(), dim=1)
        return out

    return FeatureExtractor("pytorch-fid", "legacy_pytorch", Path("stub.pth"), sha, "cpu", ALL, run)


def _images(n: int, seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_folder_images_sorted_recursive_mixed_sizes(tmp_path: Path) -> None:
    imgs = _images(3, seed=0)
    (tmp_path / "b").mkdir()
    Image.fromarray(imgs[0]).save(tmp_path / "a.png")
    Image.fromarray(imgs[1]).save(tmp_path / "b" / "x.png")
    Image.fromarray(imgs[2][:8, :10]).save(tmp_path / "c.PNG")  # another size, upper-case extension
    (tmp_path / "notes.txt").write_text("not an image")
    source = FolderImages(tmp_path)
    batches = list(source.batches(2))
    assert [len(b) for b in batches] == [2, 1]
    got = [img for b in batches for img in b]
    assert np.array_equal(got[0], imgs[0]) and np.array_equal(got[1], imgs[1]) and got[2].shape == (8, 10, 3)
    before = source.describe()["sha256"]
    Image.fromarray(imgs[0][::-1]).save(tmp_path / "a.png")  # same name, other content
    assert FolderImages(tmp_path).describe()["sha256"] != before
    # the stand-in extractor handles the mixed sizes batch by batch (as the real ones do)
    feats = extract_features(_stub(), FolderImages(tmp_path), frozenset({"pool"}), batch_size=3)
    assert feats["pool"].shape == (3, 2048)


def test_npz_images_stream_and_validate(tmp_path: Path) -> None:
    imgs = _images(7, seed=1)
    write_npz(tmp_path / "x.npz", {"arr_0": imgs})
    source = NpzImages(tmp_path / "x.npz")
    assert source.num_images == 7
    assert np.array_equal(np.stack([i for b in source.batches(3) for i in b]), imgs)
    write_npz(tmp_path / "bad.npz", {"arr_0": imgs.astype(np.float32)})
    with pytest.raises(EvaluationError, match="uint8 images"):
        NpzImages(tmp_path / "bad.npz")
    (tmp_path / "garbage.npz").write_bytes(b"nope")
    with pytest.raises(EvaluationError, match="not a readable .npz"):
        open_reference(tmp_path / "garbage.npz")
    write_npz(tmp_path / "empty.npz", {"labels": np.arange(3)})
    with pytest.raises(EvaluationError, match="neither images"):
        open_reference(tmp_path / "empty.npz")
    with pytest.raises(EvaluationError, match="does not exist"):
        open_reference(tmp_path / "missing.npz")


def test_digits_train_reference() -> None:
    ref = open_reference("digits-train")
    assert ref.kind == "digits-train" and ref.images.num_images == 1497
    first = next(ref.images.batches(2))
    assert first[0].dtype == np.uint8 and first[0].shape == (16, 16, 1)


def _adm_file(path: Path, imgs: np.ndarray) -> dict[str, np.ndarray]:
    """The ADM reference-batch layout, with statistics that differ from anything recomputed here."""
    rng = np.random.default_rng(9)
    arrays = {"arr_0": imgs, "mu": rng.normal(size=2048), "sigma": np.eye(2048) * 2.0,
              "mu_s": rng.normal(size=2023), "sigma_s": np.eye(2023) * 3.0}
    write_npz(path, arrays)
    return arrays


def test_adm_layout_file_or_images(tmp_path: Path) -> None:
    imgs = _images(6, seed=2)
    arrays = _adm_file(tmp_path / "VIRTUAL_test.npz", imgs)
    ref = open_reference(tmp_path / "VIRTUAL_test.npz")
    ext = _stub()

    as_adm = load_reference(ref, ext, {"pool", "spatial"}, {"pool"}, ref_stats="file")
    assert as_adm.stats_from == {"pool": "file", "spatial": "file"}
    assert np.array_equal(as_adm.stats["pool"][0], arrays["mu"]) and np.array_equal(as_adm.stats["spatial"][1],
                                                                                     arrays["sigma_s"])
    expected = extract_features(ext, NpzImages(tmp_path / "VIRTUAL_test.npz"), frozenset({"pool"}))["pool"]
    assert np.array_equal(as_adm.features["pool"], expected)  # precision/recall still need the images' features

    for mode in ("auto", "images"):  # both sides from one extractor
        recomputed = load_reference(ref, ext, {"pool", "spatial"}, set(), ref_stats=mode)
        assert recomputed.stats_from == {"pool": "images", "spatial": "images"}
        mu, sigma = feature_statistics(recomputed.features["pool"])
        # feature_statistics of the same features: the same bits
        assert np.array_equal(recomputed.stats["pool"][0], mu) and np.array_equal(recomputed.stats["pool"][1], sigma)
    assert recomputed.description["kind"] == "npz" and recomputed.description["num_images"] == 6
    assert len(recomputed.description["sha256"]) == 64


def test_statistics_only_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    write_npz(tmp_path / "stats.npz", {"mu": rng.normal(size=2048), "sigma": np.eye(2048)})
    ref = open_reference(tmp_path / "stats.npz")
    loaded = load_reference(ref, _stub(), {"pool"}, set())
    assert loaded.stats_from == {"pool": "file"} and ref.images is None
    with pytest.raises(EvaluationError, match="precision, recall and KID need reference images"):
        load_reference(ref, _stub(), {"pool"}, {"pool"})
    with pytest.raises(EvaluationError, match="sFID needs mu_s/sigma_s"):
        load_reference(ref, _stub(), {"spatial"}, set())
    with pytest.raises(EvaluationError, match="needs reference images"):
        load_reference(ref, _stub(), {"pool"}, set(), ref_stats="images")
    write_npz(tmp_path / "small.npz", {"mu": np.zeros(64), "sigma": np.eye(64)})
    with pytest.raises(EvaluationError, match="64 dimensions"):
        load_reference(open_reference(tmp_path / "small.npz"), _stub(), {"pool"}, set())


def test_make_reference_round_trip(tmp_path: Path) -> None:
    imgs = _images(5, seed=4)
    write_npz(tmp_path / "imgs.npz", {"arr_0": imgs})
    ext = _stub()
    summary = make_reference(tmp_path / "imgs.npz", ext, tmp_path / "ref.npz")
    assert summary["num_images"] == 5 and summary["extractor"] == ext.identity()
    data = read_npz(tmp_path / "ref.npz")
    assert set(data) == {"mu", "sigma", "mu_s", "sigma_s", "feats", META_KEY}
    meta = json.loads(str(data[META_KEY].reshape(-1)[0]))
    assert meta["source"]["kind"] == "npz" and meta["source"]["num_images"] == 5
    feats = extract_features(ext, NpzImages(tmp_path / "imgs.npz"), frozenset({"pool", "spatial"}))
    assert np.array_equal(data["feats"], feats["pool"])
    assert np.array_equal(data["mu_s"], feature_statistics(feats["spatial"])[0])  # same function, same features

    loaded = load_reference(open_reference(tmp_path / "ref.npz"), ext, {"pool", "spatial"}, {"pool"})
    assert loaded.stats_from == {"pool": "features", "spatial": "file"} and "pool" in loaded.features
    assert np.array_equal(loaded.stats["spatial"][1], data["sigma_s"])
    with pytest.raises(EvaluationError, match="remake it with `lowbitdm evaluate --make-ref`"):
        load_reference(open_reference(tmp_path / "ref.npz"), _stub(sha="b" * 64), {"pool"}, set())
    with pytest.raises(EvaluationError, match="already exists"):
        make_reference(tmp_path / "imgs.npz", ext, tmp_path / "ref.npz")
    with pytest.raises(EvaluationError, match=r"writes an \.npz"):
        make_reference(tmp_path / "imgs.npz", ext, tmp_path / "ref.txt")
    with pytest.raises(EvaluationError, match="no images"):
        open_images(tmp_path / "ref.npz")
