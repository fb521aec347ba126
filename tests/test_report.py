"""`lowbitdm report`: summaries read back from the manifests, the report files and figures, the CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.errors import LowbitError
from lowbitdm_cli.npz import read_npz
from lowbitdm_cli.pipeline import run_recipe
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.report import ReportFiles, RunSummary, collect_runs, table, write_report

SETS = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.num_samples=20", "sample.batch_size=20",
        "sample.steps=3"]
FINETUNED = ['finetune.method="qalora"', "finetune.epochs=1", "finetune.batch_size=2", 'calibrate.mixed="omq"']


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """[fp, w8a8 ptq, w4a4 ptq+omq+qalora] run folders on tiny-random (one shared FP baseline)."""
    runs = tmp_path_factory.mktemp("runs")
    plain = run_recipe(load_recipe("ptq", model="tiny-random", bits="w8a8", sets=SETS), runs)
    tuned = run_recipe(load_recipe("ptq", model="tiny-random", bits="w4a4", sets=SETS + FINETUNED), runs)
    fp_dir = Path(plain["rows"][0]["path"]).parent
    assert Path(tuned["rows"][0]["path"]).parent == fp_dir
    return [fp_dir, Path(plain["run_dir"]), Path(tuned["run_dir"])]


@pytest.fixture(scope="module")
def runs(run_dirs: list[Path]) -> list[RunSummary]:
    return collect_runs(run_dirs)


@pytest.fixture(scope="module")
def files(runs: list[RunSummary], tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report(runs, tmp_path_factory.mktemp("report"))


def _lineage(run_dir: Path) -> list[Artifact]:
    return Artifact.open(run_dir / "evaluate").lineage()


def test_summaries_match_manifests(runs: list[RunSummary], run_dirs: list[Path]) -> None:
    fp, plain, tuned = runs
    assert [(r.bits, r.w_bits, r.a_bits, r.method) for r in runs] == [
        ("fp", None, None, "fp"), ("w8a8", 8, 8, "ptq"), ("w4a4", 4, 4, "ptq+omq+qalora")]
    assert len({r.label for r in runs}) == 3
    for r, run_dir in zip(runs, run_dirs):
        chain = {a.manifest.stage: a.manifest for a in _lineage(run_dir)}
        assert r.metrics == chain["evaluate"].metrics and set(r.metrics) == {"fid_digits", "class_accuracy"}
        assert r.intervals == {k: [v.low, v.high] for k, v in chain["evaluate"].intervals.items()}
        assert set(r.intervals) == set(r.metrics)
        assert r.peak_rss_mb == max(m.timings["peak_rss_mb"] for m in chain.values())
        assert r.samples == str(run_dir / "sample" / "samples.npz")
        if "calibrate" in chain:
            assert r.calibrate_s == chain["calibrate"].timings["wall_s"]
            assert r.finetune_s == chain["finetune"].timings["wall_s"]
            assert r.merged_bytes == chain["merge"].info["merged_denoiser_bytes"]
            assert r.size_ratio == chain["merge"].info["size_ratio"]
    assert fp.calibrate_s is None and fp.merged_bytes is None and fp.recipe is None
    assert plain.loss_history == [] and plain.omq is None
    tuned_ft = {a.manifest.stage: a.manifest for a in _lineage(run_dirs[2])}["finetune"]
    assert tuned.loss_history == tuned_ft.info["loss_history"] and len(tuned.loss_history) == 1
    assert tuned.omq and all(len(rec["bits"]) == len(rec["kurtosis"]) for rec in tuned.omq.values())


def test_table_cells_are_the_manifest_metrics(runs: list[RunSummary], files: ReportFiles) -> None:
    headers, rows = table(runs)
    fid, acc = headers.index("FID-digits ↓"), headers.index("class acc ↑")
    md_lines = files.markdown.read_text().splitlines()
    for r, row in zip(runs, rows):
        assert row[0] == r.label
        lo, hi = r.intervals["fid_digits"]
        assert row[fid] == f"{r.metrics['fid_digits']:.2f} [{lo:.2f}, {hi:.2f}]"
        lo, hi = r.intervals["class_accuracy"]
        assert row[acc] == f"{100 * r.metrics['class_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
        assert "| " + " | ".join(row) + " |" in md_lines
    assert rows[0][headers.index("merged MB")] == "-"
    assert rows[1][headers.index("merged MB")] == f"{runs[1].merged_bytes / 2**20:.3f}"


def test_pngs_have_fixed_sizes(files: ReportFiles) -> None:
    blocks = 3 * (22 + (2 * (48 + 2) + 2) + 10)  # title, 2 rows of 16 px images ×3, gap: per run
    expected = {"metric_vs_bits.png": (1000, 400), "loss_curves.png": (700, 400), "omq_bits.png": (1200, 350),
                "samples.png": (600, 24 + blocks + 10)}
    assert files.sizes == expected
    for name, size in expected.items():
        with Image.open(files.out_dir / name) as img:
            assert img.format == "PNG" and img.size == size, name


def test_samples_png_shows_the_same_indices(runs: list[RunSummary], files: ReportFiles) -> None:
    """Each row block starts with the run's own sample 0, scaled ×3, at a fixed pixel position."""
    with Image.open(files.images["samples.png"]) as img:
        pixels = np.asarray(img.convert("RGB"))
    top = 24
    for r in runs:
        top += 22
        first = read_npz(Path(r.samples))["arr_0"][0]  # type: ignore[arg-type]
        y, x = top + 2, 10 + 2
        np.testing.assert_array_equal(pixels[y:y + 48, x:x + 48, 0], first[..., 0].repeat(3, 0).repeat(3, 1))
        top += 2 * (48 + 2) + 2 + 10


def test_html_embeds_every_image(files: ReportFiles) -> None:
    page = files.html.read_text()
    uris = page.split('src="data:image/png;base64,')[1:]
    assert len(uris) == len(files.images) == 4
    embedded = {base64.b64decode(u.split('"', 1)[0]) for u in uris}
    assert embedded == {p.read_bytes() for p in files.images.values()}
    assert 'src="metric_vs_bits.png"' not in page
    md = files.markdown.read_text()
    assert all(f"]({name})" in md for name in files.images)


def test_figures_without_data_are_skipped(run_dirs: list[Path], tmp_path: Path) -> None:
    """An FP-only report has no loss or OMQ figure; an artifact folder (merge) works as a path too."""
    runs = collect_runs([run_dirs[0], run_dirs[1] / "merge"])
    assert runs[1].metrics == {} and runs[1].merged_bytes and runs[1].samples is None
    result = write_report(runs, tmp_path)
    assert set(result.images) == {"metric_vs_bits.png", "samples.png"}
    assert not (tmp_path / "loss_curves.png").exists()


def test_neither_run_nor_artifact(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="neither a run folder"):
        collect_runs([tmp_path / "empty"])


def test_cli_report(run_dirs: list[Path], tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["report", *map(str, run_dirs), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tiny-random: 3 runs" in result.stdout and (tmp_path / "r" / "report.html").is_file()

    result = runner.invoke(app, ["--json", *args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["label"] for r in data["runs"]] == ["fp", "w8a8 ptq", "w4a4 ptq+omq+qalora"]
    assert data["images"]["metric_vs_bits.png"]["size"] == [1000, 400]


def test_cli_report_bogus_path(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
