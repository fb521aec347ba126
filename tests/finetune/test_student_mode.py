"""The student trains with only its quantizers in training mode: DiT's class-label dropout (active
in diffusers' training mode) made two identical finetune runs of a DiT differ."""

from __future__ import annotations

import sys
from pathlib import Path

from typer.testing import CliRunner

from lowbitdm_cli.cli import app

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from family_builders import build_dit  # noqa: E402

SETS = [a for s in ["calibrate.num_samples=2", "calibrate.batch_size=2", "sample.steps=3", "finetune.epochs=1",
                    "finetune.batch_size=4", "finetune.steps=2"] for a in ("--set", s)]


def test_dit_finetune_is_deterministic(tmp_path: Path) -> None:
    runner = CliRunner()
    model = build_dit(tmp_path / "dit")
    result = runner.invoke(app, ["calibrate", "--model", str(model), "--bits", "w4a8", *SETS,
                                 "--out", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    for out in ("a", "b"):
        result = runner.invoke(app, ["finetune", str(tmp_path / "cal"), "--method", "qalora",
                                     "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a/quant_state.safetensors").read_bytes() == (tmp_path / "b/quant_state.safetensors").read_bytes()
