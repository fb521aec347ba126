"""Versioned records: artifacts written by lowbitdm before manifest schema 2 (tests/fixtures/artifacts_v1,
made by the code of that time) open through the explicit migration; newer versions are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lowbitdm_cli import load_quantized
from lowbitdm_cli.artifacts import MANIFEST, SCHEMA_VERSION, Artifact
from lowbitdm_cli.errors import ArtifactError, IntegrityError, ManifestError, StageOrderError
from lowbitdm_cli.export.checkpoint import CONFIG_NAME, read_config
from lowbitdm_cli.manifest_versions import MIGRATIONS, migrate_manifest
from lowbitdm_cli.quant.config import CONFIG_VERSION, QuantizationConfig, migrate_config

V1 = Path(__file__).parent / "fixtures" / "artifacts_v1"
STAGES = {"calibrate": "fake-quant", "finetune": "fake-quant", "merge": "pack-quantized"}


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of the version-1 artifacts (tests may edit it; relative parent paths stay valid)."""
    return Path(shutil.copytree(V1, tmp_path / "v1"))


def test_fixture_is_version_1() -> None:
    for stage in STAGES:
        raw = json.loads((V1 / stage / MANIFEST).read_text())
        assert raw["schema_version"] == 1 and "quantization" not in raw
    assert json.loads((V1 / "merge" / CONFIG_NAME).read_text())["format_version"] == 1
    assert SCHEMA_VERSION == 2 and CONFIG_VERSION == 3


@pytest.mark.parametrize("stage", list(STAGES))
def test_version_1_artifacts_open_migrated(stage: str) -> None:
    art = Artifact.open(V1 / stage)  # digests and every file's sha256 checked as written
    m = art.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert m.quantization is not None and m.quantization.format == STAGES[stage]
    assert m.quantization.config_version == 1
    assert [a.manifest.stage for a in art.lineage()] == list(STAGES)[: list(STAGES).index(stage) + 1][::-1]


def test_migration_is_explicit_and_stepwise() -> None:
    raw = json.loads((V1 / "calibrate" / MANIFEST).read_text())
    assert set(MIGRATIONS) == set(range(1, SCHEMA_VERSION))
    out = migrate_manifest(raw)
    assert out["schema_version"] == 2 and out["quantization"] == {"format": "fake-quant", "config_version": 1}
    assert raw["schema_version"] == 1  # the parsed input is not changed in place
    sample = {**raw, "stage": "sample"}
    assert migrate_manifest(sample)["quantization"] is None
    with pytest.raises(ValueError, match="newer"):
        migrate_manifest({**raw, "schema_version": SCHEMA_VERSION + 1})


def test_version_1_hand_edit_is_still_detected(v1: Path) -> None:
    path = v1 / "calibrate" / MANIFEST
    data = json.loads(path.read_text())
    data["metrics"]["calib_s"] = 0.0
    path.write_text(json.dumps(data, indent=2) + "\n")
    with pytest.raises(ManifestError, match="edited by hand"):
        Artifact.open(v1 / "calibrate")


def test_newer_manifest_refused(v1: Path, edit_manifest) -> None:  # noqa: ANN001
    edit_manifest(v1 / "merge", lambda m: m.update(schema_version=SCHEMA_VERSION + 1), redigest=True)
    with pytest.raises(ManifestError, match=f"schema_version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}"):
        Artifact.open(v1 / "merge")


