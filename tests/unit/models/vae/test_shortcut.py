"""The parameter-free latent shortcut and the autoencoder built with it."""

from __future__ import annotations

import pytest
import torch

from opensora_core.errors import ConfigError
from opensora_core.models.vae import FAMILIES, VaeModelConfig, build_vae, l1_loss
from opensora_core.models.vae.shortcut import LatentShortcut, shortcut_windows


@pytest.mark.parametrize(
    ("temporal", "channels", "windows"), [(4, 8, 2), (4, 16, 4), (4, 12, 4), (4, 3, 1), (4, 5, 1), (1, 8, 1)]
)
def test_windows_are_the_largest_divisor_that_fits(temporal, channels, windows):
    assert shortcut_windows(temporal, channels) == windows


def test_fewer_than_three_channels_is_an_error():
    with pytest.raises(ValueError, match="3 latent channels"):
        shortcut_windows(4, 2)


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (9, 3), (17, 5)])
def test_down_gives_the_window_means_and_up_the_video_shape(frames, latent_frames):
    sc = LatentShortcut(spatial_factor=8, temporal_factor=4, latent_channels=8)
    x = torch.rand(2, 3, frames, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = sc.down(x)
    assert z.shape == (2, 6, latent_frames, 2, 3)
    assert sc.up(torch.cat([z, torch.zeros(2, 2, latent_frames, 2, 3)], 1)).shape == x.shape
    # Latent frame 0 is frame 0 alone (both windows); frame k >= 1 covers frames 4k-3 .. 4k,
    # window 0 the first two of them and window 1 the last two; channels window-major.
    cell = x[:, :, :, 8:16, 16:24]
    assert torch.allclose(z[:, 0:3, 0, 1, 2], cell[:, :, 0].mean((-1, -2)), atol=1e-6)
    assert torch.allclose(z[:, 3:6, 0, 1, 2], cell[:, :, 0].mean((-1, -2)), atol=1e-6)
    if frames > 1:
        assert torch.allclose(z[:, 0:3, 1, 1, 2], cell[:, :, 1:3].mean((-1, -2, -3)), atol=1e-6)
        assert torch.allclose(z[:, 3:6, 1, 1, 2], cell[:, :, 3:5].mean((-1, -2, -3)), atol=1e-6)


def test_up_inverts_down_on_a_constant_video_and_ignores_the_free_channels():
    sc = LatentShortcut(spatial_factor=8, temporal_factor=4, latent_channels=8)
    colour = torch.tensor([0.5, -0.25, 0.75]).view(1, 3, 1, 1, 1)
    x = colour.expand(1, 3, 9, 16, 16).contiguous()
    z = torch.cat([sc.down(x), torch.randn(1, 2, 3, 2, 2)], 1)
    assert torch.allclose(sc.up(z), x, atol=1e-6)


def test_add_to_latents_touches_only_the_shortcut_channels():
    sc = LatentShortcut(spatial_factor=8, temporal_factor=4, latent_channels=8)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    latents = torch.randn(1, 8, 3, 2, 2)
    out = sc.add_to_latents(latents, x)
    assert torch.allclose(out[:, :6], latents[:, :6] + sc.down(x))
    assert torch.equal(out[:, 6:], latents[:, 6:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_untrained_model_with_shortcut_returns_the_blurred_video(family):
    torch.manual_seed(0)
    vae = build_vae(VaeModelConfig(family=family, size="tiny", shortcut=True))
    x = torch.rand(2, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode_raw(x)
        assert torch.allclose(latents[:, :6], vae.shortcut.down(x), atol=1e-6)
        assert torch.allclose(latents[:, 6:], torch.zeros_like(latents[:, 6:]), atol=1e-6)
        blurred = vae.shortcut.up(latents).clamp(-1, 1)
        assert torch.allclose(vae.decode_raw(latents), blurred, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_reach_the_learned_paths_after_one_step(family):
    torch.manual_seed(0)
    vae = build_vae(VaeModelConfig(family=family, size="tiny", shortcut=True))
    x = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = torch.optim.SGD(vae.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        recon, _, _ = vae(x, sample_posterior=False)
        l1_loss(x, recon).backward()
        opt.step()
    # After one update the zero-initialised output layers carry signal, so the whole decoder trains.
    first_conv = next(p for n, p in vae.vae.decoder.named_parameters() if "conv_in" in n and "weight" in n)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert vae.last_layer_weight.abs().sum() > 0


def test_shortcut_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(VaeModelConfig(family="wan", size="tiny", shortcut=True))
    vae.save(tmp_path)
    loaded = type(vae).load(tmp_path)
    assert loaded.config.shortcut and loaded.shortcut is not None
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.decode(loaded.encode(x)), vae.decode(vae.encode(x)), atol=1e-6)


def test_shortcut_and_pretrained_weights_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="training from scratch"):
        VaeModelConfig(family="wan", size="tiny", shortcut=True, pretrained_path=str(tmp_path))


def test_training_with_the_shortcut_beats_the_shortcut_alone():
    """On one batch of sharp-edged clips, L1 + MSE steps take the reconstruction below the
    blurred one the untrained model starts from."""
    torch.manual_seed(0)
    vae = build_vae(VaeModelConfig(family="wan", size="tiny", shortcut=True))
    x = -torch.ones(2, 3, 9, 16, 16)
    x[0, 0, :, 3:9, 4:11] = 1.0  # a red square
    x[1, 1, :, 8:14, 2:7] = 1.0  # a green one
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        recon, _, _ = vae(x, sample_posterior=False)
        loss = l1_loss(x, recon) + 10 * (recon - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.7 * losses[0], losses
