"""The tiny families' chain on an accelerator against the CPU: `pytest tests/test_device.py --device cuda`.

`benchmarks/gpu_check.sh` runs these on a GPU; with the default `--device cpu` they skip (there
is nothing to compare). For tiny-random, a class-conditional LDM, Stable Diffusion (CLIP prompts)
and DiT: calibrate (ptq, W4A8), finetune (EfficientDM, with activation checkpointing and, on the
GPU, a bf16 teacher as a second run), merge, then sample the merged checkpoint on the device with
the integer runtime (`torch._int_mm` on CUDA) and the fake-quantized one. TF32 is off so float32
sums of integer values stay exact, as on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.npz import read_npz

sys.path.insert(0, str(Path(__file__).parent / "models"))
from family_builders import build_class_ldm, build_dit, build_sd  # noqa: E402

SETS = ["calibrate.num_samples=2", "calibrate.batch_size=2", "sample.num_samples=4", "sample.batch_size=2",
        "sample.steps=3", "finetune.epochs=2", "finetune.batch_size=2", "finetune.steps=2"]
KINDS = ["tiny-random", "ldm-class", "sd", "dit"]


@pytest.fixture(autouse=True)
def _needs_accelerator(device: str) -> None:
    if device == "cpu":
        pytest.skip("compares a device against the CPU: run with --device cuda (benchmarks/gpu_check.sh)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _ok(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}\n{result.exception!r}"


def _chain(model: str, prompts: list[str], run: Path, device: str, extra: list[str] = ()) -> None:
    sets = [a for s in SETS for a in ("--set", s)]
    _ok(["calibrate", "--model", model, "--bits", "w4a8", "--recipe", "ptq", *sets, *prompts, "--device", device,
         "--out", str(run / "calibrate")])
    _ok(["finetune", str(run / "calibrate"), "--method", "qalora", "--grad-checkpoint", "--device", device, *extra,
         "--out", str(run / "finetune")])
    _ok(["merge", str(run / "finetune"), "--out", str(run / "merge")])
    for runtime in ("int", "fake"):
        _ok(["sample", str(run / "merge"), "--runtime", runtime, "--device", device, "--out", str(run / runtime)])


@pytest.mark.parametrize("kind", KINDS)
def test_chain_on_device_matches_cpu(kind: str, device: str, tmp_path: Path) -> None:
    model, prompts = "tiny-random", []
    if kind != "tiny-random":
        model = str({"ldm-class": build_class_ldm, "sd": build_sd, "dit": build_dit}[kind](tmp_path / kind))
    if kind == "sd":
        (tmp_path / "prompts.txt").write_text("a cat\na red dog\n")
        prompts = ["--prompts", str(tmp_path / "prompts.txt")]
    _chain(model, prompts, tmp_path / "cpu", "cpu")
    _chain(model, prompts, tmp_path / "dev", device)

    # The float tolerances in this file (1e-3, rel 0.05, 95 % of pixels, rel 0.1) compare two devices' float
    # kernels over whole trajectories and training runs; they are not derived (issue 25 lists them as
    # machine-measured) and stay until they can be replaced and checked on a GPU run.
    xs_cpu = Artifact.open(tmp_path / "cpu/calibrate").tensors("calib_data.safetensors")["xs"].double()
    xs_dev = Artifact.open(tmp_path / "dev/calibrate").tensors("calib_data.safetensors")["xs"].double()
    assert ((xs_dev - xs_cpu).norm() / xs_cpu.norm()).item() < 1e-3  # FP trajectories: float kernels differ only
    loss_cpu, loss_dev = (Artifact.open(tmp_path / f"{d}/finetune").manifest.info["loss_history"] for d in ("cpu", "dev"))
    assert loss_dev == pytest.approx(loss_cpu, rel=0.05)
    images = {d: {r: read_npz(tmp_path / d / r / "samples.npz")["arr_0"] for r in ("int", "fake")} for d in ("cpu", "dev")}
    assert np.array_equal(images["dev"]["int"], images["dev"]["fake"])  # integer kernels = fake quantization, bit for bit
    assert np.array_equal(images["cpu"]["int"], images["cpu"]["fake"])
    # the CPU's merged checkpoint sampled on the device with integer kernels
    _ok(["sample", str(tmp_path / "cpu/merge"), "--runtime", "int", "--device", device, "--out", str(tmp_path / "x")])
    moved = read_npz(tmp_path / "x/samples.npz")["arr_0"].astype(int)
    close = (np.abs(moved - images["cpu"]["int"].astype(int)) <= 1).mean()
    assert close >= 0.95, f"only {close:.1%} of pixels within one grey level of the CPU's"


def test_bf16_teacher_on_device(device: str, tmp_path: Path) -> None:
    """A bf16-autocast teacher: an input of the stage (its own digest), a result close to float32's."""
    _chain("tiny-random", [], tmp_path / "fp32", device)
    sets = [a for s in SETS for a in ("--set", s)]
    _ok(["finetune", str(tmp_path / "fp32/calibrate"), "--method", "qalora", *sets, "--device", device,
         "--teacher-dtype", "bf16", "--out", str(tmp_path / "bf16")])
    a, b = Artifact.open(tmp_path / "fp32/finetune"), Artifact.open(tmp_path / "bf16")
    assert a.manifest.inputs_digest != b.manifest.inputs_digest and b.manifest.info["teacher_dtype"] == "bf16"
    assert b.manifest.info["loss_history"] == pytest.approx(a.manifest.info["loss_history"], rel=0.1)
