"""The shipped digits evaluator: accuracy on the held-out split and the FID-digits floor."""

import numpy as np
import pytest
import torch

from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator, to_model_range
from lowbitdm_cli.models.digits import load_digits_split


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_split_is_fixed_and_disjoint(split):
    assert split.train_images.shape == (1497, 1, 16, 16)
    assert split.held_out_images.shape == (300, 1, 16, 16)
    assert torch.bincount(split.held_out_labels).tolist() == [30] * 10
    assert split.train_images.min() >= -1 and split.train_images.max() <= 1
    again = load_digits_split()
    assert torch.equal(again.held_out_images, split.held_out_images)


def test_classifier_accuracy_on_held_out(evaluator, split):
    result = evaluator.evaluate(split.held_out_images, split.held_out_labels)
    assert result["class_accuracy"] >= 0.97  # the shipped classifier's quality (298 of 300)
    # and that count is the same on every CPU: each prediction wins by a logit gap far beyond float32
    # rounding of this small CNN (1e-3 of the largest logit is > 100x its float32 error)
    _, logits = evaluator.features_and_logits(split.held_out_images)
    top2 = torch.as_tensor(logits).topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3 * top2.abs().max()


def test_fid_floor_and_sensitivity(evaluator, split):
    floor = evaluator.evaluate(split.held_out_images)["fid_digits"]
    noisy = (split.held_out_images + 0.5 * torch.randn_like(split.held_out_images)).clamp(-1, 1)
    assert evaluator.evaluate(noisy)["fid_digits"] > 3 * floor
    # the train split against its own (shipped) statistics is (numerically) zero: FID is second order in a
    # feature perturbation, so float32 differences between CPUs (~1e-6 of the features) add ~1e-12 of tr Σ,
    # and float64 sqrtm ~1e-10; 1e-3 is far above both and far below any other image set (floor: ~33)
    assert abs(evaluator.evaluate(split.train_images)["fid_digits"]) < 1e-3


def test_uint8_nhwc_input_matches_float(evaluator, split):
    x = split.held_out_images[:50]
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    back = to_model_range(u8)
    assert back.shape == x.shape
    assert (back - x).abs().max() <= 1 / 127.5 + 1e-6  # one grey level, plus < 16 u32 for (x + 1)·127.5 and back
    a, _ = evaluator.features_and_logits(u8)
    assert np.isfinite(a).all() and a.shape == (50, 64)
