"""Several seeds: `run_seeds` / `run --seeds`, and `report` grouping runs that differ only by seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.pipeline import run_seeds, with_seed_offset
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.report import RunSummary, collect_runs, differences, group_runs, write_report

SETS = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.num_samples=20", "sample.batch_size=20",
        "sample.steps=3"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = tmp_path_factory.mktemp("runs")
    return run_seeds(load_recipe("ptq", model="tiny-random", bits="w8a8", sets=SETS), runs, seeds=2)


def _summary(label: str, bits: str, value: float, seeds: dict[str, int], config: str,
             interval: list[float] | None = None) -> RunSummary:
    w = None if bits == "fp" else int(bits[1])
    r = RunSummary(label=label, path=label, head=label, model="m", method="fp" if w is None else "ptq",
                   recipe=None, bits=bits, w_bits=w, a_bits=w, metrics={"fid_digits": value},
                   intervals={"fid_digits": interval} if interval else {}, seeds=seeds, config=config)
    r.config_label = label
    return r


def test_with_seed_offset_moves_every_seed() -> None:
    r = load_recipe("ptq", model="tiny-random", bits="w8a8")
    moved = with_seed_offset(r, 2)
    assert (moved.calibrate.seed, moved.finetune.seed, moved.sample.seed) == (
        r.calibrate.seed + 2, r.finetune.seed + 2, r.sample.seed + 2)
    assert with_seed_offset(r, 0) is r
    assert moved.quant == r.quant and moved.name == r.name


def test_run_seeds_makes_one_chain_per_seed(seeded: dict) -> None:
    q0, q1 = (Path(d) for d in seeded["run_dirs"])
    assert q1.name == q0.name + "-seed1"
    assert len(set(seeded["fp_dirs"])) == 2  # each seed its own FP baseline (its sampler seed differs)
    s0, s1 = (Artifact.open(d / "sample").manifest.recipe for d in (q0, q1))
    for section in ("calibrate", "finetune", "sample"):
        assert s1[section]["seed"] == s0[section]["seed"] + 1
    # the samples differ (disjoint noise), so do the scores
    assert Artifact.open(q0 / "evaluate").manifest.metrics != Artifact.open(q1 / "evaluate").manifest.metrics


def test_configurations_are_mean_and_t_interval_over_seeds(seeded: dict) -> None:
    runs = collect_runs(seeded["fp_dirs"] + seeded["run_dirs"])
    configs = group_runs(runs)
    assert [len(c.runs) for c in configs] == [2, 2] and [c.bits for c in configs] == ["fp", "w8a8"]
    for c in configs:
        vals = [Artifact.open(Path(d) / "evaluate").manifest.metrics["fid_digits"]
                for d in (seeded["fp_dirs"] if c.bits == "fp" else seeded["run_dirs"])]
        mean, sd = np.mean(vals), np.std(vals, ddof=1)
        half = stats.t.ppf(0.975, 1) * sd / np.sqrt(2)  # 12.71 · sd / √2 by hand
        assert c.metrics["fid_digits"] == pytest.approx(mean)
        assert c.intervals["fid_digits"] == pytest.approx([mean - half, mean + half])
        assert c.interval_kind["fid_digits"] == "t over 2 seeds"
    assert [c["label"] for c in seeded["configurations"]] == [c.label for c in configs]


def test_report_shows_configurations_and_significance(seeded: dict, tmp_path: Path) -> None:
    runs = collect_runs(seeded["fp_dirs"] + seeded["run_dirs"])
    files = write_report(runs, tmp_path)
    md = files.markdown.read_text()
    assert "## Configurations" in md and "## Differences" in md
    diffs = differences(group_runs(runs))
    assert diffs and all(d.b == "fp" and d.a == "w8a8 ptq" for d in diffs)
    for d in diffs:
        verdict = "yes (intervals disjoint)" if d.significant else "not significant (intervals overlap)"
        assert verdict in md
    assert files.sizes["metric_vs_bits.png"] == (1000, 400)

    result = CliRunner().invoke(app, ["--json", "report", *seeded["fp_dirs"], *seeded["run_dirs"],
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [len(c["runs"]) for c in data["configurations"]] == [2, 2]
    assert {d["metric"] for d in data["differences"]} == {"fid_digits", "class_accuracy"}


def test_grouping_and_significance_by_hand() -> None:
    runs = [_summary("fp", "fp", 10.0, {"sample": 0}, "F", [9.0, 11.0]),
            _summary("w4 a", "w4a4", 20.0, {"sample": 0, "calibrate": 1}, "A"),
            _summary("w4 a", "w4a4", 22.0, {"sample": 1, "calibrate": 2}, "A"),
            _summary("w4 b", "w4a4", 21.0, {"sample": 0}, "B", [15.0, 30.0]),
            _summary("w2 a", "w2a4", 11.5, {"sample": 0}, "C", [10.5, 12.5])]
    configs = group_runs(runs)
    assert [(c.label, len(c.runs)) for c in configs] == [("fp", 1), ("w4 a", 2), ("w4 b", 1), ("w2 a", 1)]
    a = configs[1]
    half = stats.t.ppf(0.975, 1) * np.std([20.0, 22.0], ddof=1) / np.sqrt(2)
    assert a.metrics["fid_digits"] == 21.0 and a.intervals["fid_digits"] == pytest.approx([21 - half, 21 + half])
    assert configs[0].interval_kind["fid_digits"] == "evaluate (one run)"
    found = {(d.a, d.b): d for d in differences(configs)}
    # vs FP for every quantized configuration; equal bits against each other (w4 a vs w4 b once)
    assert set(found) == {("w4 a", "fp"), ("w4 b", "fp"), ("w2 a", "fp"), ("w4 a", "w4 b")}
    assert found[("w4 b", "fp")].significant is True          # [15, 30] vs [9, 11]: disjoint
    assert found[("w2 a", "fp")].significant is False         # [10.5, 12.5] vs [9, 11]: overlap
    assert found[("w4 a", "w4 b")].significant is False
    assert found[("w4 a", "w4 b")].difference == pytest.approx(0.0)


def test_cli_run_seeds_reuses_finished_runs(seeded: dict) -> None:
    runs_dir = Path(seeded["run_dirs"][0]).parent
    args = ["run", "--recipe", "ptq", "--model", "tiny-random", "--bits", "w8a8",
            *[a for s in SETS for a in ("--set", s)], "--runs-dir", str(runs_dir), "--seeds", "2"]
    before = (Path(seeded["run_dirs"][1]) / "evaluate" / "manifest.json").read_bytes()
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "mean of 2" in result.stdout and "2 seeds" in result.stdout
    assert (Path(seeded["run_dirs"][1]) / "evaluate" / "manifest.json").read_bytes() == before  # skipped
    data = json.loads(CliRunner().invoke(app, ["--json", *args]).stdout)
    assert data["seeds"] == 2 and len(data["rows"]) == 4 and len(data["configurations"]) == 2
    assert all("intervals" in row for row in data["rows"])
