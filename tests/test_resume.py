"""kill -9 in the middle of a stage, then --resume: the result equals an uninterrupted run, byte for byte.

The interrupted run is a real `python -m lowbitdm_cli` process killed with SIGKILL as soon as its
first checkpoint file appears; the resumed and the uninterrupted runs go through the CLI in-process
(with the stage's work function counted, to check that resuming reuses the checkpoints).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lowbitdm_cli.stages.calibrate as calibrate_stage
import lowbitdm_cli.stages.sample as sample_stage
from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.errors import ArtifactError

STARTUP_TIMEOUT_S = 120  # the killed process must write its first checkpoint within this
TEST_TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    """Fail (rather than hang) a test that runs far longer than it should."""

    def expired(*_: object) -> None:
        raise TimeoutError(f"test ran longer than {TEST_TIMEOUT_S}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _kill_at_first_checkpoint(args: list[str], checkpoint: Path, log: Path) -> None:
    """Run `lowbitdm ARGS` in a subprocess and SIGKILL it once `checkpoint` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "lowbitdm_cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not checkpoint.exists():
            if proc.poll() is not None:
                pytest.fail(f"lowbitdm exited ({proc.returncode}) before writing {checkpoint.name}:\n"
                            f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {checkpoint.name} after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        f"lowbitdm finished (rc {proc.returncode}) before it could be killed: give it more work")


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Wrap `module.name` so each call appends to the returned list."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _check_killed(out: Path, part_glob: str) -> int:
    """The kill left only a partial folder that nothing accepts; returns how many parts it holds."""
    partial = out.with_name(out.name + ".partial")
    assert partial.is_dir() and not out.exists()
    with pytest.raises(ArtifactError, match="--resume"):
        Artifact.open(partial)
    with pytest.raises(ArtifactError, match="--resume"):
        Artifact.open(out)
    return len(list(partial.glob(part_glob)))


def _rerun_without_resume_refused(runner: CliRunner, args: list[str], out: Path, part_glob: str, parts: int) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--resume" in errors[0], result.output
    assert len(list(out.with_name(out.name + ".partial").glob(part_glob))) == parts  # left untouched


def _files(out: Path) -> dict[str, str]:
    return {name: entry.sha256 for name, entry in Artifact.open(out).manifest.files.items()}


def test_calibrate_kill_and_resume(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    num_batches = 6
    common = ["calibrate", "--model", "tiny-random", "--bits", "w4a8", "--recipe", "ptq",
              "--set", "calibrate.num_samples=12", "--set", "calibrate.batch_size=2", "--set", "sample.steps=8"]
    out = tmp_path / "killed"
    args = [*common, "--out", str(out)]
    _kill_at_first_checkpoint(args, out.with_name("killed.partial") / "calib_part_0000.safetensors",
                              tmp_path / "killed.log")
    parts = _check_killed(out, "calib_part_*.safetensors")
    assert 1 <= parts < num_batches
    _rerun_without_resume_refused(runner, args, out, "calib_part_*.safetensors", parts)

    # a partial folder started with other inputs is not silently continued with these
    result = runner.invoke(app, [*args, "--set", "calibrate.seed=7", "--resume"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "other inputs" in errors[0] and "--force" in errors[0], result.output

    calls = _count_calls(monkeypatch, calibrate_stage, "collect_batch")
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert len(calls) == num_batches - parts  # the checkpointed batches were not recomputed
    assert not out.with_name("killed.partial").exists()

    calls.clear()
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "straight")])
    assert result.exit_code == 0, result.output
    assert len(calls) == num_batches

    resumed, straight = _files(out), _files(tmp_path / "straight")
    assert set(resumed) == {"calib_data.safetensors", "quant_state.safetensors"}
    assert resumed == straight
    assert Artifact.open(out).manifest.inputs_digest == Artifact.open(tmp_path / "straight").manifest.inputs_digest


def test_sample_kill_and_resume(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                calibrated: Artifact) -> None:
    num_shards = 8
    common = ["sample", str(calibrated.path), "--set", "sample.num_samples=32", "--set", "sample.batch_size=4",
              "--set", "sample.steps=8"]
    out = tmp_path / "killed"
    args = [*common, "--out", str(out)]
    _kill_at_first_checkpoint(args, out.with_name("killed.partial") / "shard_00000.safetensors",
                              tmp_path / "killed.log")
    parts = _check_killed(out, "shard_*.safetensors")
    assert 1 <= parts < num_shards
    _rerun_without_resume_refused(runner, args, out, "shard_*.safetensors", parts)

    calls = _count_calls(monkeypatch, sample_stage, "run_sampler")
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert len(calls) == num_shards - parts
    assert not out.with_name("killed.partial").exists()

    calls.clear()
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "straight")])
    assert result.exit_code == 0, result.output
    assert len(calls) == num_shards

    resumed, straight = _files(out), _files(tmp_path / "straight")
    assert set(resumed) == {"samples.npz", "grid.png"}
    assert resumed == straight

