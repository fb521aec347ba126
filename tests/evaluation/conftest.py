"""Inception fixtures: randomly initialised FID-Inception weights (the real ones cannot be downloaded here)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def random_fid_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """pytorch-fid's FID Inception with seeded He-normal weights, so features are O(1), not ~1e-8."""
    from lowbitdm_cli.evaluation.inception import build_fid_inception

    torch.manual_seed(seed)
    net = build_fid_inception()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .pth state dict in pytorch-fid's format (random weights, seed 0)."""
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    torch.save(random_fid_inception_state(0), path)
    return path


@pytest.fixture(autouse=True)
def _no_weights_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests see only the weights they pass: no env variables, an empty torch hub cache."""
    monkeypatch.delenv("LOWBITDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("LOWBITDM_CLEANFID_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


class TorchScriptInception(nn.Module):
    """A small stand-in with the interface of clean-fid's TorchScript `inception-2015-12-05.pt`
    (StyleGAN2-ADA's): a `layers` module mapping normalised 299x299 input to pool3, and
    forward(img in [0, 255], return_features, use_fp16, no_output_bias) → pool3 or probabilities."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Conv2d(3, 2048, 5, stride=30), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False)
        feats = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return feats
        logits = feats @ self.output.weight.T
        if not no_output_bias:
            logits = logits + self.output.bias
        return torch.softmax(logits, dim=1)


@pytest.fixture(scope="session")
def cleanfid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file with the interface of clean-fid's inception-2015-12-05.pt (random weights)."""
    path = tmp_path_factory.mktemp("cleanfid") / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; clean-fid's file is one
        torch.jit.save(torch.jit.script(TorchScriptInception().eval()), str(path))
    return path
