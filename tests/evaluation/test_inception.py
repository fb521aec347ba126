"""Inception feature extraction: same features as pytorch-fid / clean-fid on the same weights; offline weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.errors import EvaluationError, WeightsNotFoundError
from lowbitdm_cli.evaluation.images import ArrayImages
from lowbitdm_cli.evaluation.inception import (
    PYTORCH_FID_FILE,
    build_fid_inception,
    extract_features,
    open_extractor,
    resolve_weights,
)

ALL = frozenset({"pool", "spatial", "probs"})
U32 = 2.0**-24  # float32 unit roundoff


def _images(n: int, size: int = 20, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def extractor(inception_weights: Path):  # noqa: ANN201
    return open_extractor("pytorch-fid", weights=inception_weights, device="cpu")


def test_pool_features_match_pytorch_fid(extractor, inception_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_fid.inception as pfi

    # pytorch-fid's own InceptionV3 (resize + normalisation inside), fed our weights instead of its download
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *_, **__: torch.load(inception_weights))
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    imgs = _images(3)
    with torch.no_grad():
        expected = reference(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    ours = extractor(list(imgs), ALL)
    assert ours["pool"].shape == (3, 2048)
    # the same modules on the same input tensor, in the same order: bit for bit on any CPU
    assert torch.equal(ours["pool"], expected)
    assert ours["pool"].abs().mean() > 1e-2  # the test weights give features of a usable scale


def test_spatial_features_are_mixed_6_conv_first_7_channels(extractor, inception_weights: Path) -> None:
    # ADM's mixed_6/conv is the ReLU output of the 1x1 branch of TF's mixed_6 = torchvision's Mixed_6d
    net = build_fid_inception().eval()
    net.load_state_dict(torch.load(inception_weights))
    imgs = _images(2, seed=1)
    x = F.interpolate(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear",
                      align_corners=False) * 2 - 1
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(net, name)(x)
        branch = net.Mixed_6d.branch1x1(x)  # [N, 192, 17, 17]
        pool = extractor(list(imgs), ALL)
    assert branch.shape[1:] == (192, 17, 17)
    nhwc = branch.permute(0, 2, 3, 1)[..., :7]  # TF layout, then the first 7 channels, as ADM does
    assert torch.equal(pool["spatial"], nhwc.reshape(2, -1))  # the same layers on the same input: exact
    assert pool["spatial"].shape == (2, 2023)
    # IS uses the 1008-way softmax of pool3 · W without the bias (ADM, StyleGAN). Reference in float64;
    # ours sums 2048 float32 products: any order is within δ = 2048·u32·Σ|p||w| of the exact logit
    # (Higham's dot-product bound), and logits moved by ≤ δ move each softmax entry by a factor ≤ e^{±2δ}.
    p64, w64 = pool["pool"].double(), net.fc.weight.double()
    probs = torch.softmax(p64 @ w64.T, dim=1)
    delta = 2048 * U32 * (p64.abs() @ w64.abs().T).max(dim=1, keepdim=True).values
    assert ((pool["probs"] - probs).abs() <= probs * torch.expm1(2 * delta) + 1e-15).all()


def test_gray_and_rgb_give_the_same_features(extractor) -> None:
    gray = _images(2, channels=1, seed=2)
    a = extractor(list(gray), ALL)
    b = extractor(list(np.repeat(gray, 3, axis=3)), ALL)
    for key in ALL:
        assert torch.equal(a[key], b[key])


def test_extract_features_batches_do_not_change_results(extractor) -> None:
    source = ArrayImages(_images(5, size=16, seed=3))
    # float kernels may sum differently at another batch size, so the batching is checked exactly: the
    # rows of a batch-2 run are the extractor's outputs on images 0-1, 2-3 and 4, in that order
    split = extract_features(extractor, source, ALL, batch_size=2)
    imgs = list(_images(5, size=16, seed=3))
    parts = [extractor(imgs[i:i + 2], ALL) for i in (0, 2, 4)]
    for key in ALL:
        expected = np.concatenate([p[key].numpy() if key == "probs" else p[key].float().numpy() for p in parts])
        assert np.array_equal(split[key], expected), key
    assert split["pool"].dtype == np.float32 and split["probs"].dtype == np.float64


def test_extractor_info_records_weights(extractor, inception_weights: Path) -> None:
    from lowbitdm_cli.artifacts import sha256_file

    info = extractor.info()
    assert info["backend"] == "pytorch-fid" and info["mode"] == "legacy_pytorch"
    assert info["weights_sha256"] == sha256_file(inception_weights)
    assert info["official_weights"] is False  # random test weights are flagged as such


# --- offline weights ---------------------------------------------------------------------------------

def test_missing_weights_say_where_to_get_them() -> None:
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_weights("pytorch-fid")
    msg = str(e.value)
    assert PYTORCH_FID_FILE in msg and "https://github.com/mseitzer/pytorch-fid/releases" in msg
    assert "--inception-weights" in msg and "LOWBITDM_INCEPTION_WEIGHTS" in msg
    assert "\n" not in msg


def test_weights_from_env_dir_and_cache(inception_weights: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBITDM_INCEPTION_WEIGHTS", str(inception_weights))
    assert resolve_weights("pytorch-fid") == inception_weights
    monkeypatch.delenv("LOWBITDM_INCEPTION_WEIGHTS")
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / PYTORCH_FID_FILE).write_bytes(inception_weights.read_bytes())
    assert resolve_weights("pytorch-fid", folder) == folder / PYTORCH_FID_FILE  # a folder holding the file
    cache = Path(torch.hub.get_dir()) / "checkpoints"  # TORCH_HOME points into tmp_path (conftest)
    cache.mkdir(parents=True)
    (cache / PYTORCH_FID_FILE).write_bytes(b"x")
    assert resolve_weights("pytorch-fid") == cache / PYTORCH_FID_FILE  # where pytorch-fid would have cached it
    with pytest.raises(WeightsNotFoundError, match="do not exist"):
        resolve_weights("pytorch-fid", tmp_path / "nope.pth")


def test_wrong_weight_files_are_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationError, match="not a readable state dict"):
        open_extractor("pytorch-fid", weights=garbage, device="cpu")
    other = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(EvaluationError, match="does not fit pytorch-fid's FID Inception"):
        open_extractor("pytorch-fid", weights=other, device="cpu")
    with pytest.raises(EvaluationError, match="not a TorchScript file"):
        open_extractor("clean-fid", weights=garbage, device="cpu")
    with pytest.raises(EvaluationError, match="mode"):
        open_extractor("pytorch-fid", mode="clean", weights=other, device="cpu")
    with pytest.raises(EvaluationError, match="unknown Inception backend"):
        open_extractor("tf", weights=other)


# --- clean-fid backend ---------------------------------------------------------------------------------

def test_clean_fid_backend_matches_clean_fid(cleanfid_weights: Path) -> None:
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    imgs = _images(3, size=24, seed=4)
    ours = open_extractor("clean-fid", weights=cleanfid_weights, device="cpu")
    assert ours.mode == "clean" and "spatial" not in ours.provides
    out = ours(list(imgs), frozenset({"pool", "probs"}))
    # clean-fid's own pipeline on the same file: PIL bicubic resize to 299, then its wrapper
    model = InceptionV3W(str(cleanfid_weights.parent), download=False, resize_inside=False).eval()
    resize = build_resizer("clean")
    # clean-fid's ResizeDataset yields HWC arrays, batched then permuted: the same NHWC-strided tensor
    # ours feeds, so the same kernels run and the outputs agree bit for bit on any CPU
    batch = torch.from_numpy(np.stack([resize(img) for img in imgs]).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.equal(out["pool"], model(batch))
        assert torch.equal(out["probs"], model.base(batch, no_output_bias=True).double())
    legacy = open_extractor("clean-fid", mode="legacy_tensorflow", weights=cleanfid_weights, device="cpu")
    with torch.no_grad():
        expected = model.base(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), return_features=True)
    assert torch.equal(legacy(list(imgs), frozenset({"pool"}))["pool"], expected)
    with pytest.raises(EvaluationError, match="spatial"):
        ours(list(imgs), frozenset({"spatial"}))
