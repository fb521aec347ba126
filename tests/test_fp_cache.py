"""`lowbitdm run`'s FP-baseline cache: shared across runs folders, keyed by model and sample settings,
hashes checked, atomic (a failed store leaves no entry and the runs folder untouched)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lowbitdm_cli import pipeline
from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.pipeline import run_recipe
from lowbitdm_cli.recipes import load_recipe

SETS = ["calibrate.num_samples=2", "calibrate.batch_size=2", "sample.num_samples=6", "sample.batch_size=6",
        "sample.steps=2", "sample.grid_samples=0"]


def _recipe(*extra: str):  # noqa: ANN202
    return load_recipe("ptq", model="tiny-random", bits="w8a8", sets=SETS + list(extra))


def _fp(result: dict) -> Artifact:
    return Artifact.open(Path(result["rows"][0]["path"]))


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir()) if cache.exists() else []


def test_baseline_is_shared_across_runs_folders(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_recipe(_recipe(), tmp_path / "a", fp_cache=cache)
    assert not first["fp_from_cache"]
    (entry,) = _entries(cache)
    assert entry.name.startswith("tiny-random-") and {p.name for p in entry.iterdir()} == {"sample", "evaluate"}

    second = run_recipe(_recipe(), tmp_path / "b", fp_cache=cache)
    assert second["fp_from_cache"]
    a, b = _fp(first), _fp(second)
    assert a.path != b.path and a.manifest_sha256 == b.manifest_sha256  # the same evaluate, copied
    assert a.parent.manifest_sha256 == b.parent.manifest_sha256
    assert b.parent.path.parent == b.path.parent  # lineage inside runs folder b
    assert second["rows"][0]["metrics"] == first["rows"][0]["metrics"]
    # the FP sample stage found its artifact complete (no shard was sampled): same manifest, same created_at
    assert b.parent.manifest.created_at == a.parent.manifest.created_at

    other = run_recipe(_recipe("sample.seed=1"), tmp_path / "c", fp_cache=cache)  # other settings: other key
    assert not other["fp_from_cache"] and len(_entries(cache)) == 2


def test_corrupted_entry_is_not_used_and_is_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_recipe(_recipe(), tmp_path / "a", fp_cache=cache)
    (entry,) = _entries(cache)
    npz = entry / "sample" / "samples.npz"
    data = bytearray(npz.read_bytes())
    data[-10] ^= 0xFF
    npz.write_bytes(bytes(data))
    logs: list[str] = []
    second = run_recipe(_recipe(), tmp_path / "b", fp_cache=cache, log=logs.append)
    assert not second["fp_from_cache"] and any("not used" in m for m in logs)
    assert second["rows"][0]["metrics"] == first["rows"][0]["metrics"]  # recomputed: same seeds, same images
    Artifact.open(entry / "evaluate").lineage()  # the entry was rewritten whole, hashes valid
    Artifact.open(entry / "sample")


def test_damaged_entry_is_rewritten_by_the_runs_folder_that_filled_it(tmp_path: Path) -> None:
    # the runs folder still holds the baseline it stored: the entry's evaluate manifest is the very one
    # of that folder, so only checking the entry's files shows that its samples were damaged since
    cache = tmp_path / "cache"
    run_recipe(_recipe(), tmp_path / "a", fp_cache=cache)
    (entry,) = _entries(cache)
    npz = entry / "sample" / "samples.npz"
    data = bytearray(npz.read_bytes())
    data[-10] ^= 0xFF
    npz.write_bytes(bytes(data))
    again = run_recipe(_recipe(), tmp_path / "a", fp_cache=cache)
    assert not again["fp_from_cache"]
    Artifact.open(entry / "sample")  # rewritten from the runs folder's intact copy
    Artifact.open(entry / "evaluate").lineage()
    assert _entries(cache) == [entry]


def test_failed_store_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    real = shutil.copytree

    def copy_then_fail(src, dst, **kw):  # noqa: ANN001, ANN202
        real(src, dst, **kw)
        if Path(src).name == "evaluate":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.shutil, "copytree", copy_then_fail)
    logs: list[str] = []
    result = run_recipe(_recipe(), tmp_path / "a", fp_cache=cache, log=logs.append)
    assert _entries(cache) == [] and any("could not store" in m for m in logs)
    Artifact.open(Path(result["rows"][0]["path"])).lineage()  # the runs folder's baseline is intact
    monkeypatch.undo()
    again = run_recipe(_recipe(), tmp_path / "b", fp_cache=cache)
    assert not again["fp_from_cache"] and len(_entries(cache)) == 1


def test_no_cache_by_default(tmp_path: Path) -> None:
    result = run_recipe(_recipe(), tmp_path / "a")
    assert not result["fp_from_cache"]
