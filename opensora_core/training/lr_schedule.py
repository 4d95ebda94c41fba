"""Learning-rate schedules: linear warmup, then constant or cosine decay to a floor.

The factor multiplies each parameter group's peak LR. Optimizer step ``k`` (0-based) runs with
``factor(k)``: during warmup ``(k + 1) / warmup_steps`` (the first step already moves), then 1
(``constant``) or ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t)) / 2`` with
``t = (k - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1] (``cosine``).

The scheduler is a ``LambdaLR`` whose lambda is a :class:`WarmupSchedule` object, so its settings
are part of ``scheduler.state_dict()`` and a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from opensora_core.errors import ConfigError

SCHEDULES = ("constant", "cosine")


@dataclass
class WarmupSchedule:
    """``step -> LR factor``; see the module docstring for the formula."""

    warmup_steps: int = 0
    total_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ConfigError("warmup_steps and total_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, max(0.0, (step - self.warmup_steps) / decay_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    total_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` following :class:`WarmupSchedule`; call ``scheduler.step()`` after each optimizer step.

    ``optimizer`` may be a boosted ``OptimizerWrapper``: the scheduler is built on the torch
    optimizer inside it (they share the parameter groups).
    """
    inner = optimizer.unwrap() if hasattr(optimizer, "unwrap") else optimizer
    return LambdaLR(inner, WarmupSchedule(warmup_steps, total_steps, schedule, min_lr_ratio))


def reset_peak_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the peak LR ``lr`` (a loaded optimizer state brings its own
    ``lr`` and ``initial_lr``, and a scheduler built on it would keep the old run's peak)."""
    inner = optimizer.unwrap() if hasattr(optimizer, "unwrap") else optimizer
    for group in inner.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr


def apply_peak_lr(scheduler: LambdaLR, lr: float) -> None:
    """Put a loaded scheduler on the peak LR ``lr`` at its current step (the curve stays)."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr] * len(groups)
    for group, fn in zip(groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
