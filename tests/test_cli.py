"""The `lowbitdm` CLI: listing models, one-line errors with exit code 2, the whole chain on tiny-random."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import SCHEMA_VERSION, Artifact, ModelRef, StageRun
from lowbitdm_cli.cli import app
from lowbitdm_cli.npz import read_npz


def _ok(result, *what: str) -> None:
    assert result.exit_code == 0, f"{' '.join(what)} failed ({result.exit_code}):\n{result.output}"
    assert "Traceback" not in result.output


def _one_line_error(result, *needles: str) -> str:
    """Exit code 2, exactly one line starting with 'error:', no traceback; returns that line."""
    assert result.exit_code == 2, f"exit code {result.exit_code}, exception {result.exception!r}:\n{result.output}"
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _fake_artifact(path: Path, stage: str) -> Artifact:
    """A valid, empty artifact of `stage` (cheap stand-in for a parent of the wrong stage)."""
    run = StageRun.start(path, stage, ModelRef(name="tiny-random", source="embedded", digest="0" * 64), {})
    return run.commit([])


def test_models(runner: CliRunner) -> None:
    result = runner.invoke(app, ["models"])
    _ok(result, "models")
    assert "digits" in result.stdout and "tiny-random" in result.stdout


def test_models_json(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--json", "models"])
    _ok(result, "--json models")
    rows = json.loads(result.stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["digits"]["available"] is True
    assert by_name["tiny-random"]["sampler"]["steps"] >= 1
    assert by_name["sd-v1-4"]["available"] is False and by_name["sd-v1-4"]["needs"]


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    _ok(result, "--version")
    assert result.stdout.startswith("lowbitdm ")


# --- bad input: exit code 2, one "error:" line, no traceback ------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["calibrate", "--model", "nope"], ["unknown model 'nope'", "tiny-random"]),
    (["calibrate", "--model", "ldm-4"], ["'ldm-4' needs"]),
    (["calibrate", "--model", "tiny-random", "--bits", "w9a4"], ["w9a4", "2..8"]),
    (["calibrate", "--model", "tiny-random", "--bits", "x4"], ["x4", "wXaY"]),
    (["calibrate", "--model", "tiny-random", "--set", "quant.nope=1"], ["quant.nope", "unknown key"]),
    (["calibrate", "--model", "tiny-random", "--set", "sample.num_samples"], ["section.key=value"]),
    (["calibrate", "--model", "tiny-random", "--recipe", "nope"], ["unknown recipe 'nope'"]),
    (["run", "--recipe", "nope"], ["unknown recipe 'nope'"]),
    (["finetune", "/nonexistent"], ["/nonexistent", "does not exist"]),
    (["merge", "/nonexistent"], ["does not exist"]),
    (["evaluate", "/nonexistent"], ["does not exist"]),
    (["show", "/nonexistent"], ["does not exist"]),
    (["sample", "/nonexistent"], ["neither a known model"]),
    (["calibrate", "--model", "tiny-random", "--device", "gpu0"], ["--device", "cpu, cuda or cuda:N", "gpu0"]),
    *([(["calibrate", "--model", "tiny-random", "--device", "cuda"], ["--device cuda", "no CUDA device"])]
      if not torch.cuda.is_available() else []),
], ids=["model", "model-unavailable", "bits-w9a4", "bits-x4", "set-unknown-key", "set-malformed",
        "recipe-name", "run-recipe-name", "finetune-missing", "merge-missing", "evaluate-missing",
        "show-missing", "sample-missing", "device-bad", *(["device-no-cuda"] if not torch.cuda.is_available() else [])])
def test_bad_input(runner: CliRunner, tmp_path: Path, args: list[str], needles: list[str],
                   tiny_recipe_args: list[str]) -> None:
    if args[0] == "calibrate":
        args = [*args, *tiny_recipe_args, "--out", str(tmp_path / "c")]
    result = runner.invoke(app, args)
    _one_line_error(result, *needles)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command, stage", [
    ("merge", "sample"),
    ("finetune", "sample"),
    ("finetune", "merge"),
    ("sample", "evaluate"),
    ("evaluate", "calibrate"),
], ids=["merge<-sample", "finetune<-sample", "finetune<-merge", "sample<-evaluate", "evaluate<-calibrate"])
def test_wrong_stage_parent(runner: CliRunner, tmp_path: Path, command: str, stage: str) -> None:
    parent = _fake_artifact(tmp_path / stage, stage)
    result = runner.invoke(app, [command, str(parent.path), "--out", str(tmp_path / "out")])
    _one_line_error(result, f"is a {stage} artifact")
    assert not (tmp_path / "out").exists()


def test_evaluate_on_real_calibrate_artifact(runner: CliRunner, calibrated: Artifact, tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(calibrated.path), "--out", str(tmp_path / "e")])
    _one_line_error(result, "is a calibrate artifact", "sample")


@pytest.mark.parametrize("command", ["finetune", "show", "sample"])
def test_manifest_edited_by_hand(runner: CliRunner, calibrated: Artifact, copy_artifact, edit_manifest,
                                 command: str) -> None:
    folder = copy_artifact(calibrated)
    edit_manifest(folder, lambda m: m["recipe"]["quant"].update(bits="w8a8"))
    result = runner.invoke(app, [command, str(folder)])
    _one_line_error(result, "edited by hand", "manifest.json")


@pytest.mark.parametrize("command", ["finetune", "show", "sample"])
def test_tensor_hash_mismatch(runner: CliRunner, calibrated: Artifact, copy_artifact, flip_byte,
                              command: str) -> None:
    folder = copy_artifact(calibrated)
    flip_byte(folder / "quant_state.safetensors")
    result = runner.invoke(app, [command, str(folder)])
    _one_line_error(result, "quant_state.safetensors", "sha256")


def test_newer_schema(runner: CliRunner, calibrated: Artifact, copy_artifact, edit_manifest) -> None:
    folder = copy_artifact(calibrated)
    edit_manifest(folder, lambda m: m.update(schema_version=99), redigest=True)
    _one_line_error(runner.invoke(app, ["show", str(folder)]), "schema_version 99", f"up to {SCHEMA_VERSION}")


def test_file_name_outside_folder(runner: CliRunner, calibrated: Artifact, copy_artifact, edit_manifest) -> None:
    folder = copy_artifact(calibrated)
    edit_manifest(folder, lambda m: m["files"].update({"../x": m["files"].pop("quant_state.safetensors")}),
                  redigest=True)
    _one_line_error(runner.invoke(app, ["finetune", str(folder)]), "'../x'")


def test_existing_output_from_other_inputs(runner: CliRunner, calibrated: Artifact, tmp_path: Path) -> None:
    other = _fake_artifact(tmp_path / "taken", "finetune")
    result = runner.invoke(app, ["finetune", str(calibrated.path), "--out", str(other.path)])
    _one_line_error(result, "--force")


def test_unknown_metric(runner: CliRunner, tmp_path: Path) -> None:
    # Inception metrics (fid, ...) are tests/evaluation/test_inception_cli.py's business
    parent = _fake_artifact(tmp_path / "s", "sample")
    result = runner.invoke(app, ["evaluate", str(parent.path), "--metric", "fidd", "--out", str(tmp_path / "e")])
    _one_line_error(result, "unknown metric fidd", "fid_digits")


# --- happy path -----------------------------------------------------------------------------------

def test_chain(runner: CliRunner, tmp_path: Path, tiny_recipe_args: list[str]) -> None:
    run = tmp_path / "run"
    steps = [
        ["calibrate", "--model", "tiny-random", "--bits", "w4a8", "--recipe", "ptq", *tiny_recipe_args,
         "--device", "cpu", "--out", str(run / "calibrate")],
        ["finetune", str(run / "calibrate"), "--device", "cpu"],  # default --out: next to the parent
        ["merge", str(run / "finetune")],
        ["sample", str(run / "merge")],
        ["evaluate", str(run / "sample")],
    ]
    for args in steps:
        _ok(runner.invoke(app, args), *args[:2])
    for stage in ("calibrate", "finetune", "merge", "sample", "evaluate"):
        assert Artifact.open(run / stage).manifest.stage == stage
        assert not (run / f"{stage}.partial").exists()

    data = read_npz(run / "sample" / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (8, 16, 16, 1)
    assert data["labels"].shape == (8,) and set(data["labels"].tolist()) <= set(range(10))
    assert (run / "sample" / "grid.png").is_file()
    assert Artifact.open(run / "sample").manifest.recipe["sample"]["steps"] == 4  # inherited via the lineage

    evaluated = Artifact.open(run / "evaluate")
    assert {"fid_digits", "class_accuracy"} <= set(evaluated.manifest.metrics)
    assert 0.0 <= evaluated.manifest.metrics["class_accuracy"] <= 1.0
    assert [a.manifest.stage for a in evaluated.lineage()] == ["evaluate", "sample", "merge", "finetune",
                                                               "calibrate"]

    shown = runner.invoke(app, ["show", str(run / "evaluate")])
    _ok(shown, "show")
    assert "evaluate" in shown.stdout and "fid_digits" in shown.stdout
    shown = runner.invoke(app, ["--json", "show", str(run / "evaluate")])
    _ok(shown, "--json show")
    data = json.loads(shown.stdout)
    assert data["stage"] == "evaluate" and data["status"] == "complete"
    assert set(data["metrics"]) >= {"fid_digits", "class_accuracy"}
    assert len(data["lineage"]) == 5

    # rerunning a finished stage with the same inputs is a no-op
    before = (run / "sample" / "manifest.json").read_bytes()
    _ok(runner.invoke(app, ["sample", str(run / "merge")]), "sample again")
    assert (run / "sample" / "manifest.json").read_bytes() == before


def test_calibrate_json_output(runner: CliRunner, tmp_path: Path, tiny_recipe_args: list[str]) -> None:
    result = runner.invoke(app, ["--json", "calibrate", "--model", "tiny-random", "--bits", "w8a8",
                                 *tiny_recipe_args, "--out", str(tmp_path / "c")])
    _ok(result, "--json calibrate")
    data = json.loads(result.stdout)
    assert data["stage"] == "calibrate" and data["status"] == "complete"
    assert Path(data["path"]) == tmp_path / "c"
