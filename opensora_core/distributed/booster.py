"""ColossalAI's Booster for a plugin named in params (``ddp`` or ``zero2``).

colossalai takes about 5 s to import (it pulls in its kernels, shardformer and peft), so it is
imported inside :func:`build_booster` only, and only jobs call that.

What ``booster.boost(model, optimizer, criterion, dataloader, lr_scheduler)`` returns:

- ``model``: a ``ModelWrapper`` (``TorchDDPModel`` around ``DistributedDataParallel`` for ``ddp``,
  ``LowLevelZeroModel`` for ``zero2``); ``model.unwrap()`` is the original ``nn.Module``.
- ``optimizer``: an ``OptimizerWrapper`` (``LowLevelZeroOptimizer`` for ``zero2``, which owns the
  fp32 master weights and the sharded states); ``optimizer.unwrap()`` is the torch optimizer.
- ``lr_scheduler``, ``criterion``, ``dataloader``: returned as given.

Backward must go through ``booster.backward(loss, optimizer)`` (ZeRO scales and reduces the
gradients there). Save and load the model and optimizer through ``booster.save_model`` /
``save_optimizer`` (``opensora_core.training.checkpoint`` does), which every rank must call: ZeRO
gathers the optimizer shards with collectives. Weights for inference: ``unwrap_model(model)``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch

from opensora_core.errors import ConfigError

log = logging.getLogger("opensora.booster")

PRECISIONS = {"ddp": ("fp32", "fp16"), "zero2": ("bf16", "fp16", "fp32")}


def build_booster(plugin: str, precision: str = "fp32", grad_clip: float = 0.0, **plugin_kwargs: Any) -> Any:
    """A ``colossalai.booster.Booster`` for ``plugin``; call after ``init_distributed()``.

    - ``ddp``: ``TorchDDPPlugin`` (CPU with gloo, or GPU). ``precision`` ``fp32``, or ``fp16``
      (torch AMP, GPU only). ColossalAI's bf16 mixed precision for plain DDP is a stub, so bf16
      needs ``zero2``. Gradient clipping is the training step's: :func:`maybe_clip_grad_norm`.
    - ``zero2``: ``LowLevelZeroPlugin(stage=2)`` (optimizer states and gradients sharded),
      GPU only; it clips gradients itself (``grad_clip`` becomes its ``max_norm``).

    Extra keyword arguments go to the plugin. Raises ConfigError for an unknown plugin, an
    unsupported precision, or ``zero2`` without CUDA.
    """
    if plugin not in PRECISIONS:
        raise ConfigError(f"unknown plugin {plugin!r}; valid plugins: {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS[plugin]:
        raise ConfigError(
            f"plugin {plugin} supports precision {', '.join(PRECISIONS[plugin])}, got {precision!r}"
            + ("; use plugin zero2 for bf16" if plugin == "ddp" and precision == "bf16" else "")
        )
    cuda = torch.cuda.is_available()
    if plugin == "zero2" and not cuda:
        raise ConfigError(
            "plugin zero2 (ColossalAI LowLevelZeroPlugin) needs CUDA GPUs; use plugin ddp on CPU"
        )
    if plugin == "ddp" and precision == "fp16" and not cuda:
        raise ConfigError("precision fp16 with plugin ddp needs a GPU; use fp32 on CPU")
    if grad_clip < 0:
        raise ConfigError(f"grad_clip must be >= 0, got {grad_clip}")
    if not torch.distributed.is_initialized():
        raise RuntimeError("build_booster needs a process group: call init_distributed() first")

    start = time.perf_counter()
    with warnings.catch_warnings():
        # Optional fused kernels (apex, tensornvme) it does not find on this machine.
        warnings.simplefilter("ignore")
        from colossalai.booster import Booster
        from colossalai.booster.plugin import LowLevelZeroPlugin, TorchDDPPlugin
    log.info("imported colossalai in %.1fs", time.perf_counter() - start)

    if plugin == "ddp":
        return Booster(
            plugin=TorchDDPPlugin(**plugin_kwargs), mixed_precision=None if precision == "fp32" else precision
        )
    return Booster(
        plugin=LowLevelZeroPlugin(stage=2, precision=precision, max_norm=grad_clip, **plugin_kwargs)
    )


def maybe_clip_grad_norm(optimizer: Any, plugin: str, max_norm: float) -> float | None:
    """Clip gradients to ``max_norm`` (after backward, before ``optimizer.step()``); the total norm.

    Does nothing (returns None) when ``max_norm`` is 0 or for ``zero2``, whose optimizer clips.
    """
    if max_norm <= 0 or plugin == "zero2":
        return None
    if hasattr(optimizer, "clip_grad_by_norm"):
        return float(optimizer.clip_grad_by_norm(max_norm))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a boosted model (ModelWrapper, DDP), or the model itself."""
    while True:
        if hasattr(model, "unwrap"):
            inner = model.unwrap()
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a boosted one (OptimizerWrapper), or the optimizer itself."""
    return optimizer.unwrap() if hasattr(optimizer, "unwrap") else optimizer
