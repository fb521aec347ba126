"""`lowbitdm run --model FOLDER` on a user's diffusers folder (the tiny random DDPM of `family_builders`):
with no reference it stops after sampling (grids side by side, sizes and speed, one line on what was
skipped); with a reference and Inception weights it scores both models with the Inception metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from family_builders import build_ddpm  # noqa: E402

SETS = ["calibrate.num_samples=2", "calibrate.batch_size=2", "sample.num_samples=4", "sample.batch_size=2",
        "sample.steps=3"]


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ddpm(tmp_path_factory.mktemp("user") / "my-ddpm")


def _run(ddpm: Path, runs: Path, *extra: str) -> tuple[dict, str]:
    args = ["run", "--model", str(ddpm), "--bits", "w8a8", "--runs-dir", str(runs),
            *[a for s in SETS for a in ("--set", s)], *extra]
    shown = CliRunner().invoke(app, args, terminal_width=80)
    assert shown.exit_code == 0, shown.output
    data = CliRunner().invoke(app, ["--json", *args])  # every stage is done: reads the manifests
    assert data.exit_code == 0, data.output
    return json.loads(data.stdout), shown.output


def test_without_reference_stops_after_sampling(ddpm: Path, tmp_path: Path) -> None:
    result, output = _run(ddpm, tmp_path)
    run_dir = Path(result["run_dir"])
    assert (run_dir / "sample").is_dir() and not (run_dir / "evaluate").exists()
    assert set(result["skipped"]) == {"fid", "sfid", "is", "precision", "recall"}
    assert "metrics skipped: fid, sfid, is, precision, recall: no Inception weights" in " ".join(output.split())
    fp, q = result["rows"]
    assert fp["metrics"] == {} and q["merged_mb"] < fp["denoiser_mb"] and q["images_per_s"] > 0
    grids = Path(result["grids"])
    widths = [Image.open(Path(r["path"]) / "grid.png").width for r in (fp, q)]
    assert Image.open(grids).width == sum(widths) + 8


def test_weights_without_reference_score_is_only(ddpm: Path, tmp_path: Path, inception_weights: Path) -> None:
    result, output = _run(ddpm, tmp_path, "--inception-weights", str(inception_weights))
    assert set(result["rows"][1]["metrics"]) == {"is"}
    assert set(result["skipped"]) == {"fid", "sfid", "precision", "recall"}
    assert "no reference" in " ".join(output.split())


def test_with_reference_scores_both_models(ddpm: Path, tmp_path: Path, inception_weights: Path) -> None:
    ref = tmp_path / "ref"  # the user's reference images: a folder of PNGs
    ref.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 255 - 40 * i, 128)).save(ref / f"{i}.png")
    result, output = _run(ddpm, tmp_path / "runs", "--ref", str(ref), "--inception-weights", str(inception_weights),
                          "--metric", "fid,is")
    assert result["skipped"] == {} and "grids" not in result
    for row in result["rows"]:
        ev = Artifact.open(row["path"])
        assert ev.manifest.stage == "evaluate" and set(ev.manifest.metrics) == {"fid", "is"}
        assert "fid" in row["intervals"]
    assert "FID ↓" in output and "metrics skipped" not in output
