"""Load MMDiT weights by key from safetensors: one file, a sharded folder, or a folder of files.

Works for Open-Sora 2.0's released checkpoint and for this project's own exports. Shapes are read
from the file headers first, so a ``strict`` load that would fail leaves the model untouched, and
tensors are then read one at a time (peak memory: the model plus one tensor). A model built on the
meta device gets real tensors assigned in place of its meta ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from opensora_core.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
# Prefixes that wrappers add to parameter names: DDP / ColossalAI's model wrapper, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What a load did: keys loaded, missing from the checkpoint, unexpected in it, or shaped differently."""

    files: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """(key, shape in the checkpoint, shape in the model)."""

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and nothing in the checkpoint was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        where = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        lines = [
            f"loaded {len(self.loaded)}/{total} model tensors from {where}: {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        ]
        lines += _listing("missing from the checkpoint", self.missing)
        lines += _listing("unexpected in the checkpoint", self.unexpected)
        lines += _listing(
            "shape mismatch (checkpoint vs model)",
            [f"{key}: {tuple(ckpt)} vs {tuple(model)}" for key, ckpt, model in self.mismatched],
        )
        return "\n".join(lines)


class IncompatibleWeights(InputError):
    """A strict load found missing, unexpected or shape-mismatched keys; ``report`` says which."""

    def __init__(self, report: LoadReport) -> None:
        super().__init__(str(report))
        self.report = report


def _listing(title: str, items: list[str], limit: int = 20) -> list[str]:
    if not items:
        return []
    more = [f"  ... and {len(items) - limit} more"] if len(items) > limit else []
    return [f"{title}:"] + [f"  {item}" for item in items[:limit]] + more


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files behind ``path``: the file itself, the shards a sharded index names, or
    every ``*.safetensors`` in a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"no checkpoint at {path}: expected a .safetensors file or a folder of them")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise InputError(f"{index} names shards that do not exist: {', '.join(absent)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path} holds no *.safetensors files and no {INDEX_FILE}")
    return files


def _strip_wrapper(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def check_mmdit_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """The report a load of ``path`` into ``model`` would give, from the file headers only (nothing
    is read or copied; ``model`` may live on the meta device)."""
    return _plan_load(model, path)[0]


def _plan_load(model: nn.Module, path: str | Path) -> tuple[LoadReport, list[tuple[Path, str, str]]]:
    """(report without ``loaded``, the (file, key in file, model key) of every tensor that fits)."""
    files = checkpoint_files(path)
    targets = model.state_dict(keep_vars=True)
    report = LoadReport(files=[str(f) for f in files])

    # 1. read names and shapes from the headers only
    plan: list[tuple[Path, str, str]] = []  # (file, key in file, model key)
    seen: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles have keys(), not iteration
                name = _strip_wrapper(key)
                if name not in targets:
                    report.unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(targets[name].shape):
                    report.mismatched.append((name, shape, tuple(targets[name].shape)))
                else:
                    plan.append((file, key, name))
                seen.add(name)
    report.missing = [name for name in targets if name not in seen]
    return report, plan


def load_mmdit_weights(model: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Copy the tensors of the checkpoint at ``path`` into ``model`` by name; returns the report.

    Keys whose shapes differ are skipped and reported. ``strict=True`` raises
    :class:`IncompatibleWeights` (exit code 2) before changing the model if anything is missing,
    unexpected or mismatched. Tensors are cast to the dtype of the model's tensor they replace.
    """
    report, plan = _plan_load(model, path)
    files = [Path(f) for f in report.files]
    targets = model.state_dict(keep_vars=True)
    if strict and not report.ok:
        raise IncompatibleWeights(report)

    # 2. copy tensor by tensor
    with torch.no_grad():
        for file in files:
            keys = [(key, name) for f_, key, name in plan if f_ == file]
            if not keys:
                continue
            with safe_open(file, framework="pt", device="cpu") as f:
                for key, name in keys:
                    _assign(model, name, targets[name], f.get_tensor(key))
                    report.loaded.append(name)
    return report


def _assign(model: nn.Module, name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``target``, or put it in the module's place when ``target`` is on meta."""
    if not target.is_meta:
        target.copy_(value)
        return
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = value.to(dtype=target.dtype)
    if isinstance(target, nn.Parameter):
        module.register_parameter(attr, nn.Parameter(value, requires_grad=target.requires_grad))
    else:
        module.register_buffer(attr, value)
