"""Exponential moving average of a model's weights, kept in fp32.

After every optimizer step ``shadow = decay * shadow + (1 - decay) * param``; the averaged weights
are what evaluation and the final model use (DiT and Open-Sora keep such an EMA with decay
0.9999). The shadow is fp32 whatever the training precision, so bf16 weights average without
losing the small updates. Buffers (normalisation statistics) are not averaged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opensora_core.distributed.booster import unwrap_model


class EMA:
    """fp32 shadow copy of ``model``'s floating-point parameters.

    ``model`` may be boosted (DDP / ZeRO wrapper): parameters are read from the unwrapped module,
    so the shadow's keys are the plain model's parameter names. ``device`` defaults to the
    parameters' device. ``trainable_only`` keeps only parameters with ``requires_grad`` (a LoRA
    model's adapter: the frozen base needs no average).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        device: torch.device | str | None = None,
        trainable_only: bool = False,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.trainable_only = trainable_only
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
            for name, p in self._params(model)
        }

    def _params(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [
            (n, p)
            for n, p in unwrap_model(model).named_parameters()
            if p.dtype.is_floating_point and (p.requires_grad or not self.trainable_only)
        ]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """Move the shadow towards ``model``'s weights: ``s += (1 - decay) * (p - s)``.

        ``decay`` overrides the configured one for this step (0 copies the weights).
        """
        d = self.decay if decay is None else decay
        shadows, params = [], []
        for name, p in self._params(model):
            s = self.shadow[name]
            shadows.append(s)
            params.append(p.detach().to(device=s.device, dtype=torch.float32))
        if shadows:
            torch._foreach_lerp_(shadows, params, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to each parameter's dtype and device)."""
        for name, p in self._params(model):
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the parameter names must match this EMA's."""
        missing = self.shadow.keys() - state["shadow"].keys()
        unexpected = state["shadow"].keys() - self.shadow.keys()
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights keyed like ``model.state_dict()`` parameters (for the final model)."""
        return {name: t.clone() for name, t in self.shadow.items()}
