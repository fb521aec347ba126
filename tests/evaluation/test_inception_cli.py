"""`lowbitdm evaluate` with Inception metrics end to end, on randomly initialised Inception weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact, ModelRef, StageRun, sha256_file
from lowbitdm_cli.cli import app
from lowbitdm_cli.npz import write_npz

ALL_METRICS = "fid,sfid,is,precision,recall,kid"


def _ok(result) -> None:  # noqa: ANN001
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def _one_line_error(result, *needles: str) -> str:  # noqa: ANN001
    assert result.exit_code == 2, f"exit code {result.exit_code}, exception {result.exception!r}:\n{result.output}"
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("samples") / "sample"
    _ok(CliRunner().invoke(app, ["sample", "tiny-random", "--set", "sample.num_samples=6", "--set",
                                 "sample.batch_size=3", "--set", "sample.steps=2", "--out", str(out)]))
    return out


@pytest.fixture(scope="module")
def ref_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    write_npz(path, {"arr_0": np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)})
    return path


def _evaluate(runner: CliRunner, samples: Path, out: Path, *extra: str) -> Artifact:
    _ok(runner.invoke(app, ["evaluate", str(samples), "--out", str(out), *extra]))
    return Artifact.open(out)


def test_all_metrics_run_and_are_deterministic(runner: CliRunner, tiny_samples: Path, ref_images: Path,
                                               inception_weights: Path, tmp_path: Path) -> None:
    args = ["--metric", ALL_METRICS, "--metric", "fid_digits", "--ref", str(ref_images),
            "--inception-weights", str(inception_weights), "--device", "cpu"]
    first = _evaluate(runner, tiny_samples, tmp_path / "a", *args)
    second = _evaluate(runner, tiny_samples, tmp_path / "b", *args)
    m = first.manifest
    assert set(m.metrics) == {"fid", "sfid", "is", "precision", "recall", "kid", "fid_digits"}
    assert m.metrics == second.manifest.metrics  # bit-identical
    assert m.files["inception_stats.safetensors"].sha256 == second.manifest.files["inception_stats.safetensors"].sha256
    assert m.metrics["fid"] > 0 and m.metrics["sfid"] > 0 and m.metrics["is"] >= 1.0
    assert 0.0 <= m.metrics["precision"] <= 1.0 and 0.0 <= m.metrics["recall"] <= 1.0
    info = m.info["inception"]
    assert info["backend"] == "pytorch-fid" and info["mode"] == "legacy_pytorch"
    assert info["weights_sha256"] == sha256_file(inception_weights) and info["official_weights"] is False
    assert info["num_samples"] == 6 and info["is_split_size"] == 5000 and info["precision_recall_k"] == 3
    assert info["reference"]["sha256"] == sha256_file(ref_images) and info["reference"]["num_images"] == 6
    assert info["reference"]["statistics"] == {"pool": "images", "spatial": "images"}
    assert m.info["evaluator"] == "digits-features+inception"
    stats = first.tensors("inception_stats.safetensors")
    assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (2023, 2023)
    # other weights are other inputs: the artifact is not reused
    shown = runner.invoke(app, ["--json", "show", str(tmp_path / "a")])
    _ok(shown)
    assert json.loads(shown.stdout)["info"]["inception"]["weights_sha256"] == info["weights_sha256"]


def test_make_ref_then_evaluate(runner: CliRunner, tiny_samples: Path, ref_images: Path, inception_weights: Path,
                                tmp_path: Path) -> None:
    weights = ["--inception-weights", str(inception_weights), "--device", "cpu"]
    result = runner.invoke(app, ["--json", "evaluate", str(ref_images), "--make-ref", "--out",
                                 str(tmp_path / "made.npz"), *weights])
    _ok(result)
    summary = json.loads(result.stdout)
    assert summary["num_images"] == 6 and summary["extractor"]["weights_sha256"] == sha256_file(inception_weights)
    direct = _evaluate(runner, tiny_samples, tmp_path / "direct", "--metric", "fid,precision", "--ref",
                       str(ref_images), *weights).manifest
    made = _evaluate(runner, tiny_samples, tmp_path / "made", "--metric", "fid,precision", "--ref",
                     str(tmp_path / "made.npz"), *weights).manifest
    assert made.info["inception"]["reference"]["statistics"] == {"pool": "features"}  # the file's stored features
    assert made.metrics == direct.metrics  # the same features as computing them from the images now
    again = runner.invoke(app, ["evaluate", str(ref_images), "--make-ref", "--out", str(tmp_path / "made.npz"),
                                *weights])
    _one_line_error(again, "already exists", "--force")


def test_evaluate_errors(runner: CliRunner, tiny_samples: Path, ref_images: Path, inception_weights: Path,
                         tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "e")]
    _one_line_error(runner.invoke(app, ["evaluate", str(tiny_samples), "--metric", "fid", *out]),
                    "pt_inception-2015-12-05-6726825d.pth", "https://", "--inception-weights")
    weights = ["--inception-weights", str(inception_weights)]
    _one_line_error(runner.invoke(app, ["evaluate", str(tiny_samples), "--metric", "fid,bogus", *weights, *out]),
                    "unknown metric bogus", "sfid")
    _one_line_error(runner.invoke(app, ["evaluate", str(tiny_samples), "--metric", "sfid", "--backend", "clean-fid",
                                        "--inception-weights", str(tmp_path / "x.pt"), *out]), "do not exist")
    _one_line_error(runner.invoke(app, ["evaluate", str(tiny_samples), "--metric", "fid", "--ref",
                                        str(tmp_path / "missing"), *weights, *out]), "does not exist")
    _one_line_error(runner.invoke(app, ["evaluate", str(ref_images), "--make-ref", *weights]), "--make-ref needs --out")
    # a paper model's samples have no default reference
    ref = ModelRef(name="ldm-4", source="embedded", digest="0" * 64)
    fake = StageRun.start(tmp_path / "ldm_sample", "sample", ref, {}).commit([])
    _one_line_error(runner.invoke(app, ["evaluate", str(fake.path), *weights, *out]), "need a reference", "--ref")
    _one_line_error(runner.invoke(app, ["evaluate", str(fake.path), "--metric", "fid_digits", *weights, *out]),
                    "digits-features")
    assert not (tmp_path / "e").exists()


def test_clean_fid_backend_refuses_sfid(runner: CliRunner, tiny_samples: Path, cleanfid_weights: Path,
                                        tmp_path: Path) -> None:
    base = ["evaluate", str(tiny_samples), "--backend", "clean-fid", "--inception-weights", str(cleanfid_weights),
            "--device", "cpu"]
    _one_line_error(runner.invoke(app, [*base, "--metric", "sfid", "--out", str(tmp_path / "e")]),
                    "pytorch-fid backend")
    art = _evaluate(runner, tiny_samples, tmp_path / "is", *base[2:], "--metric", "is")
    assert art.manifest.info["inception"]["backend"] == "clean-fid"
    assert art.manifest.info["inception"]["mode"] == "clean" and art.manifest.metrics["is"] >= 1.0
