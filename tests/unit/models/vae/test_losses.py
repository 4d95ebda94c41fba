"""VAE losses: L1/KL values, LPIPS from a local weights file, the 3D PatchGAN discriminator,
hinge losses, the adaptive GAN weight and the combined VaeLoss."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from opensora_core.errors import InputError
from opensora_core.models.vae import (
    LPIPS,
    PatchDiscriminator3D,
    VaeLoss,
    VaeModelConfig,
    adaptive_gan_weight,
    build_vae,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    l1_loss,
    perceptual_loss,
)


def random_lpips_file(tmp_path, seed: int = 0, reference_head_names: bool = False):
    """Random LPIPS weights saved to safetensors; heads positive like trained LPIPS heads."""
    torch.manual_seed(seed)
    model = LPIPS()
    state = {}
    for key, value in model.state_dict().items():
        value = torch.randn_like(value) * 0.05
        if key.startswith("heads."):
            value = value.abs()
            if reference_head_names:
                key = f"lin{key.split('.')[1]}.model.1.weight"
        state[key] = value.contiguous()
    state["classifier.0.weight"] = torch.zeros(2, 2)  # extra VGG keys are ignored
    path = tmp_path / "lpips.safetensors"
    save_file(state, str(path))
    return path, state


def test_l1_and_kl_values():
    x = torch.zeros(2, 3, 1, 4, 4)
    assert l1_loss(x, x + 0.25).item() == pytest.approx(0.25)
    zeros = torch.zeros(1, 4, 1, 2, 2)
    assert kl_loss(zeros, zeros).item() == 0.0
    # KL(N(1, e) || N(0, 1)) = 0.5 * (1 + e - 1 - 1) per element
    assert kl_loss(zeros + 1, zeros + 1).item() == pytest.approx(0.5 * (math.e - 1))


def test_lpips_loads_saved_weights_and_is_zero_for_identical_inputs(tmp_path):
    path, state = random_lpips_file(tmp_path)
    lpips = LPIPS.from_file(path)
    assert torch.equal(lpips.state_dict()["features.0.weight"], state["features.0.weight"])
    assert torch.equal(lpips.state_dict()["heads.4.weight"], state["heads.4.weight"])
    assert not any(p.requires_grad for p in lpips.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    y = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    torch.testing.assert_close(lpips(x, x), torch.zeros(3), rtol=0, atol=1e-6)
    dist = lpips(x, y)
    assert dist.shape == (3,) and (dist > 0).all()
    assert (lpips(x, x + 0.01 * (y - x)) < dist).all()


def test_lpips_accepts_reference_head_names_and_rejects_incomplete_files(tmp_path):
    path, state = random_lpips_file(tmp_path, reference_head_names=True)
    lpips = LPIPS.from_file(path)
    assert torch.equal(lpips.state_dict()["heads.2.weight"], state["lin2.model.1.weight"])
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("lin")}, str(partial))
    with pytest.raises(InputError, match="lack 5 tensors"):
        LPIPS.from_file(partial)
    with pytest.raises(InputError):
        LPIPS.from_file(tmp_path / "absent.safetensors")


def test_frame_wise_perceptual_loss_has_gradients_for_the_reconstruction(tmp_path):
    lpips = LPIPS.from_file(random_lpips_file(tmp_path)[0])
    x = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    recon = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    assert perceptual_loss(lpips, x, x).item() == pytest.approx(0.0, abs=1e-6)
    loss = perceptual_loss(lpips, x, recon)
    loss.backward()
    assert loss.item() > 0 and recon.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("frames", "size", "expected"),
    [(9, 32, (2, 1, 3, 6, 6)), (1, 32, (2, 1, 1, 6, 6)), (17, 64, (2, 1, 5, 14, 14))],
)
def test_discriminator_output_shapes(frames, size, expected):
    disc = PatchDiscriminator3D(base_channels=8, num_layers=2)
    logits = disc(torch.randn(2, 3, frames, size, size))
    assert logits.shape == expected


def test_hinge_losses():
    ones = torch.ones(4)
    assert hinge_d_loss(2 * ones, -2 * ones).item() == 0.0
    assert hinge_d_loss(0 * ones, 0 * ones).item() == 1.0
    # real 0.5 -> relu(0.5); fake 0 -> relu(1): (0.5 + 1) / 2
    assert hinge_d_loss(0.5 * ones, 0 * ones).item() == pytest.approx(0.75)
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_adaptive_weight_is_the_clamped_ratio_of_gradient_norms():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (weight * torch.tensor([3.0, 4.0])).sum()  # grad (3, 4): norm 5
    gan = (weight * torch.tensor([0.0, 0.5])).sum()  # grad (0, 0.5): norm 0.5
    value = adaptive_gan_weight(rec, gan, weight, eps=0.0)
    assert value.item() == pytest.approx(10.0)
    assert not value.requires_grad
    assert adaptive_gan_weight(rec, gan, weight, max_weight=2.0).item() == 2.0


def test_vae_loss_with_gan_term_on_a_tiny_vae():
    torch.manual_seed(0)
    vae = build_vae(VaeModelConfig(family="wan", size="tiny"))
    disc = PatchDiscriminator3D(base_channels=8, num_layers=1)
    criterion = VaeLoss(kl_weight=1e-3, gan_weight=0.5, disc_start=2, disc_every=2)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    recon, mean, logvar = vae(x)

    before = criterion(x, recon, mean, logvar, step=1, discriminator=disc, last_layer=vae.last_layer_weight)
    assert before["gan"].item() == 0.0 and before["gan_weight"].item() == 0.0
    torch.testing.assert_close(before["loss"], before["l1"] + 1e-3 * before["kl"])

    terms = criterion(x, recon, mean, logvar, step=2, discriminator=disc, last_layer=vae.last_layer_weight)
    assert set(terms) == {"loss", "l1", "mse", "kl", "perceptual", "rec", "gan", "gan_weight"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["gan_weight"].item() > 0
    torch.testing.assert_close(
        terms["loss"].detach(), terms["l1"] + 1e-3 * terms["kl"] + 0.5 * terms["gan_weight"] * terms["gan"]
    )
    terms["loss"].backward()
    assert vae.last_layer_weight.grad is not None

    disc.zero_grad()
    d_terms = criterion.discriminator_loss(disc, x, recon)
    d_terms["d_loss"].backward()
    assert torch.isfinite(d_terms["d_loss"])
    assert all(p.grad is not None for p in disc.parameters())
    assert [criterion.should_update_discriminator(s) for s in range(6)] == [
        False,
        False,
        True,
        False,
        True,
        False,
    ]


def test_vae_loss_adds_weighted_perceptual_term(tmp_path):
    lpips = LPIPS.from_file(random_lpips_file(tmp_path)[0])
    criterion = VaeLoss(kl_weight=0.0, perceptual_weight=2.0, lpips=lpips)
    x = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    recon = x.flip(-1)
    latents = torch.zeros(1, 4, 1, 2, 2)
    terms = criterion(x, recon, latents, latents)
    assert terms["perceptual"].item() > 0
    torch.testing.assert_close(terms["loss"], terms["l1"] + 2.0 * terms["perceptual"])
    with pytest.raises(ValueError, match="LPIPS"):
        VaeLoss(perceptual_weight=1.0)


def test_vae_loss_adds_weighted_mse_to_the_reconstruction_term():
    x = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    recon = x + 0.5
    latents = torch.zeros(1, 4, 1, 1, 1)
    terms = VaeLoss(kl_weight=0.0, mse_weight=10.0)(x, recon, latents, latents)
    torch.testing.assert_close(terms["mse"], torch.tensor(0.25))
    torch.testing.assert_close(terms["rec"], terms["l1"] + 10.0 * terms["mse"])
    torch.testing.assert_close(terms["loss"], terms["rec"])
    off = VaeLoss(kl_weight=0.0)(x, recon, latents, latents)
    torch.testing.assert_close(off["loss"], off["l1"])
