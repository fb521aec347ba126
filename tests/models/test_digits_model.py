"""The embedded digits model: loads offline, samples with the right shape, range and determinism."""

import socket

import pytest
import torch

from lowbitdm_cli.models.digits import WEIGHTS_DIR
from lowbitdm_cli.models.registry import load_model, model_entry
from lowbitdm_cli.sampling import SamplerSettings, ddim_sample, ddim_timesteps, to_uint8


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_weights_ship_inside_the_package():
    size = (WEIGHTS_DIR / "digits_unet.safetensors").stat().st_size
    assert size < 20 * 2**20
    assert (WEIGHTS_DIR / "digits_unet.json").is_file()


def test_loads_and_samples_without_network(no_network):
    model = load_model("digits")
    n_params = sum(p.numel() for p in model.denoiser.parameters())
    assert 1_000_000 <= n_params <= 4_000_000
    settings = SamplerSettings(steps=5, eta=0.0, guidance=2.0, clip_x0=True)
    labels = torch.arange(4)
    x = ddim_sample(model, labels, [0, 1, 2, 3], seed=7, settings=settings)
    assert x.shape == (4, 1, 16, 16)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    again = ddim_sample(model, labels, [0, 1, 2, 3], seed=7, settings=settings)
    assert torch.equal(x, again)
    other = ddim_sample(model, labels, [0, 1, 2, 3], seed=8, settings=settings)
    assert not torch.equal(x, other)


def test_image_depends_only_on_seed_and_index():
    model = load_model("tiny-random")
    settings = SamplerSettings(steps=3, eta=1.0, guidance=2.0, clip_x0=True)
    batch = ddim_sample(model, torch.tensor([3, 4, 5]), [3, 4, 5], seed=1, settings=settings)
    single = ddim_sample(model, torch.tensor([4]), [4], seed=1, settings=settings)
    assert (to_uint8(batch[1:2]).astype(int) - to_uint8(single).astype(int)).__abs__().max() <= 1


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 50)[:3] == [980, 960, 940] and ddim_timesteps(1000, 50)[-1] == 0
    assert ddim_timesteps(1000, 1) == [0]
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_registry_explains_missing_checkpoints(tmp_path, monkeypatch):
    from lowbitdm_cli.errors import ModelNotFoundError

    monkeypatch.setenv("LOWBITDM_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        model_entry("nope")
    assert model_entry("ldm-4").sampler["guidance"] == 3.0  # registered, with its paper setting
    with pytest.raises(ModelNotFoundError, match="needs a local copy"):
        load_model("ldm-4")  # not on this machine, and not on the hub
