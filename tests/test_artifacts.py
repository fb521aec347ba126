"""Artifact folders: manifest round trip, atomic commit, integrity checks, skip/force/resume rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lowbitdm_cli.artifacts import MANIFEST, SCHEMA_VERSION, Artifact, Manifest, ModelRef, StageRun, sha256_file
from lowbitdm_cli.errors import ArtifactError, IntegrityError, ManifestError, StageOrderError

MODEL = ModelRef(name="tiny-random", source="embedded", digest="0" * 64)
RECIPE = {"name": "test", "calibrate": {"num_samples": 4}}


def _make(out: Path, recipe: dict | None = None, value: float = 1.0, **kwargs) -> StageRun:
    """Start a calibrate-stage run that writes one small tensor file (not yet committed)."""
    run = StageRun.start(out, "calibrate", MODEL, recipe or RECIPE, **kwargs)
    if not run.done:
        run.save_tensors("checkpoint_0.safetensors", {"x": torch.zeros(2)})
        run.save_tensors("state.safetensors", {"w": torch.full((3, 4), value)})
        run.checkpoint(step=1)
    return run


def _commit(run: StageRun) -> Artifact:
    return run.commit(["state.safetensors"], metrics={"loss": 0.5}, info={"note": "hi"})


# --- manifest ---------------------------------------------------------------------------------

def test_manifest_roundtrip(tmp_path: Path) -> None:
    art = _commit(_make(tmp_path / "a"))
    reopened = Artifact.open(tmp_path / "a")
    assert reopened.manifest == art.manifest
    assert Manifest.model_validate_json(art.manifest.model_dump_json()) == art.manifest
    m = reopened.manifest
    assert (m.schema_version, m.stage, m.status) == (SCHEMA_VERSION, "calibrate", "complete")
    assert m.recipe == RECIPE and m.model == MODEL
    assert m.metrics == {"loss": 0.5} and m.info["note"] == "hi" and m.info["step"] == 1
    assert m.self_digest == m.compute_digest()
    assert reopened.tensors("state.safetensors")["w"].eq(1.0).all()


def test_manifest_roundtrip_session_artifact(calibrated: Artifact) -> None:
    reopened = Artifact.open(calibrated.path, stages=("calibrate",))
    assert reopened.manifest == calibrated.manifest
    assert reopened.manifest_sha256 == calibrated.manifest_sha256
    assert set(reopened.manifest.files) == {"calib_data.safetensors", "quant_state.safetensors"}


# --- atomic commit ------------------------------------------------------------------------------

def test_commit_is_atomic_and_hashes_files(tmp_path: Path) -> None:
    out = tmp_path / "a"
    run = _make(out)
    partial = tmp_path / "a.partial"
    assert partial.is_dir() and not out.exists()
    assert json.loads((partial / MANIFEST).read_text())["status"] == "partial"
    with pytest.raises(ArtifactError, match="--resume"):
        Artifact.open(out)

    art = _commit(run)
    assert out.is_dir() and not partial.exists()
    assert not list(tmp_path.glob("*.partial")) and not list(out.glob("*.tmp"))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "state.safetensors"]  # checkpoint dropped
    entry = art.manifest.files["state.safetensors"]
    assert entry.sha256 == sha256_file(out / "state.safetensors")
    assert entry.size == (out / "state.safetensors").stat().st_size
    assert art.manifest.status == "complete"


# --- integrity ----------------------------------------------------------------------------------

def test_tampered_tensor_file(calibrated: Artifact, copy_artifact, flip_byte) -> None:
    folder = copy_artifact(calibrated)
    flip_byte(folder / "quant_state.safetensors")
    with pytest.raises(IntegrityError, match="quant_state.safetensors"):
        Artifact.open(folder)
    Artifact.open(folder, verify=False)  # the manifest itself is fine


def test_missing_tensor_file(calibrated: Artifact, copy_artifact) -> None:
    folder = copy_artifact(calibrated)
    (folder / "calib_data.safetensors").unlink()
    with pytest.raises(IntegrityError, match="calib_data.safetensors"):
        Artifact.open(folder)


def test_symlinked_tensor_file(calibrated: Artifact, copy_artifact, tmp_path: Path) -> None:
    folder = copy_artifact(calibrated)
    real = tmp_path / "elsewhere.safetensors"
    os.replace(folder / "quant_state.safetensors", real)
    (folder / "quant_state.safetensors").symlink_to(real)
    with pytest.raises(IntegrityError, match="link"):
        Artifact.open(folder)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m["metrics"].update(loss=0.1), id="metric"),
    pytest.param(lambda m: m["recipe"].update(name="other"), id="recipe"),
    pytest.param(lambda m: m["info"].update(bits="w2a2"), id="info"),
    pytest.param(lambda m: m.update(tool_version="9.9.9"), id="tool_version"),
])
def test_manifest_edited_by_hand(tmp_path: Path, edit, edit_manifest) -> None:
    _commit(_make(tmp_path / "a"))
    edit_manifest(tmp_path / "a", edit)
    with pytest.raises(ManifestError, match="edited by hand"):
        Artifact.open(tmp_path / "a")


def test_manifest_edited_by_hand_session_artifact(calibrated: Artifact, copy_artifact, edit_manifest) -> None:
    folder = copy_artifact(calibrated)
    edit_manifest(folder, lambda m: m["recipe"]["quant"].update(bits="w8a8"))
    with pytest.raises(ManifestError, match="edited by hand"):
        Artifact.open(folder)


def test_manifest_not_json(tmp_path: Path) -> None:
    _commit(_make(tmp_path / "a"))
    (tmp_path / "a" / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Artifact.open(tmp_path / "a")


def test_newer_schema_version(tmp_path: Path, edit_manifest) -> None:
    _commit(_make(tmp_path / "a"))
    edit_manifest(tmp_path / "a", lambda m: m.update(schema_version=99, future_field={"x": 1}), redigest=True)
    with pytest.raises(ManifestError) as e:
        Artifact.open(tmp_path / "a")
    assert "99" in str(e.value) and f"up to {SCHEMA_VERSION}" in str(e.value)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/file", ".hidden", ".."],
                         ids=["dotdot", "absolute", "subdir", "hidden", "parent"])
def test_manifest_file_name_outside_folder(tmp_path: Path, name: str, edit_manifest) -> None:
    _commit(_make(tmp_path / "a"))

    def point_elsewhere(m: dict) -> None:
        m["files"][name] = m["files"].pop("state.safetensors")

    edit_manifest(tmp_path / "a", point_elsewhere, redigest=True)
    with pytest.raises(ManifestError, match="plain name"):
        Artifact.open(tmp_path / "a")


def test_partial_folder_refused(tmp_path: Path) -> None:
    _make(tmp_path / "a")  # never committed, like a killed run
    with pytest.raises(ArtifactError, match="--resume"):
        Artifact.open(tmp_path / "a.partial")
    with pytest.raises(ArtifactError, match="--resume"):
        Artifact.open(tmp_path / "a")


def test_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifact.open(tmp_path / "empty")
    with pytest.raises(ArtifactError, match="does not exist"):
        Artifact.open(tmp_path / "nothing")


def test_wrong_stage(calibrated: Artifact) -> None:
    with pytest.raises(StageOrderError, match="calibrate artifact"):
        Artifact.open(calibrated.path, stages=("sample",))


# --- StageRun: skip, force, resume -----------------------------------------------------------------

def test_skip_when_inputs_equal(tmp_path: Path) -> None:
    first = _commit(_make(tmp_path / "a"))
    before = (tmp_path / "a" / MANIFEST).read_bytes()
    run = StageRun.start(tmp_path / "a", "calibrate", MODEL, RECIPE)
    assert run.done and run.artifact is not None
    assert run.artifact.manifest == first.manifest
    assert (tmp_path / "a" / MANIFEST).read_bytes() == before
    assert not (tmp_path / "a.partial").exists()


def test_other_inputs_need_force(tmp_path: Path) -> None:
    _commit(_make(tmp_path / "a"))
    other = {**RECIPE, "name": "other"}
    with pytest.raises(ArtifactError, match="--force"):
        StageRun.start(tmp_path / "a", "calibrate", MODEL, other)
    assert Artifact.open(tmp_path / "a").manifest.recipe == RECIPE  # untouched

    art = _commit(_make(tmp_path / "a", other, value=2.0, force=True))
    assert art.manifest.recipe == other
    assert art.tensors("state.safetensors")["w"].eq(2.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no .partial, no .old-* left


def test_force_redoes_same_inputs(tmp_path: Path) -> None:
    _commit(_make(tmp_path / "a"))
    run = _make(tmp_path / "a", value=3.0, force=True)
    assert not run.done
    assert _commit(run).tensors("state.safetensors")["w"].eq(3.0).all()


def test_replace_stale(tmp_path: Path) -> None:
    _commit(_make(tmp_path / "a"))
    other = {**RECIPE, "name": "other"}
    assert _commit(_make(tmp_path / "a", other, replace_stale=True)).manifest.recipe == other


def test_partial_needs_resume_or_force(tmp_path: Path) -> None:
    _make(tmp_path / "a")
    with pytest.raises(ArtifactError, match="--resume"):
        StageRun.start(tmp_path / "a", "calibrate", MODEL, RECIPE)
    run = StageRun.start(tmp_path / "a", "calibrate", MODEL, RECIPE, force=True)
    assert not run.resumed and not run.has("checkpoint_0.safetensors")


def test_resume_keeps_checkpoints(tmp_path: Path) -> None:
    _make(tmp_path / "a")
    run = StageRun.start(tmp_path / "a", "calibrate", MODEL, RECIPE, resume=True)
    assert run.resumed and run.has("checkpoint_0.safetensors") and run.has("state.safetensors")
    assert _commit(run).tensors("state.safetensors")["w"].eq(1.0).all()


def test_resume_with_other_inputs_refused(tmp_path: Path) -> None:
    _make(tmp_path / "a")
    other = {**RECIPE, "name": "other"}
    with pytest.raises(ArtifactError, match="other inputs"):
        StageRun.start(tmp_path / "a", "calibrate", MODEL, other, resume=True)
    assert (tmp_path / "a.partial" / "checkpoint_0.safetensors").is_file()  # kept
    run = StageRun.start(tmp_path / "a", "calibrate", MODEL, other, resume=True, force=True)
    assert not run.resumed and not run.has("checkpoint_0.safetensors")


def test_second_writer_of_the_same_artifact_is_refused(tmp_path):
    import subprocess
    import sys

    from lowbitdm_cli.artifacts import ModelRef, StageRun

    ref = ModelRef(name="m", source="embedded", digest="0" * 64)
    first = StageRun.start(tmp_path / "s", "sample", ref, {"sample": {"n": 1}})
    other = (
        "import sys; from pathlib import Path\n"
        "from lowbitdm_cli.artifacts import ModelRef, StageRun\n"
        "from lowbitdm_cli.errors import ArtifactError\n"
        "ref = ModelRef(name='m', source='embedded', digest='0' * 64)\n"
        "try:\n"
        "    StageRun.start(Path(sys.argv[1]), 'sample', ref, {'sample': {'n': 1}}, resume=True)\n"
        "except ArtifactError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", other, str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3 and "another lowbitdm process" in proc.stdout
    first.save_bytes("x.bin", b"x")
    first.commit(["x.bin"])
    # once committed the lock is released and the artifact is simply up to date
    assert StageRun.start(tmp_path / "s", "sample", ref, {"sample": {"n": 1}}).done


def test_digest_uses_only_the_named_recipe_sections(tmp_path):
    from lowbitdm_cli.artifacts import ModelRef, StageRun

    ref = ModelRef(name="m", source="embedded", digest="0" * 64)
    run = StageRun.start(tmp_path / "s", "sample", ref, {"sample": {"n": 1}, "finetune": {"method": "a"}},
                         recipe_sections=("sample",))
    run.save_bytes("x.bin", b"x")
    run.commit(["x.bin"])
    again = StageRun.start(tmp_path / "s", "sample", ref, {"sample": {"n": 1}, "finetune": {"method": "b"}},
                           recipe_sections=("sample",))
    assert again.done


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_is_the_stages_own(tmp_path: Path) -> None:
    """A stage run after a big allocation in the same process (`lowbitdm run`) records its own peak."""
    def rss_mb() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    base = rss_mb()
    big = torch.ones(800 * 2**20 // 4)  # 800 MiB, touched
    assert rss_mb() > base + 700
    del big
    art = _commit(_make(tmp_path / "a"))
    assert art.manifest.timings["peak_rss_mb"] < base + 300
