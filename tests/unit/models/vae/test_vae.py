"""Contract tests of the video autoencoder on the tiny sizes: shapes, gradients, determinism,
persistence, latent statistics, pretrained-folder loading and a short overfit."""

from __future__ import annotations

import json

import pytest
import torch

from opensora_core.errors import ConfigError, InputError
from opensora_core.models.vae import (
    FAMILIES,
    VaeModelConfig,
    VideoAutoencoder,
    build_vae,
    get_vae_config,
    kl_loss,
    l1_loss,
)

FAMILY_NAMES = sorted(FAMILIES)


def make_vae(family: str = "wan", seed: int = 0) -> VideoAutoencoder:
    torch.manual_seed(seed)
    return build_vae(VaeModelConfig(family=family, size="tiny"))


def smooth_clips(batch: int, frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency clips in [-1, 1]: a random coarse grid upsampled, so they are learnable."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, frames, size // 8, size // 8, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_is_under_a_million_parameters_with_4x8x8_compression(family):
    vae = make_vae(family)
    assert sum(p.numel() for p in vae.parameters()) < 1_000_000
    assert (vae.temporal_factor, vae.spatial_factor, vae.latent_channels) == (4, 8, 8)


def test_tiny_s4_compresses_4x4x4_and_decodes_to_the_input_shape():
    vae = build_vae(VaeModelConfig(family="wan", size="tiny-s4", shortcut=True))
    assert sum(p.numel() for p in vae.parameters()) < 1_000_000
    assert (vae.temporal_factor, vae.spatial_factor, vae.latent_channels) == (4, 4, 8)
    assert vae.latent_shape(17, 48, 64) == (8, 5, 12, 16)
    x = torch.rand(1, 3, 9, 48, 48) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (1, 8, 3, 12, 12)
    assert vae.decode(z).shape == x.shape


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize(("frames", "height", "width"), [(9, 32, 32), (17, 32, 48), (1, 32, 32)])
def test_shapes_match_latent_shape(family, frames, height, width):
    vae = make_vae(family)
    x = torch.rand(1, 3, frames, height, width) * 2 - 1
    expected = (1, *vae.latent_shape(frames, height, width))
    with torch.no_grad():
        recon, mean, logvar = vae(x)
        z = vae.encode(x)
        video = vae.decode(z)
    assert recon.shape == x.shape and video.shape == x.shape
    assert mean.shape == logvar.shape == z.shape == expected
    assert video.min() >= -1 and video.max() <= 1


def test_latent_shape_values():
    vae = make_vae("wan")
    assert vae.latent_shape(9, 32, 32) == (8, 3, 4, 4)
    assert vae.latent_shape(17, 64, 48) == (8, 5, 8, 6)
    assert vae.latent_shape(1, 32, 32) == (8, 1, 4, 4)


@pytest.mark.parametrize(("frames", "height", "width"), [(8, 32, 32), (0, 32, 32), (9, 30, 32), (9, 32, 4)])
def test_unencodable_shapes_are_rejected(frames, height, width):
    vae = make_vae("wan")
    with pytest.raises(ValueError, match=r"frames|multiples"):
        vae.latent_shape(frames, height, width)
    if frames > 0:
        with pytest.raises(ValueError):
            vae.encode(torch.zeros(1, 3, frames, height, width))


@pytest.mark.parametrize(
    ("family", "size", "channels", "min_params"),
    [("wan", "wan2.1", 16, 1e8), ("hunyuan", "hunyuan", 16, 2e8)],
)
def test_released_sizes_build_from_config(family, size, channels, min_params):
    # Built on the meta device: architecture only, no memory for the weights.
    with torch.device("meta"):
        vae = build_vae(VaeModelConfig(family=family, size=size))
    assert vae.latent_channels == channels
    assert (vae.temporal_factor, vae.spatial_factor) == (4, 8)
    assert sum(p.numel() for p in vae.parameters()) > min_params


def test_config_rejects_unknown_names():
    with pytest.raises(ConfigError, match="family"):
        VaeModelConfig(family="sd3")
    with pytest.raises(ConfigError, match="hunyuan"):
        VaeModelConfig(family="wan", size="hunyuan")
    assert get_vae_config("wan", "tiny")["z_dim"] == 8


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradients_reach_every_parameter(family):
    vae = make_vae(family)
    x = smooth_clips(2, 5, 16)
    recon, mean, logvar = vae(x)
    (l1_loss(x, recon) + kl_loss(mean, logvar)).backward()
    for name, param in vae.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_deterministic_under_a_seed(family):
    x = smooth_clips(1, 5, 16)
    outputs = []
    for _ in range(2):
        vae = make_vae(family, seed=3)
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(vae(x, sample_posterior=True)[0])
    assert torch.equal(outputs[0], outputs[1])
    other = make_vae(family, seed=4)
    assert not torch.equal(next(iter(other.parameters())), next(iter(make_vae(family, seed=3).parameters())))


def test_posterior_sampling_differs_from_mean():
    vae = make_vae("wan")
    x = smooth_clips(1, 5, 16)
    with torch.no_grad():
        assert not torch.equal(vae.encode_raw(x, sample=True), vae.encode_raw(x))
        assert torch.equal(vae.encode_raw(x), vae.encode_raw(x))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_state_dict_round_trip(family):
    source, target = make_vae(family, seed=1), make_vae(family, seed=2)
    source.set_latent_stats({"mean": [0.5] * 8, "std": [2.0] * 8, "scale": 0.7, "shift": 0.1})
    target.load_state_dict(source.state_dict())
    x = smooth_clips(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(source.encode(x), target.encode(x))
    assert target.get_latent_stats() == source.get_latent_stats()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_load_round_trip(tmp_path, family):
    vae = make_vae(family, seed=1)
    stats = {
        "mean": [0.25 * i for i in range(8)],
        "std": [1.0 + i for i in range(8)],
        "scale": 0.5,
        "shift": -0.2,
    }
    vae.set_latent_stats(stats)
    weights = vae.save(tmp_path / "final", name="ema")
    assert weights.name == "ema.safetensors"
    meta = json.loads((tmp_path / "final" / "ema.json").read_text())
    assert meta["model"] == {"family": family, "size": "tiny", "pretrained_path": "", "shortcut": False}
    loaded = VideoAutoencoder.load(tmp_path / "final", name="ema")
    for key, value in vae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.get_latent_stats() == vae.get_latent_stats()
    assert loaded.get_latent_stats()["std"] == stats["std"]
    x = smooth_clips(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(vae.encode(x), loaded.encode(x))
    with pytest.raises(InputError):
        VideoAutoencoder.load(tmp_path / "final", name="missing")


def test_latent_stats_are_identity_until_set_and_decode_inverts_encode():
    vae = make_vae("wan")
    x = smooth_clips(2, 5, 16)
    with torch.no_grad():
        raw = vae.encode_raw(x)
        assert torch.equal(vae.encode(x), raw)
        mean = torch.linspace(-1, 1, 8)
        std = torch.linspace(0.5, 3, 8)
        vae.set_latent_stats({"mean": mean.tolist(), "std": std.tolist(), "scale": 1.5, "shift": 0.3})
        z = vae.encode(x)
        expected = ((raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1) - 0.3) * 1.5
        torch.testing.assert_close(z, expected)
        torch.testing.assert_close(vae.denormalize_latents(z), raw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(z), vae.decode_raw(raw), rtol=1e-4, atol=1e-4)


def test_bad_latent_stats_are_rejected():
    vae = make_vae("wan")
    with pytest.raises(ConfigError, match="8 channels"):
        vae.set_latent_stats({"mean": [0.0] * 16, "std": [1.0] * 16})
    with pytest.raises(ConfigError, match="positive"):
        vae.set_latent_stats({"mean": [0.0] * 8, "std": [0.0] * 8})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pretrained_folder_initialisation(tmp_path, family):
    torch.manual_seed(11)
    reference = FAMILIES[family](**get_vae_config(family, "tiny"))
    reference.save_pretrained(tmp_path / "pretrained")
    vae = build_vae(VaeModelConfig(family=family, size="tiny", pretrained_path=str(tmp_path / "pretrained")))
    for name, param in reference.state_dict().items():
        assert torch.equal(param, vae.vae.state_dict()[name]), name
    with pytest.raises(InputError, match=r"config\.json"):
        build_vae(VaeModelConfig(family=family, pretrained_path=str(tmp_path / "nowhere")))


def test_a_few_optimiser_steps_lower_the_l1_loss():
    vae = make_vae("wan")
    x = smooth_clips(1, 5, 16)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        recon, mean, logvar = vae(x, sample_posterior=False)
        loss = l1_loss(x, recon) + 1e-6 * kl_loss(mean, logvar)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
