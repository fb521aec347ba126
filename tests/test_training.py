"""Training entry points live in lowbitdm_cli.training, outside what loading a model imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_loading_models_imports_no_training_code() -> None:
    code = ("import sys; from lowbitdm_cli.models.registry import load_model; load_model('digits'); "
            "import lowbitdm_cli.evaluation.digits_features; "
            "print(sorted(m for m in sys.modules if m.startswith('lowbitdm_cli.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_digits_unet_training_command_writes_weights(tmp_path: Path) -> None:
    from lowbitdm_cli.training.digits_unet import main

    main(["--steps", "2", "--batch-size", "4", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "digits_unet.json").read_text())
    assert meta["training"]["completed_steps"] == 2 and (tmp_path / "digits_unet.safetensors").is_file()


def test_former_training_command_still_works(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "lowbitdm_cli.models.digits", "train", "--steps", "1",
                          "--batch-size", "2", "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "digits_unet.safetensors").is_file()


def test_digits_dit_training_command_writes_loadable_weights(tmp_path: Path) -> None:
    from lowbitdm_cli.models.digits import load_digits_dit
    from lowbitdm_cli.training.digits_dit import main

    main(["--steps", "2", "--batch-size", "4", "--out", str(tmp_path)])
    model, meta = load_digits_dit(tmp_path)
    assert meta["training"]["completed_steps"] == 2 and type(model).__name__ == "DiTTransformer2DModel"


def test_validation_model_folder_loads_with_the_digits_evaluator(tmp_path: Path) -> None:
    """A validation model is a plain diffusers folder whose model_index.json names the digits
    evaluator and sampler: `--model PATH` scores it like the embedded models."""
    import torch

    from lowbitdm_cli.models.registry import MODELS, evaluator_of, load_model, sampler_defaults
    from lowbitdm_cli.training.validation_models import main

    main(["--models", "digits-dit-val", "--steps", "1", "--out", str(tmp_path)])
    folder = tmp_path / "digits-dit-val"
    model = load_model(str(folder))
    assert (model.num_classes, model.null_class, model.sample_shape) == (10, 10, (1, 16, 16))
    assert evaluator_of(str(folder)) == "digits-features"
    assert sampler_defaults(str(folder)) == MODELS["digits-dit"].sampler  # the DiT's own, CFG 1.35
    with torch.no_grad():
        eps = model.eps(torch.zeros(2, 1, 16, 16), 500, torch.tensor([3, 10]), 1.25)
    assert eps.shape == (2, 1, 16, 16) and torch.isfinite(eps).all()
