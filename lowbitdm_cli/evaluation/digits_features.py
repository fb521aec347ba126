"""`digits-features`: the embedded model's evaluator (no Inception weights needed).

A small CNN classifier trained on the digits train split. Its 64-d penultimate
embedding gives FID-digits (the FID formula on our features) and its predictions give
the class accuracy of class-conditional samples. Retrain with::

    python -m lowbitdm_cli.evaluation.digits_features train

which writes ``digits_classifier.safetensors`` and ``digits_ref_stats.safetensors``
(mean and covariance of the train split's features) into the weights folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lowbitdm_cli.evaluation.frechet import feature_statistics, frechet_distance
from lowbitdm_cli.models.digits import NUM_CLASSES, WEIGHTS_DIR, load_digits_split

__all__ = ["DigitsClassifier", "DigitsEvaluator", "train_digits_classifier"]

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """conv32 → conv64/2 → conv64/2 → fc64 (features) → fc10, on [N, 1, 16, 16] in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (before its ReLU, so no dimension is dead), [N, 64]."""
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.fc1(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.features(x)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    shift = torch.randint(-1, 2, (2,), generator=gen)
    return torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))


def train_digits_classifier(out_dir: Path = WEIGHTS_DIR, epochs: int = 40, seed: int = 0) -> dict:
    """Train the classifier on the train split, then write weights and reference statistics."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_split()
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = len(data.train_labels)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            x = _augment(data.train_images[idx], gen)
            loss = F.cross_entropy(model(x), data.train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data.held_out_images).argmax(1) == data.held_out_labels).float().mean().item()
        mu, sigma = feature_statistics(model.features(data.train_images).double().numpy())
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "digits_classifier.safetensors"))
    save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)},
              str(out_dir / "digits_ref_stats.safetensors"),
              metadata={"reference": "digits train split", "num_images": str(n)})
    info = {"held_out_accuracy": acc, "epochs": epochs, "seed": seed}
    (out_dir / "digits_classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


class DigitsEvaluator:
    """FID-digits and class accuracy of images against the shipped train-split statistics."""

    def __init__(self, weights_dir: Path = WEIGHTS_DIR) -> None:
        self.model = DigitsClassifier()
        self.model.load_state_dict(load_file(str(weights_dir / "digits_classifier.safetensors")))
        self.model.eval()
        stats = load_file(str(weights_dir / "digits_ref_stats.safetensors"))
        self.ref_mu, self.ref_sigma = stats["mu"].numpy(), stats["sigma"].numpy()

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """`images`: float in [-1, 1] [N, 1, 16, 16] or uint8 [N, 16, 16, 1]/[N, 1, 16, 16]."""
        x = to_model_range(images)
        feats, logits = [], []
        for i in range(0, len(x), batch_size):
            f = self.model.features(x[i:i + batch_size])
            feats.append(f.double())
            logits.append(self.model.fc2(F.relu(f)))
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Return ``fid_digits`` and, when `labels` are given, ``class_accuracy``."""
        return self.evaluate_with_stats(images, labels)[0]

    def evaluate_with_stats(self, images: torch.Tensor, labels: torch.Tensor | None = None
                            ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """`evaluate` plus the samples' feature mean and covariance, from one classifier pass."""
        feats, logits = self.features_and_logits(images)
        mu, sigma = feature_statistics(feats)
        out = {"fid_digits": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma), "num_images": float(len(feats))}
        if labels is not None:
            pred = torch.from_numpy(logits).argmax(1)
            out["class_accuracy"] = (pred == torch.as_tensor(labels).long()).float().mean().item()
        return out, mu, sigma

    def evaluate_with_intervals(self, images: torch.Tensor, labels: torch.Tensor | None, resamples: int, seed: int,
                                level: float = 0.95) -> tuple[dict[str, float], dict[str, dict], np.ndarray,
                                                              np.ndarray]:
        """`evaluate_with_stats` plus 95 % intervals (`MetricInterval` fields): FID-digits by the
        double bootstrap over the samples' features (none when `resamples` < 2), class
        accuracy by Wilson (see `lowbitdm_cli.evaluation.intervals`)."""
        from lowbitdm_cli.evaluation.intervals import frechet_interval, wilson_interval

        feats, logits = self.features_and_logits(images)
        mu, sigma = feature_statistics(feats)
        out = {"fid_digits": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma), "num_images": float(len(feats))}
        intervals: dict[str, dict] = {}
        if resamples >= 2:
            intervals["fid_digits"] = frechet_interval(out["fid_digits"], feats, self.ref_mu, self.ref_sigma,
                                                       resamples, seed, level)
        if labels is not None:
            hit = torch.from_numpy(logits).argmax(1) == torch.as_tensor(labels).long()
            right = int(hit.sum())
            out["class_accuracy"] = hit.float().mean().item()  # as `evaluate_with_stats`
            low, high = wilson_interval(right, len(feats), level)
            intervals["class_accuracy"] = {"low": low, "high": high, "level": level, "method": "wilson"}
        return out, intervals, mu, sigma


def to_model_range(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 NHWC/NCHW or float [-1, 1] NCHW → float [-1, 1] NCHW with one channel."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        x = x.float() / 127.5 - 1.0
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (16, 16):
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x.float()


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the classifier and write reference statistics")
    tr.add_argument("--epochs", type=int, default=40)
    tr.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args()
    print(json.dumps(train_digits_classifier(args.out, epochs=args.epochs), indent=2))


if __name__ == "__main__":
    _main()
