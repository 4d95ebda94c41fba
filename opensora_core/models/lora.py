"""LoRA adapters on the MMDiT (peft): apply, freeze the base, read and write the adapter, merge.

peft's LoRA layers wrap the targeted ``nn.Linear`` modules in place: a layer ``y = W x + b``
(W: (out, in)) becomes ``y = W x + b + s * B A dropout(x)`` with A: (r, in) random, B: (out, r)
zero and ``s = alpha / r``, so a fresh adapter leaves the model's output unchanged. Inside the
model a wrapped ``...q_proj`` holds ``q_proj.base_layer.weight`` (the frozen W) and
``q_proj.lora_A.default.weight`` / ``q_proj.lora_B.default.weight``.

An exported adapter is a folder::

    adapter.safetensors  the A and B tensors, keyed without peft's adapter name
                         (``double_blocks.0.img_attn.q_proj.lora_A.weight``)
    adapter.json         rank, alpha, dropout, the wrapped module names, the base's sha256 and
                         reference (registry name and version, or a file)

:func:`apply_lora` is the one entry point that turns a plain MMDiT into a LoRA one (training, the
``--lora`` of ``tasks.sample`` and benchmarks call it); :func:`merge_lora` folds the adapters back
into plain ``nn.Linear`` weights (``W + s B A``).
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from opensora_core.config import LoraConfig
from opensora_core.errors import ConfigError, InputError

ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
ADAPTER_FORMAT = "opensora-lora/1"


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------
def lora_target_names(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the plain ``nn.Linear`` modules of ``model`` matching any fnmatch pattern.

    ConfigError (exit 2) when a pattern matches no Linear, naming it and some valid names.
    """
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    found: list[str] = []
    for pattern in patterns:
        hits = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            examples = ", ".join(sorted({_generic(n) for n in linears})[:12])
            raise ConfigError(
                f"lora.target_modules: {pattern!r} matches no Linear module of the MMDiT; "
                f"Linear names look like: {examples}"
            )
        found += [h for h in hits if h not in found]
    return found


def _generic(name: str) -> str:
    """``double_blocks.3.img_attn.q_proj`` -> ``double_blocks.*.img_attn.q_proj``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap ``model``'s target Linears with fresh LoRA adapters in place and freeze everything
    else; returns the wrapped module names. Only the A and B matrices keep ``requires_grad``.

    The adapters' A matrices are drawn from torch's global RNG (seed it first for a reproducible
    start); B starts at zero, so the output is unchanged until training moves B.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if is_lora(model):
        raise ConfigError("the model already carries a LoRA adapter")
    if cfg.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {cfg.rank}")
    targets = lora_target_names(model, cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none"
    )
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return targets


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_lora(model: nn.Module) -> bool:
    """True when ``model`` carries LoRA layers."""
    return bool(_lora_layers(model))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------
# Adapter state
# --------------------------------------------------------------------------------------------
def _export_key(name: str) -> str:
    return name.replace(f".{ADAPTER_NAME}.", ".")


def _internal_key(name: str) -> str:
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.", f".{part}.{ADAPTER_NAME}.")
    return name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's A (r, in) and B (out, r) tensors, keyed by their export names, fp32 on CPU."""
    return {
        _export_key(name): p.detach().float().cpu().contiguous()
        for name, p in model.named_parameters()
        if ".lora_" in name
    }


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy an :func:`adapter_state_dict` (export or internal keys) into a LoRA model.

    InputError (exit 2) before changing anything when keys are missing, unexpected or shaped
    differently: an adapter trained on another base or with another rank does not fit.
    """
    params = {_export_key(n): p for n, p in model.named_parameters() if ".lora_" in n}
    given = {_export_key(k): v for k, v in state.items()}
    missing = sorted(params.keys() - given.keys())
    unexpected = sorted(given.keys() - params.keys())
    mismatched = [
        f"{k}: {tuple(given[k].shape)} vs {tuple(params[k].shape)}"
        for k in sorted(params.keys() & given.keys())
        if tuple(given[k].shape) != tuple(params[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise InputError(
            "the LoRA adapter does not fit this model (an adapter for another base or rank?): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched"
            + "".join(f"\n  {line}" for line in (mismatched + missing + unexpected)[:10])
        )
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(given[key].to(dtype=p.dtype, device=p.device))


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Multiply every adapter's term by ``scale`` (1 = as trained, 0 = the base alone)."""
    for _, layer in _lora_layers(model):
        layer.scaling[ADAPTER_NAME] = scale * layer.lora_alpha[ADAPTER_NAME] / layer.r[ADAPTER_NAME]


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear (``W += s B A``) and put the plain Linear back in
    its place, in place; returns ``model``, whose state dict keys are the base's again."""
    for name, layer in _lora_layers(model):
        layer.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def merged_state_dict(model: nn.Module, adapter: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain (base-keyed) weights of a LoRA model, fp32 on CPU, with ``adapter`` (for example
    the EMA of the adapter) in place of its own; ``model`` itself is left unchanged."""
    twin = copy.deepcopy(model)
    if adapter is not None:
        load_adapter_state(twin, adapter)
    merge_lora(twin)
    return {k: v.detach().float().cpu().contiguous() for k, v in twin.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def save_adapter(
    directory: str | Path,
    state: Mapping[str, torch.Tensor],
    cfg: LoraConfig,
    targets: list[str],
    base: Mapping[str, Any],
) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``directory``; returns it.

    ``base`` names what the adapter was trained on: at least ``sha256`` (of the base weights file),
    and ``model_name`` / ``version`` when the base came from the registry.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({_export_key(k): v.float().cpu().contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS))
    meta = {
        "format": ADAPTER_FORMAT,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "target_modules": list(targets),
        "base": dict(base),
    }
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter.json) of an adapter folder; InputError (exit 2) when it is not one."""
    directory = Path(directory)
    weights, meta_file = directory / ADAPTER_WEIGHTS, directory / ADAPTER_META
    if not weights.is_file() or not meta_file.is_file():
        raise InputError(f"not a LoRA adapter folder: {directory} (needs {ADAPTER_WEIGHTS} and {ADAPTER_META})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise InputError(f"{meta_file}: unknown adapter format {meta.get('format')!r}")
    return load_file(str(weights)), meta


def apply_adapter(model: nn.Module, directory: str | Path, scale: float = 1.0) -> dict[str, Any]:
    """Wrap ``model`` with the adapter saved in ``directory`` at ``scale``; returns its adapter.json.

    InputError (exit 2) when the adapter does not fit the model (another base's shapes or names).
    """
    state, meta = read_adapter(directory)
    cfg = LoraConfig(
        enabled=True, rank=int(meta["rank"]), alpha=float(meta["alpha"]), target_modules=list(meta["target_modules"])
    )
    try:
        apply_lora(model, cfg)
    except ConfigError as exc:
        raise InputError(f"the LoRA adapter in {directory} does not fit this model: {exc}") from exc
    load_adapter_state(model, state)
    set_lora_scale(model, scale)
    return meta
