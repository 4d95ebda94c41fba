"""Guards of a training step: the out-of-memory guard (micro-batches that halve) and the
non-finite-loss check, both naming the batch's bucket."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from opensora_core.errors import NonFiniteLoss, OutOfMemory

log = logging.getLogger("opensora.diffusion")

T = TypeVar("T")


class OomGuard:
    """Per-bucket micro-batch limits that halve when a step runs out of memory.

    :meth:`run` calls ``step(micro_batch)``; on ``torch.OutOfMemoryError`` it calls ``free()``,
    halves the bucket's limit for the rest of the run and retries the same batch in smaller
    micro-batches (gradient accumulation keeps the batch, so the data order and the effective
    batch size stay). At micro-batch 1, or when disabled, it raises :class:`OutOfMemory` (exit 4).
    The limits are part of the checkpoint (:meth:`state_dict`).

    With several ranks, DDP keeps one gradient reduction per step (``no_sync`` on all but the last
    micro-batch), so an OOM in the forward pass of one rank is recovered; an OOM inside a
    reduction, or any under ZeRO-2 (which reduces every micro-batch), leaves the other ranks
    waiting and the job ends at the collective timeout (exit 75, retryable).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.limits: dict[str, int] = {}

    def micro_batch(self, bucket: str, batch_size: int) -> int:
        return min(batch_size, self.limits.get(bucket, batch_size))

    def run(self, bucket: str, batch_size: int, step: Callable[[int], T], free: Callable[[], None]) -> T:
        while True:
            micro = self.micro_batch(bucket, batch_size)
            try:
                return step(micro)
            except torch.OutOfMemoryError as exc:
                free()
                if not self.enabled or micro <= 1:
                    raise OutOfMemory(
                        f"out of memory in bucket {bucket} at micro-batch {micro}"
                        + ("" if self.enabled else " (train.oom_guard is off)")
                    ) from exc
                self.limits[bucket] = micro // 2
                log.warning("out of memory in bucket %s: micro-batch %d -> %d", bucket, micro, micro // 2)

    def state_dict(self) -> dict[str, Any]:
        return {"limits": dict(self.limits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.limits = {str(k): int(v) for k, v in state.get("limits", {}).items()}

    def merge(self, others: list[dict[str, Any]]) -> None:
        """Keep the smallest limit of every bucket over the given states (all ranks' guards)."""
        for state in others:
            for key, value in state.get("limits", {}).items():
                self.limits[key] = min(int(value), self.limits.get(key, int(value)))


def bucket_key(batch: dict[str, Any]) -> str:
    """A batch's bucket as ``resolution/TxHxW`` (the OOM guard's and the FLOP counter's key)."""
    b = batch["bucket"]
    return f"{b.resolution}/{b.num_frames}x{b.height}x{b.width}"


def check_finite(loss: Tensor, step: int, batch: dict[str, Any]) -> None:
    """Raise :class:`NonFiniteLoss` naming the step and the batch when ``loss`` has NaN or inf."""
    if bool(torch.isfinite(loss).all()):
        return
    indices = batch["index"].tolist()
    raise NonFiniteLoss(
        f"non-finite loss at step {step + 1} (values {loss.detach().float().cpu().tolist()[:8]}); "
        f"batch: bucket {bucket_key(batch)}, samples {indices[:8]}, paths {batch['path'][:3]}"
    )


# --------------------------------------------------------------------------------------------
