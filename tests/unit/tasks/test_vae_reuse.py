"""Reusing a VAE and its statistics for a fine-tune: ``vae_stats.reuse_from`` copies statistics
with the current VAE's sha256, ``vae_train.init_from`` loads a VAE strictly; bad paths exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opensora_core.config import Config, VaeTrainConfig
from opensora_core.data.shards import file_sha256
from opensora_core.errors import InputError
from opensora_core.training.vae_trainer import build_model, load_vae_init
from tasks import vae_stats, vae_train
from tests.unit.tasks._tiny_t2v import write_tiny_models


def test_reused_statistics_carry_this_vaes_hash(tmp_path: Path) -> None:
    models = write_tiny_models(tmp_path)
    source = tmp_path / "champion_stats.json"
    source.write_text(json.dumps({"mean": [0.5] * 8, "std": [2.0] * 8, "scale": 1.0, "shift": 0.0}))
    cfg = Config()
    cfg.vae_stats.reuse_from = str(source)
    out = tmp_path / "latent_stats.json"
    stats = vae_stats.reuse_stats(cfg, models["vae"], out)
    assert json.loads(out.read_text()) == stats
    assert stats["mean"] == [0.5] * 8 and stats["reused_from"] == str(source)
    assert stats["vae_sha256"] == file_sha256(models["vae"] / "model.safetensors")
    cfg.vae_stats.reuse_from = str(tmp_path / "missing.json")
    with pytest.raises(InputError, match="not found"):
        vae_stats.reuse_stats(cfg, models["vae"], out)


def test_vae_init_from_loads_strictly(tmp_path: Path) -> None:
    models = write_tiny_models(tmp_path)  # a tiny Wan VAE without the shortcut
    cfg = VaeTrainConfig(init_from=str(models["vae"]), shortcut=False)
    model = build_model(cfg)
    load_vae_init(model, cfg, str(tmp_path / "cache"))
    saved = load_file(str(models["vae"] / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    empty = VaeTrainConfig(init_from=str(tmp_path))  # a folder without VAE weights
    with pytest.raises(InputError, match="init_from"):
        load_vae_init(build_model(empty), empty, "")
    bad = Config()
    bad.vae_train.init_from = str(tmp_path / "nothing")
    with pytest.raises(InputError) as err:
        vae_train.maybe_fetch_vae(bad)
    assert err.value.exit_code == 2
