"""Inception-v3 features for FID, sFID, IS, precision/recall and KID, from local weight files only.

Two backends, both the TF `inception-2015-12-05` network that the ADM suite, pytorch-fid and
clean-fid use, differing in the port and the resizing to 299×299:

- ``pytorch-fid`` (mode ``legacy_pytorch``): pytorch-fid's FID Inception
  (`pt_inception-2015-12-05-6726825d.pth`), images scaled to [0, 1], resized by bilinear
  `F.interpolate`, then to [-1, 1], exactly as `pytorch_fid.fid_score` does. Gives all three
  outputs: ``pool`` (pool3, 2048-d), ``spatial`` (ADM's `mixed_6/conv`, i.e. the ReLU output of
  the 1×1 branch of the fourth 17×17 block, `Mixed_6d.branch1x1`, first 7 channels, flattened
  in TF's HWC order: 17·17·7 = 2023-d) and ``probs`` (softmax of pool3 times the final layer's
  weights *without* its bias, 1008 classes, as ADM and StyleGAN compute IS).
- ``clean-fid`` (modes ``clean``: clean-fid's PIL bicubic resize outside the network, and
  ``legacy_tensorflow``: the network's own resize): clean-fid's TorchScript file
  `inception-2015-12-05.pt`. Gives ``pool`` and ``probs`` (the TorchScript's
  ``no_output_bias=True`` output); its intermediate layers are not an interface of that file,
  so sFID needs the pytorch-fid backend.

Weights are never downloaded: the file comes from ``--inception-weights``, an environment
variable, or the place where pytorch-fid / clean-fid would have cached it; otherwise
`WeightsNotFoundError` says where to get it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.artifacts import sha256_file
from lowbitdm_cli.errors import EvaluationError, WeightsNotFoundError
from lowbitdm_cli.evaluation.images import ImageSource, to_rgb

__all__ = [
    "BACKENDS",
    "FEATURE_DIMS",
    "FeatureExtractor",
    "build_fid_inception",
    "extract_features",
    "open_extractor",
    "resolve_device",
    "resolve_weights",
]

# backend → (its modes, default first; which outputs it gives)
BACKENDS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "pytorch-fid": (("legacy_pytorch",), frozenset({"pool", "spatial", "probs"})),
    "clean-fid": (("clean", "legacy_tensorflow"), frozenset({"pool", "probs"})),
}
FEATURE_DIMS = {"pool": 2048, "spatial": 7 * 17 * 17, "probs": 1008}
SPATIAL_CHANNELS = 7

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its sha256 prefix
CLEANFID_FILE = "inception-2015-12-05.pt"
_WHERE = {
    "pytorch-fid": (PYTORCH_FID_FILE, "LOWBITDM_INCEPTION_WEIGHTS",
                    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE),
    "clean-fid": (CLEANFID_FILE, "LOWBITDM_CLEANFID_WEIGHTS",
                  "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + CLEANFID_FILE),
}


def _cache_candidates(backend: str) -> list[Path]:
    """Where the backend's own download would have put the file (used offline if present)."""
    if backend == "pytorch-fid":
        return [Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE]
    return [Path("/tmp") / CLEANFID_FILE]


