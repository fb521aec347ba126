"""The embedded diffusion transformer `digits-dit`: it loads with no network, and the transformer
recipe runs the whole chain on it through the CLI (integer runtime == fake-quantized, bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from lowbitdm_cli.cli import app
from lowbitdm_cli.models.registry import evaluator_of, load_model

SETS = ["calibrate.num_samples=4", "calibrate.batch_size=4", "finetune.epochs=1", "finetune.batch_size=2",
        "sample.num_samples=6", "sample.batch_size=6", "sample.steps=4", "calibrate.max_values_per_step=2000"]


def test_digits_dit_is_embedded() -> None:
    model = load_model("digits-dit")
    assert type(model.denoiser).__name__ == "DiTTransformer2DModel"
    assert (model.num_classes, model.null_class, model.sample_shape) == (10, 10, (1, 16, 16))
    assert evaluator_of("digits-dit") == "digits-features"
    with torch.no_grad():
        eps = model.eps(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), 500,
                        torch.tensor([1, 7]), 1.25)
    assert torch.isfinite(eps).all() and eps.std() > 0.1


def test_transformer_recipe_runs_the_chain_on_digits_dit(tmp_path: Path) -> None:
    args = ["--json", "run", "--model", "digits-dit", "--recipe", "efficientdm-tx", "--bits", "w4a4",
            "--runs-dir", str(tmp_path), "--no-fp-cache", *[a for s in SETS for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "digits-dit-efficientdm-tx-w4a4"
    layers = json.loads((run / "merge" / "quantization_config.json").read_text())["layers"]
    per_token = [n for n, e in layers.items() if (e.get("input_activations") or {}).get("strategy") == "token"]
    assert per_token and all(".attn1." in n or ".ff." in n for n in per_token)
    # the integer runtime's samples equal the fake-quantized model's, bit for bit
    fake = CliRunner().invoke(app, ["sample", str(run / "merge"), "--runtime", "fake", "--out", str(tmp_path / "fake"),
                                    *[a for s in SETS for a in ("--set", s)]])
    assert fake.exit_code == 0, fake.output
    a, b = np.load(run / "sample" / "samples.npz"), np.load(tmp_path / "fake" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"])
