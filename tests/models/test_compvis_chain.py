"""CompVis checkpoints (model.ckpt + config.yaml) through the whole CLI chain.

Tiny CompVis-layout models from `test_compvis`'s builders: cin256 (class embedding as the
cross-attention context, CFG with the null class 1000), LSUN-Bedroom (unconditional VQ-f4)
and LSUN-Church (`CompVisUNet2DModel` with per-level heads, KL-f8, scale_by_std), loaded by
registry name from $LOWBITDM_MODELS_DIR or by path, then calibrate → finetune → merge → sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_compvis import bedroom_config, build, church_config, cin_config, save
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.export.checkpoint import CONFIG_NAME
from lowbitdm_cli.npz import read_npz

SETS = ["calibrate.num_samples=2", "calibrate.batch_size=2", "sample.num_samples=2", "sample.batch_size=2",
        "sample.steps=2", "finetune.epochs=1", "finetune.batch_size=2", "finetune.steps=2"]
CASES = {"ldm-4": (cin_config, (2, 32, 32, 3)), "ldm-bedroom": (bedroom_config, (2, 32, 32, 3)),
         "ldm-church": (church_config, (2, 128, 128, 3))}


def _ok(result, what: str) -> None:  # noqa: ANN001
    assert result.exit_code == 0, f"{what} failed ({result.exit_code}):\n{result.output}\n{result.exception!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_compvis_chain(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make, image_shape = CASES[name]
    config = make()
    state = build(config).state_dict()
    if name == "ldm-church":
        state["scale_factor"] = torch.tensor(0.2277)  # scale_by_std: the measured factor is a buffer
    save(tmp_path / "models" / name, config, state)
    monkeypatch.setenv("LOWBITDM_MODELS_DIR", str(tmp_path / "models"))
    runner = CliRunner()
    sets = [a for s in SETS for a in ("--set", s)]
    run = tmp_path / "run"
    for args in (["calibrate", "--model", name, "--bits", "w4a8", *sets, "--out", str(run / "calibrate")],
                 ["finetune", str(run / "calibrate"), "--method", "qalora"],
                 ["merge", str(run / "finetune")],
                 ["sample", str(run / "merge")]):
        _ok(runner.invoke(app, args), f"{name} {args[0]}")
    ref = Artifact.open(run / "calibrate").manifest.model
    assert (ref.name, ref.source) == (name, str(tmp_path / "models" / name))
    cfg = json.loads((run / "merge" / CONFIG_NAME).read_text())
    unet = {"ldm-4": "UNet2DConditionModel", "ldm-bedroom": "UNet2DModel", "ldm-church": "CompVisUNet2DModel"}
    assert cfg["model"]["architecture"] == unet[name]
    data = read_npz(run / "sample" / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == image_shape
    _ok(runner.invoke(app, ["sample", str(run / "merge"), "--runtime", "fake", "--out", str(tmp_path / "fake")]),
        "sample --runtime fake")
    assert np.array_equal(data["arr_0"], read_npz(tmp_path / "fake" / "samples.npz")["arr_0"])  # integer-exact
    if name == "ldm-4":
        assert data["labels"].tolist() == [0, 1]
        assert Artifact.open(run / "sample").manifest.recipe["sample"]["guidance"] == 3.0  # CFG with class 1000
    else:
        assert "labels" not in data
