"""Step metrics of a training run: the window of sums reduced over ranks at each log, the FLOP
counter of one step and the optional torch.profiler trace."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opensora_core.config import TrainConfig
from opensora_core.diffusion.rectified_flow import loss_by_bin
from opensora_core.distributed.dist import all_reduce_sum
from opensora_core.tracking import NullRun

log = logging.getLogger("opensora.diffusion")


@dataclass
class MetricWindow:
    """Sums over the steps since the last log; :meth:`reduce` adds them over the ranks."""

    bins: int
    steps: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    grad_norm_sum: float = 0.0
    img_tokens: int = 0
    tokens: int = 0
    flops: float = 0.0
    cache_hits: int = 0
    bin_sums: Tensor = field(init=False)
    bin_counts: Tensor = field(init=False)
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.bin_sums = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_counts = torch.zeros(self.bins, dtype=torch.float64)

    def add(
        self, losses: Tensor, t: Tensor, grad_norm: float | None, img_tokens: int, txt_tokens: int, hits: int
    ) -> None:
        """One step: per-sample losses (B,) at times t (B,), its grad norm, tokens and cache hits."""
        sums, counts = loss_by_bin(losses, t, self.bins)
        self.steps += 1
        self.loss_sum += float(losses.sum())
        self.samples += len(losses)
        self.grad_norm_sum += grad_norm or 0.0
        self.img_tokens += img_tokens
        self.tokens += img_tokens + txt_tokens
        self.cache_hits += hits
        self.bin_sums += sums.double().cpu()
        self.bin_counts += counts.double().cpu()

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means and rates of the window over every rank (a collective: all ranks call it)."""
        scalars = [self.loss_sum, self.samples, self.grad_norm_sum, self.img_tokens, self.tokens, self.flops]
        packed = torch.cat(
            [torch.tensor([*scalars, self.cache_hits], dtype=torch.float64), self.bin_sums, self.bin_counts]
        )
        values = all_reduce_sum(packed.to(device)).cpu()
        loss_sum, samples, grad_sum, img_tokens, tokens, flops, hits = values[:7].tolist()
        sums, counts = values[7 : 7 + self.bins], values[7 + self.bins :]
        seconds = max(time.perf_counter() - self.start, 1e-9)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        out = {
            "loss": loss_sum / max(samples, 1),
            "grad_norm": grad_sum / max(self.steps, 1),
            "img_tokens_per_s": img_tokens / seconds,
            "tokens_per_s": tokens / seconds,
            "step_time_s": seconds / max(self.steps, 1),
            "cache_hit_rate": hits / max(samples, 1),
            "tflops_per_device": flops / seconds / 1e12 / world,
        }
        for k in range(self.bins):
            if counts[k] > 0:
                out[f"loss_t/{k / self.bins:.1f}-{(k + 1) / self.bins:.1f}"] = float(sums[k] / counts[k])
        return out


@contextlib.contextmanager
def flop_counter(enabled: bool) -> Iterator[Any]:
    """A FlopCounterMode over the block when ``enabled`` (yields it), else nothing (yields None)."""
    if not enabled:
        yield None
        return
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        yield counter


@contextlib.contextmanager
def maybe_profiler(tcfg: TrainConfig, run: NullRun, rank0: bool) -> Iterator[Any]:
    """``train.profile_steps`` > 0: a torch.profiler trace of that many steps, logged as an artifact."""
    if tcfg.profile_steps <= 0:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    out = Path(tempfile.mkdtemp(prefix="opensora-trace-"))
    traces: list[Path] = []

    def export(prof: Any) -> None:
        path = out / f"trace-rank{int(os.environ.get('RANK', 0)):03d}-step{prof.step_num}.json"
        prof.export_chrome_trace(str(path))
        traces.append(path)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    plan = schedule(wait=tcfg.profile_wait, warmup=1, active=tcfg.profile_steps, repeat=1)
    with profile(activities=activities, schedule=plan, on_trace_ready=export, record_shapes=True) as prof:
        yield prof
    if not traces:
        log.warning(
            "train.profile_steps: the run ended before the profiler's %d steps",
            tcfg.profile_wait + 1 + tcfg.profile_steps,
        )
    elif rank0:
        for path in traces:
            run.log_artifact(path, "profiler")
        log.info("profiler trace: %s", ", ".join(map(str, traces)))
