"""Reconstruction metrics: pooled PSNR against numpy, the mean-frame baseline, clip cropping."""

from __future__ import annotations

import math

import numpy as np
import torch

from opensora_core.evaluation.reconstruction import ReconstructionResult, clip_tensor, reconstruction_metrics


def test_clip_tensor_keeps_4k_plus_1_frames_and_crops_to_the_factor() -> None:
    frames = np.zeros((11, 50, 70, 3), dtype=np.uint8)
    x = clip_tensor(frames, spatial=8, temporal=4)
    assert x.shape == (1, 3, 9, 48, 64)
    assert float(x.min()) == -1.0


def test_pooled_psnr_weights_clips_by_size() -> None:
    result = ReconstructionResult(
        mse=[0.01, 0.0], mse_baseline=[0.04, 0.0], num_values=[100, 300], ssim=[0.5, 1.0]
    )
    summary = result.summary()
    assert math.isclose(summary["psnr"], 10 * math.log10(4 / 0.0025), rel_tol=1e-6)
    assert math.isclose(summary["psnr_baseline"], 10 * math.log10(4 / 0.01), rel_tol=1e-6)
    assert summary["ssim"] == 0.75 and summary["num_clips"] == 2


class IdentityVae(torch.nn.Module):
    """A stand-in autoencoder with the VideoAutoencoder interface that returns its input."""

    spatial_factor, temporal_factor = 8, 4

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return z


def test_perfect_reconstruction_beats_the_baseline_on_a_moving_clip(tmp_path) -> None:
    from opensora_core.data.video_io import write_video

    frames = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    for t in range(9):
        frames[t, 8:16, 2 + 2 * t : 10 + 2 * t] = 220
    write_video(tmp_path / "a.mp4", frames, fps=8)
    rows = [
        {"path": str(tmp_path / "a.mp4"), "num_frames": 9, "fps": 8.0},
        {"path": "still.png", "num_frames": 1},
    ]
    result = reconstruction_metrics(IdentityVae(), rows, max_clips=4, out_dir=tmp_path)
    summary = result.summary()
    assert summary["num_clips"] == 1  # the still is skipped
    assert summary["psnr"] > 100 and summary["psnr_baseline"] < 30
    assert summary["ssim"] > 0.999
    assert result.artifacts and result.artifacts[0].is_file()
