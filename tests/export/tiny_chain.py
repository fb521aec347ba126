"""The merged checkpoint of tiny-random the runtime tests build: calibrate (ptq) → finetune → merge,
and a tiny `lowbitdm sample` of it."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact, Manifest
from lowbitdm_cli.recipes import load_recipe

TINY = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4"]


def merge_tiny(bits: str, sets: list[str], root: Path, model: str = "tiny-random") -> Artifact:
    """`model` (default tiny-random) at `bits` with the tiny calibration and `sets`, merged under `root`."""
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    recipe = load_recipe("ptq", model=model, bits=bits, sets=TINY + sets)
    calibrated = calibrate(recipe, root / "calibrate")
    return merge(finetune(calibrated, recipe, root / "finetune"), root / "merge")


QUICK_SAMPLE = [a for s in ("sample.num_samples=2", "sample.batch_size=2", "sample.steps=2", "sample.grid_samples=0")
                for a in ("--set", s)]


def sample_tiny(runner: CliRunner, merged: Path, out: Path, *options: str) -> Manifest:
    """`lowbitdm sample merged` (two samples, two steps) with `options` into `out`; its manifest."""
    from lowbitdm_cli.cli import app

    result = runner.invoke(app, ["sample", str(merged), *QUICK_SAMPLE, "--out", str(out), *options])
    assert result.exit_code == 0, (result.output, result.exception)
    return Artifact.open(out).manifest
