"""The shipped adapter (tests/fixtures/lora, `training.digits_lora`): it loads onto the digits UNet, it
thickens the strokes it was trained to thicken, and its training command runs and learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lowbitdm_cli.adapters.branch import LoRABranch, attach_loras
from lowbitdm_cli.adapters.lora_file import Adapter, match_adapter
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.sampling import SamplerSettings, ddim_sample, to_uint8
from lowbitdm_cli.training.digits_lora import TARGET_SUFFIXES, dilate, train_digits_lora

FIXTURE = Path(__file__).parents[1] / "fixtures" / "lora" / "digits_thick_lora.safetensors"


def test_dilate_is_a_cross_dilation() -> None:
    x = torch.full((1, 1, 5, 5), -1.0)
    x[0, 0, 2, 2] = 1.0
    y = dilate(x)[0, 0]
    cross = {(2, 2), (1, 2), (3, 2), (2, 1), (2, 3)}
    assert {(i, j) for i in range(5) for j in range(5) if y[i, j] == 1.0} == cross
    assert (dilate(x) >= x).all()


def test_shipped_adapter_matches_every_target_of_the_digits_unet() -> None:
    den = load_model("digits").denoiser
    pairs = match_adapter(den, Adapter(FIXTURE))
    expected = {n for n, _ in den.named_modules() if n.endswith(TARGET_SUFFIXES)}
    assert set(pairs) == expected
    assert all(p.alpha == p.rank for p in pairs.values())  # adapter_config.json: scale 1 applies B·A as trained


def test_shipped_adapter_thickens_the_strokes() -> None:
    """FP digits with the adapter have more ink than without (same seeds, 20 samples, 10 DDIM steps)."""
    plain, lora = load_model("digits"), load_model("digits")
    attach_loras(lora.denoiser, [FIXTURE])
    settings = SamplerSettings(steps=10, eta=0.0, guidance=2.0, clip_x0=True)
    labels = torch.arange(20) % 10
    with torch.no_grad():
        a, b = (to_uint8(ddim_sample(m, labels, list(range(20)), 0, settings)).astype(np.float64) for m in (plain, lora))
    assert b.mean() > a.mean() * 1.05, (a.mean(), b.mean())


def test_training_command_learns(tmp_path: Path) -> None:
    path = train_digits_lora(tmp_path, steps=3, rank=2, batch_size=4)
    tensors = load_file(str(path))
    ups = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert ups and any(v.abs().max() > 0 for v in ups)  # B starts at zero; three steps moved it
    model = load_model("digits")
    attach_loras(model.denoiser, [path])
    assert sum(isinstance(m, LoRABranch) for m in model.denoiser.modules()) == len(ups)
