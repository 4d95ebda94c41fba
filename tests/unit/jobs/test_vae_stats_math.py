"""Per-channel moments merged with Chan's update equal numpy's mean and std of all values."""

from __future__ import annotations

import numpy as np
import torch

from opensora_core.jobs.vae_stats import all_reduce_moments, batch_moments, merge_moments


def test_merged_moments_equal_numpy_over_uneven_batches() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(b, 3, t, 4, 5, generator=g) * torch.tensor([1.0, 5.0, 0.1])[None, :, None, None, None]
        + 2.0
        for b, t in [(1, 1), (3, 2), (2, 5)]
    ]
    acc = (torch.zeros(3, dtype=torch.float64),) * 3
    for z in batches:
        acc = merge_moments(acc, batch_moments(z))
    n, mean, m2 = all_reduce_moments(*acc, torch.device("cpu"))  # one process: unchanged
    values = np.concatenate(
        [z.double().numpy().transpose(1, 0, 2, 3, 4).reshape(3, -1) for z in batches], axis=1
    )
    np.testing.assert_allclose(n.numpy(), values.shape[1])
    np.testing.assert_allclose(mean.numpy(), values.mean(1), rtol=1e-12)
    np.testing.assert_allclose((m2 / n).sqrt().numpy(), values.std(1), rtol=1e-10)


def test_merging_with_an_empty_triple_is_the_identity() -> None:
    z = torch.randn(2, 4, 3, 2, 2)
    once = batch_moments(z)
    merged = merge_moments((torch.zeros(4, dtype=torch.float64),) * 3, once)
    for a, b in zip(once, merged):
        torch.testing.assert_close(a, b)
