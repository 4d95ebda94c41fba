"""LoRA at inference: an adapter applied to a pipeline's MMDiT, and bundles that hold an adapter and
a reference to their base instead of the whole MMDiT.

An adapter bundle is a bundle folder (see :mod:`opensora_core.inference.pipeline`) whose
``mmdit.safetensors`` is replaced by ``adapter/`` (``adapter.safetensors`` + ``adapter.json``) and
whose ``bundle.json`` names the base under ``base``: ``model_name`` and ``version`` in the MLflow
registry, or a weights ``path`` with its ``sha256``. Loading it loads the base's MMDiT and merges
the adapter into it (:func:`load_bundle_mmdit`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opensora_core.errors import InputError
from opensora_core.models.final import dataclass_from, read_json
from opensora_core.models.lora import ADAPTER_META, apply_adapter, merge_lora, read_adapter
from opensora_core.models.mmdit.model import MMDiT, MMDiTConfig, build_mmdit

log = logging.getLogger("opensora.inference")

MMDIT_WEIGHTS = "mmdit.safetensors"
ADAPTER_DIR = "adapter"


def find_adapter_dir(path: str | Path) -> Path:
    """An adapter folder, or a diffusion ``final/`` or bundle folder holding one in ``adapter/``."""
    path = Path(path)
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / ADAPTER_META).is_file():
            return candidate
    raise InputError(f"no LoRA adapter at {path} (expected {ADAPTER_META} there or in {ADAPTER_DIR}/)")


def merge_adapter_into(mmdit: MMDiT, adapter: str | Path, scale: float = 1.0) -> dict[str, Any]:
    """Apply the adapter at ``adapter`` to ``mmdit`` at ``scale`` and merge it into the weights
    (``W += scale * alpha / r * B A``), in place; returns its adapter.json. InputError (exit 2)
    when the adapter belongs to a base of other shapes."""
    meta = apply_adapter(mmdit, find_adapter_dir(adapter), scale)
    merge_lora(mmdit)
    return meta


def base_uri(base: Mapping[str, Any]) -> str:
    """``models:/NAME/VERSION`` of a registered base, or empty."""
    name, version = base.get("model_name"), base.get("version")
    return f"models:/{name}/{version}" if name and version else ""


def load_base_mmdit(base: Mapping[str, Any], config: MMDiTConfig, tracking_uri: str | None = None) -> MMDiT:
    """The MMDiT an adapter was trained on: the registered version it names, else its weights file
    (checked against the recorded sha256). InputError (exit 2) when neither can be had."""
    from opensora_core.data.shards import file_sha256
    from opensora_core.inference.sources import _client, download_bundle, resolve_model
    from opensora_core.models.mmdit.loader import load_mmdit_weights

    uri = base_uri(base)
    if uri:
        resolve_model(uri, tracking_uri)  # InputError when the version is not in this registry
        _client(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="opensora-base-") as tmp:
            return load_bundle_mmdit(download_bundle(uri, tmp), tracking_uri)
    path = Path(str(base.get("path", "")))
    if not path.is_file():
        raise InputError(
            f"the adapter's base is neither a registered version nor an existing file: {dict(base)}"
        )
    if base.get("sha256") and file_sha256(path) != base["sha256"]:
        raise InputError(f"the adapter's base {path} has changed since training (sha256 differs)")
    mmdit = build_mmdit(config)
    load_mmdit_weights(mmdit, path, strict=True)
    return mmdit


def load_bundle_mmdit(bundle: Path, tracking_uri: str | None = None) -> MMDiT:
    """A bundle's MMDiT: its own weights, or (an adapter bundle) its base with the adapter merged."""
    from safetensors.torch import load_file

    config = dataclass_from(MMDiTConfig, read_json(bundle / "mmdit_config.json"))
    if (bundle / MMDIT_WEIGHTS).is_file():
        mmdit = build_mmdit(config)
        mmdit.load_state_dict(load_file(str(bundle / MMDIT_WEIGHTS)))
        return mmdit.requires_grad_(False)
    _, meta = read_adapter(bundle / ADAPTER_DIR)
    mmdit = load_base_mmdit(meta.get("base", {}), config, tracking_uri)
    merge_adapter_into(mmdit, bundle / ADAPTER_DIR)
    log.info("loaded base %s with the adapter of %s", base_uri(meta.get("base", {})) or "file", bundle)
    return mmdit.requires_grad_(False)


def write_adapter_bundle(bundle: Path, adapter: str | Path) -> dict[str, Any]:
    """Turn a full bundle folder into an adapter bundle: drop its MMDiT weights, copy the adapter
    in; returns the adapter's base reference (for bundle.json and the registry tags)."""
    source = find_adapter_dir(adapter)
    _, meta = read_adapter(source)
    shutil.copytree(source, bundle / ADAPTER_DIR, dirs_exist_ok=True)
    (bundle / MMDIT_WEIGHTS).unlink(missing_ok=True)
    return dict(meta.get("base", {}))


def fetch_init_weights(uri: str, cache_root: str | Path, tracking_uri: str | None = None) -> Path:
    """The MMDiT weights of the registered model ``uri`` as one safetensors file under the cache
    (an adapter bundle's merged with its base), refreshed when the URI names another version;
    returns the file. ``source.json`` beside it holds the model name, version, run id and the
    file's sha256: what a fine-tune records as its base. InputError (exit 2) when it does not resolve.
    """
    import json
    import os

    from safetensors.torch import save_file

    from opensora_core.data.shards import file_sha256
    from opensora_core.inference.sources import fetch_registered_bundle

    bundle, source = fetch_registered_bundle(uri, cache_root, tracking_uri)
    weights = bundle.parent / MMDIT_WEIGHTS
    known = json.loads((bundle.parent / "source.json").read_text())
    if weights.is_file() and known.get("sha256"):
        return weights
    mmdit = load_bundle_mmdit(bundle, tracking_uri)
    tmp = weights.with_name(f".tmp-{weights.name}")
    save_file({k: v.float().contiguous() for k, v in mmdit.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    source["sha256"] = file_sha256(weights)
    (bundle.parent / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    log.info("%s: %s v%s -> %s", uri, source["model_name"], source["version"], weights)
    return weights