def test_version_1_artifacts_load_and_agree() -> None:
    """Every kind loads through load_quantized; finetune (method none) and its merge compute what calibrate did."""
    cal, fin = load_quantized(V1 / "calibrate"), load_quantized(V1 / "finetune", runtime="fake")
    merged, merged_fake = load_quantized(V1 / "merge"), load_quantized(V1 / "merge", runtime="fake")
    assert merged.meta["runtime"]["int_layers"] > 0 and "runtime" not in merged_fake.meta
    x = torch.randn(2, *cal.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([1, 7])
    with torch.no_grad():
        ref = cal.eps(x, 500, cond)
        assert torch.equal(fin.eps(x, 500, cond), ref)
        out_fake, out_int = merged_fake.eps(x, 500, cond), merged.eps(x, 500, cond)
    assert torch.equal(out_int, out_fake)  # the integer runtime gives the fake-quantized bits
    # the merged codes dequantize to the calibrated fake-quantized weights: the same operations, the same bits
    assert torch.equal(out_fake, ref), (out_fake - ref).abs().max()


def test_load_quantized_refusals(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="fake-quantized"):
        load_quantized(V1 / "calibrate", runtime="int")
    with pytest.raises(ValueError, match="runtime"):
        load_quantized(V1 / "merge", runtime="int8")  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="not an artifact"):
        load_quantized(tmp_path)


def test_load_quantized_refuses_other_stages(v1: Path, edit_manifest) -> None:  # noqa: ANN001
    # a version-1 manifest of a stage without a quantized model: migrated to no `quantization` record
    edit_manifest(v1 / "calibrate", lambda m: m.update(stage="sample"), redigest=True)
    with pytest.raises(StageOrderError, match="sample artifact"):
        load_quantized(v1 / "calibrate")


def test_version_1_checkpoint_config_migrates() -> None:
    cfg = read_config(V1 / "merge")
    assert isinstance(cfg, QuantizationConfig) and cfg.format_version == CONFIG_VERSION and cfg.scheme is None
    raw = json.loads((V1 / "merge" / CONFIG_NAME).read_text())
    assert set(cfg.layers) == set(raw["layers"])
    with pytest.raises(ValueError, match="newer"):
        migrate_config({**raw, "format_version": CONFIG_VERSION + 1})


def test_version_2_checkpoint_config_migrates_unchanged() -> None:
    """Version 3 only added optional fields (per-token inputs, input transforms): a version-2 file
    reads as it was, with the current version number."""
    raw = migrate_config(json.loads((V1 / "merge" / CONFIG_NAME).read_text()))
    v2 = {**raw, "format_version": 2}
    out = migrate_config(v2)
    assert out == {**v2, "format_version": 3} and v2["format_version"] == 2
    cfg = QuantizationConfig.model_validate(out)
    assert all(e.transforms is None and not (e.input_activations and e.input_activations.dynamic)
               for e in cfg.layers.values())


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "not readable JSON"),
    ('{"_class_name": "UNet2DModel"}', "not a lowbitdm quantization config"),
    ("PATCH_VERSION", "newer than this lowbitdm reads"),
    ("PATCH_LAYER", "is invalid: layers."),
])
def test_wrong_checkpoint_config_is_one_line(tmp_path: Path, content: str, needle: str) -> None:
    folder = Path(shutil.copytree(V1 / "merge", tmp_path / "m"))
    raw = json.loads((folder / CONFIG_NAME).read_text())
    if content == "PATCH_VERSION":
        content = json.dumps({**raw, "format_version": 99})
    elif content == "PATCH_LAYER":
        name = next(iter(raw["layers"]))
        raw["layers"][name]["weights"]["num_bits"] = 12
        content = json.dumps(raw)
    (folder / CONFIG_NAME).write_text(content)
    with pytest.raises(IntegrityError, match=needle) as e:
        read_config(folder)
    assert "\n" not in str(e.value)


def test_new_merge_of_a_version_1_parent_records_schema_2(v1: Path) -> None:
    from lowbitdm_cli.stages.merge import merge

    art = merge(Artifact.open(v1 / "finetune"), v1 / "merge2")
    assert json.loads((art.path / MANIFEST).read_text())["schema_version"] == SCHEMA_VERSION
    cfg = read_config(art.path)
    assert cfg.format_version == CONFIG_VERSION and cfg.scheme is not None and cfg.scheme.bits == "w2a4"
    assert cfg.scheme.a_temporal is True
