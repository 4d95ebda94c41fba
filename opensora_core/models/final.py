"""Reading the ``final/`` folders that training writes: the trained VAE, the MMDiT, the statistics.

Training (``opensora_core.training``) and inference (``opensora_core.inference``) both load these
folders, so the readers live here, below both:

- ``models/vae/final/``: ``ema.safetensors`` / ``model.safetensors`` + ``vae.json`` (the VAE stage);
- ``models/vae/latent_stats.json``: per-channel ``mean`` and ``std``, ``scale``, ``shift`` and the
  VAE's ``vae_sha256`` (the vae_stats stage);
- ``models/diffusion/NAME/final/``: :data:`FINAL_FILES` (a diffusion stage, see
  :func:`opensora_core.training.diffusion_outputs.save_final`).

The model modules are imported inside the loaders: the VAE's imports diffusers (seconds), and the
VAE stages that read only the VAE do not depend on the MMDiT's code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from opensora_core.errors import InputError

if TYPE_CHECKING:
    from opensora_core.models.mmdit.model import MMDiT
    from opensora_core.models.vae.model import VideoAutoencoder

FINAL_MODEL = "model.safetensors"
FINAL_EMA = "ema.safetensors"
FINAL_FILES = (FINAL_MODEL, FINAL_EMA, "mmdit_config.json", "config.json", "text_encoder.json")
"""What a diffusion stage's ``final/`` folder holds (``samples.png`` beside them when sampled)."""


REGISTRY_WEIGHTS = "mmdit.safetensors"
"""The MMDiT weights file of a bundle, and of a registered base's copy under the cache."""


def registry_cache_dir(cache_root: str | Path, uri: str) -> Path:
    """Where a registered model ``uri`` is kept once downloaded (its bundle, ``mmdit.safetensors``
    and ``source.json``): ``<cache_root>/registry/<the URI as a file name>/``."""
    return Path(cache_root) / "registry" / re.sub(r"[^A-Za-z0-9_.-]+", "_", uri[len("models:/") :])


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; InputError naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise InputError(f"not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc


def dataclass_from(cls: type, data: Mapping[str, Any]) -> Any:
    """``cls(**data)`` with only the keys ``cls`` knows (files may carry more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
def load_vae_final(path: str | Path, use_ema: bool = True) -> VideoAutoencoder:
    """The VAE of a ``models/vae/final/`` folder (EMA weights by default), on CPU, in eval mode."""
    from opensora_core.models.vae.model import VideoAutoencoder

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"VAE folder not found: {path} (run the vae_train stage first)")
    name = "ema" if use_ema and (path / "ema.safetensors").is_file() else "model"
    return VideoAutoencoder.load(path, name).eval()


def load_vae_dir(path: str | Path) -> VideoAutoencoder:
    """The VAE of a ``final/`` folder, frozen (``requires_grad`` off), on CPU, in eval mode."""
    return load_vae_final(path).requires_grad_(False)


def read_latent_stats(path: Path) -> dict[str, Any]:
    """``latent_stats.json``: ``mean``, ``std`` per channel, ``scale``, ``shift`` and ``vae_sha256``."""
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the latent statistics {path}: {exc}") from exc
    missing = [k for k in ("mean", "std", "vae_sha256") if k not in stats]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} (written by the vae_stats stage)")
    return stats


def load_latent_stats(path: str | Path) -> dict[str, Any]:
    """The statistics file as it is (a bundle's copy need not carry ``vae_sha256``)."""
    return read_json(Path(path))


def build_frozen_vae(path: Path, stats: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The VAE of ``path`` (its EMA weights) with the latent statistics, frozen, on ``device``."""
    vae = load_vae_final(path)
    vae.set_latent_stats(stats)
    return vae.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# MMDiT
# --------------------------------------------------------------------------------------------
def load_mmdit_final(path: str | Path, use_ema: bool = True) -> MMDiT:
    """MMDiT of a diffusion stage's ``final/`` folder (``ema.safetensors`` or ``model.safetensors``)."""
    from opensora_core.models.mmdit.model import MMDiTConfig, build_mmdit

    path = Path(path)
    config = read_json(path / "mmdit_config.json")
    model = build_mmdit(dataclass_from(MMDiTConfig, config))
    names = (FINAL_EMA, FINAL_MODEL) if use_ema else (FINAL_MODEL,)
    weights = next((path / n for n in names if (path / n).is_file()), None)
    if weights is None:
        raise InputError(f"no MMDiT weights ({' or '.join(names)}) in {path}")
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


def load_diffusion_final(path: str | Path, use_ema: bool = True) -> tuple[MMDiT, dict[str, Any]]:
    """A stage's ``final/`` folder -> (the MMDiT in eval mode, its resolved config as a dict)."""
    path = Path(path)
    missing = [name for name in FINAL_FILES if not (path / name).is_file()]
    if missing:
        raise InputError(f"{path} is not a diffusion final/ folder: missing {', '.join(missing)}")
    return load_mmdit_final(path, use_ema=use_ema), json.loads((path / "config.json").read_text())


def resolve_weights_file(path: Path) -> Path:
    """The weights file ``--load`` or ``init_from`` names: a file, a ``final/`` folder's EMA file, or a folder."""
    if path.is_dir() and (path / FINAL_EMA).is_file() and (path / "mmdit_config.json").is_file():
        return path / FINAL_EMA
    return path
