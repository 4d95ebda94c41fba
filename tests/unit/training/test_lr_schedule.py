"""LR schedule: warmup then constant or cosine, exact numbers, and resuming mid-curve."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from opensora_core.errors import ConfigError
from opensora_core.training.lr_schedule import WarmupSchedule, build_lr_scheduler


def _lrs(optimizer, scheduler, n):
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _sgd(lr=2.0):
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr)


def test_warmup_then_cosine_numbers():
    opt = _sgd(lr=2.0)
    sched = build_lr_scheduler(opt, warmup_steps=4, total_steps=12, schedule="cosine", min_lr_ratio=0.1)
    lrs = _lrs(opt, sched, 16)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # (k + 1) / 4 of the peak
    assert lrs[4] == pytest.approx(2.0)  # cosine starts at the peak
    assert lrs[8] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way: cos(pi / 2) = 0
    assert lrs[6] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))))
    assert lrs[12:] == pytest.approx([0.2] * 4)  # floor = min_lr_ratio * peak, held after the end
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def test_warmup_then_constant():
    opt = _sgd(lr=1.0)
    sched = build_lr_scheduler(opt, warmup_steps=2, total_steps=10, schedule="constant")
    assert _lrs(opt, sched, 5) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert WarmupSchedule(0, 0, "constant")(0) == 1.0


def test_resumed_scheduler_continues_the_same_curve():
    kwargs = dict(warmup_steps=3, total_steps=10, schedule="cosine", min_lr_ratio=0.05)
    opt = _sgd()
    sched = build_lr_scheduler(opt, **kwargs)
    straight = _lrs(opt, sched, 10)

    opt1 = _sgd()
    sched1 = build_lr_scheduler(opt1, **kwargs)
    first = _lrs(opt1, sched1, 4)
    opt_state, sched_state = opt1.state_dict(), sched1.state_dict()

    opt2 = _sgd()
    sched2 = build_lr_scheduler(
        opt2, warmup_steps=0, total_steps=1, schedule="constant"
    )  # settings come from the state
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert first + _lrs(opt2, sched2, 6) == pytest.approx(straight)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="linear"):
        WarmupSchedule(schedule="linear")
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        WarmupSchedule(min_lr_ratio=1.5)