def resolve_weights(backend: str, path: str | Path | None = None) -> Path:
    """The local weight file of `backend`: `path`, else the environment variable, else the cache."""
    if backend not in BACKENDS:
        raise EvaluationError(f"unknown Inception backend {backend!r}: use one of {', '.join(BACKENDS)}")
    file_name, env, url = _WHERE[backend]
    for given, origin in ((path, "--inception-weights"), (os.environ.get(env) or None, env)):
        if given is None:
            continue
        p = Path(given).expanduser()
        if p.is_dir():
            p = p / file_name
        if not p.is_file():
            raise WeightsNotFoundError(f"Inception weights {p} (from {origin}) do not exist: download {file_name} from "
                                       f"{url} and pass its path")
        return p
    for p in _cache_candidates(backend):
        if p.is_file():
            return p
    raise WeightsNotFoundError(
        f"the {backend} backend needs the Inception weights {file_name}, which are not on this machine and are "
        f"never downloaded: fetch {url} (on any machine with internet), then pass --inception-weights FILE or set "
        f"{env}=FILE")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_fid_inception() -> nn.Module:
    """pytorch-fid's FID Inception architecture with untrained weights (no download).

    The same construction as `pytorch_fid.inception.fid_inception_v3`, minus its
    `load_state_dict_from_url`: torchvision's Inception-v3 with 1008 classes and the
    TF-compatible blocks.
    """
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2, _inception_v3

    net = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise EvaluationError(f"{path} is not a readable state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}): expected {PYTORCH_FID_FILE}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaluationError(f"{path} is not a state dict of tensors: expected {PYTORCH_FID_FILE}")
    return state


@dataclass
class FeatureExtractor:
    """Turns batches of uint8 HWC images into Inception outputs (`pool`, `spatial`, `probs`)."""

    backend: str
    mode: str
    weights: Path
    weights_sha256: str
    device: str
    provides: frozenset[str]
    _run: Callable[[list[np.ndarray], frozenset[str]], dict[str, torch.Tensor]]

    def info(self) -> dict[str, Any]:
        """What a manifest records about the extractor. `official_weights`: the file is pytorch-fid's
        FID Inception (its sha256 starts with the prefix in its name); None for clean-fid."""
        official = self.weights_sha256.startswith(PYTORCH_FID_SHA256_PREFIX) if self.backend == "pytorch-fid" else None
        return {"backend": self.backend, "mode": self.mode, "weights": str(self.weights),
                "weights_sha256": self.weights_sha256, "official_weights": official, "device": self.device}

    def identity(self) -> dict[str, str]:
        """What decides the features (for digests and for matching reference files)."""
        return {"backend": self.backend, "mode": self.mode, "weights_sha256": self.weights_sha256}

    def __call__(self, images: list[np.ndarray], want: frozenset[str]) -> dict[str, torch.Tensor]:
        missing = want - self.provides
        if missing:
            raise EvaluationError(f"the {self.backend} backend does not give {', '.join(sorted(missing))} features")
        with torch.no_grad():
            return self._run([to_rgb(img) for img in images], want)


def _stack(images: list[np.ndarray]) -> list[np.ndarray]:
    """Group a batch into runs of equal size (a folder may mix sizes), keeping the order."""
    groups: list[list[np.ndarray]] = []
    for img in images:
        if groups and groups[-1][0].shape == img.shape:
            groups[-1].append(img)
        else:
            groups.append([img])
    return [np.stack(g) for g in groups]


def _pytorch_fid(weights: Path, device: str) -> Callable[[list[np.ndarray], frozenset[str]], dict[str, torch.Tensor]]:
    net = build_fid_inception()
    try:
        net.load_state_dict(_load_state_dict(weights))
    except RuntimeError as e:
        raise EvaluationError(f"{weights} does not fit pytorch-fid's FID Inception ({str(e).splitlines()[0]}): "
                              f"expected {PYTORCH_FID_FILE}") from None
    net.eval().requires_grad_(False).to(device)
    captured: list[torch.Tensor] = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: captured.append(out))
    stem = [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(3, 2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(3, 2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c]

    def run(images: list[np.ndarray], want: frozenset[str]) -> dict[str, torch.Tensor]:
        # pytorch_fid.InceptionV3 with resize_input and normalize_input (its defaults), per size group
        x = torch.cat([F.interpolate(torch.from_numpy(g).to(device).permute(0, 3, 1, 2).float() / 255.0,
                                     size=(299, 299), mode="bilinear", align_corners=False) for g in _stack(images)])
        x = 2 * x - 1
        captured.clear()
        for layer in stem:
            x = layer(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        out = {"pool": pool}
        if "spatial" in want:  # NCHW → NHWC before flattening: ADM takes spatial[..., :7] of TF's NHWC map
            out["spatial"] = captured[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        if "probs" in want:
            out["probs"] = torch.softmax((pool @ net.fc.weight.T).double(), dim=1)
        return out

    return run


def _clean_fid(weights: Path, device: str, mode: str) -> Callable[[list[np.ndarray], frozenset[str]],
                                                                   dict[str, torch.Tensor]]:
    from cleanfid.resize import build_resizer

    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format of clean-fid's file
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(weights), map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise EvaluationError(f"{weights} is not a TorchScript file ({type(e).__name__}): the clean-fid backend "
                              f"expects {CLEANFID_FILE}") from None
    resize = build_resizer(mode)

    def run(images: list[np.ndarray], want: frozenset[str]) -> dict[str, torch.Tensor]:
        # cleanfid.utils.ResizeDataset + cleanfid.inception_torchscript.InceptionV3W, per size group
        pools, probs = [], []
        for group in _stack([np.asarray(resize(img)) for img in images]):
            x = torch.from_numpy(group.astype(np.float32)).to(device).permute(0, 3, 1, 2)
            if mode == "clean":
                pools.append(net.layers((x - 128) / 128).reshape(len(x), 2048))
            else:
                pools.append(net(x, return_features=True).reshape(len(x), 2048))
            if "probs" in want:
                probs.append(net(x, no_output_bias=True).double())
        out = {"pool": torch.cat(pools)}
        if probs:
            out["probs"] = torch.cat(probs)
        return out

    return run


def open_extractor(backend: str = "pytorch-fid", mode: str | None = None, weights: str | Path | None = None,
                   device: str = "auto") -> FeatureExtractor:
    """Load a backend's Inception from its local weight file (see `resolve_weights`)."""
    if backend not in BACKENDS:
        raise EvaluationError(f"unknown Inception backend {backend!r}: use one of {', '.join(BACKENDS)}")
    modes, provides = BACKENDS[backend]
    mode = mode or modes[0]
    if mode not in modes:
        raise EvaluationError(f"the {backend} backend has mode{'s' if len(modes) > 1 else ''} {', '.join(modes)}, "
                              f"not {mode!r}")
    path = resolve_weights(backend, weights)
    device = resolve_device(device)
    run = _pytorch_fid(path, device) if backend == "pytorch-fid" else _clean_fid(path, device, mode)
    return FeatureExtractor(backend, mode, path, sha256_file(path), device, provides, run)


def extract_features(extractor: FeatureExtractor, source: ImageSource, want: frozenset[str], batch_size: int = 50,
                     progress: Callable[[str, int, int], None] = lambda *_: None, label: str = "inception features"
                     ) -> dict[str, np.ndarray]:
    """All of `source`'s images through `extractor`: {output: float array [N, dim]} (pool, spatial
    as float32 like ADM's activations; probs as float64)."""
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in want}
    for batch in source.batches(batch_size):
        out = extractor(batch, want)
        for k in want:
            v = out[k].cpu()
            parts[k].append(v.numpy() if k == "probs" else v.float().numpy())
        progress(label, len(batch), source.num_images)
    return {k: np.concatenate(v) if v else np.zeros((0, FEATURE_DIMS[k]), np.float32) for k, v in parts.items()}
