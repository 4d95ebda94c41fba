"""VAE training pieces in one process (gloo group of one, ColossalAI ddp plugin) on real clips.

A micro data set of MovingShapes clips (32x32, 9 frames, PyAV) sharded like the shard stage
does; the trainer runs a few steps on it: the loss goes down, the final folder loads back,
a NaN stops the run with NonFiniteLoss, the GAN path updates the discriminator.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from opensora_core.config import Config, IngestConfig, ShardConfig
from opensora_core.data.shards import write_shards
from opensora_core.data.synthetic import plan_samples, write_sample
from opensora_core.distributed.dist import destroy_distributed, init_distributed
from opensora_core.errors import InputError, NonFiniteLoss
from opensora_core.models.vae import VideoAutoencoder
from opensora_core.training.checkpoint import resume_config_hash
from opensora_core.training.vae_trainer import (
    RUN_EXCLUDE,
    VaePaths,
    VaeTrainer,
    load_vae_final,
    resolved_config,
    write_loss_csv,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of 8 train clips + 2 val clips (32x32, 9 frames) and 2 stills, absolute paths."""
    root = tmp_path_factory.mktemp("vae_data")
    ingest = IngestConfig(
        num_clips=10, num_stills=2, sizes=[[32, 32]], num_frames=[9], fps=[8], val_combos=1, seed=0
    )
    rows = []
    for sample in plan_samples(ingest):
        path = write_sample(sample, root / "raw")
        rows.append(
            {
                "path": str(path),
                "text": sample.text,
                "split": sample.split,
                "num_frames": 1 if sample.kind == "still" else sample.num_frames,
                "height": sample.height,
                "width": sample.width,
                "fps": sample.fps or None,
            }
        )
    write_shards(pd.DataFrame(rows), root / "shards", ShardConfig(rows_per_shard=5), progress=False)
    return root / "shards"


@pytest.fixture
def dist():
    info = init_distributed()
    yield info
    destroy_distributed()


def micro_config(**vae_train: object) -> Config:
    cfg = Config()
    cfg.tracking.enabled = False
    settings = {
        "steps": 8,
        "lr": 2e-3,
        "warmup_steps": 1,
        "buckets": {"32px": {9: [1.0, 2]}},
        "log_every": 2,
        "ckpt_every": 100,
        "sample_every": 0,
        "val_clips": 2,
        **vae_train,
    }
    for key, value in settings.items():
        setattr(cfg.vae_train, key, value)
    return cfg


def paths_in(tmp_path: Path, shards: Path) -> VaePaths:
    return VaePaths(
        shards=shards,
        final=tmp_path / "vae/final",
        ckpt=tmp_path / "vae/ckpt",
        metrics=tmp_path / "metrics/vae.json",
        loss_csv=tmp_path / "metrics/vae_train_loss.csv",
        reports=tmp_path / "reports/vae",
    )


def fixed_batch(trainer: VaeTrainer) -> dict:
    return next(trainer.loader)


def test_a_few_steps_on_one_batch_lower_the_loss(tmp_path, shards, dist) -> None:
    trainer = VaeTrainer(micro_config(), paths_in(tmp_path, shards), dist)
    batch = fixed_batch(trainer)
    assert batch["video"].shape == (2, 3, 9, 32, 32)
    losses = [trainer.train_step(batch)["l1"] for _ in range(8)]
    assert trainer.step == 8
    assert sum(losses[-2:]) < 0.7 * sum(losses[:2]), losses


def test_fit_writes_checkpoints_and_a_final_folder_that_loads(tmp_path, shards, dist) -> None:
    cfg = micro_config(steps=4, ckpt_every=2, keep_last_n=1)
    paths = paths_in(tmp_path, shards)
    trainer = VaeTrainer(cfg, paths, dist)
    summary = trainer.fit()
    assert summary["step"] == 4 and summary["steps_run"] == 4 and not summary["resumed_from"]
    assert [p.name for p in paths.ckpt.iterdir()] == ["step-00000004"]  # keep_last_n = 1
    assert [h["step"] for h in trainer.history] == [2.0, 4.0]

    final = trainer.save_final()
    names = {p.name for p in final.iterdir()}
    assert {"model.safetensors", "model.json", "ema.safetensors", "ema.json", "config.json"} <= names
    config = json.loads((final / "config.json").read_text())
    assert config["vae_train"]["steps"] == 4
    raw, ema = load_vae_final(final, use_ema=False), load_vae_final(final)
    assert isinstance(ema, VideoAutoencoder) and not ema.training
    for name, value in trainer.vae.state_dict().items():
        assert torch.equal(raw.state_dict()[name], value), name
    # EMA (decay 0.99 over 4 steps) lags the raw weights.
    differs = [n for n, v in ema.state_dict().items() if not torch.equal(v, raw.state_dict()[n])]
    assert differs

    write_loss_csv(paths.loss_csv, trainer.history)
    with paths.loss_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["2.0", "4.0"] and float(rows[-1]["loss"]) > 0


def test_a_second_trainer_resumes_the_latest_checkpoint(tmp_path, shards, dist) -> None:
    paths = paths_in(tmp_path, shards)
    VaeTrainer(micro_config(steps=2, ckpt_every=2), paths, dist).fit()
    resumed = VaeTrainer(micro_config(steps=4, ckpt_every=2), paths, dist)  # more steps: same hash
    assert resumed.step == 2 and resumed.resumed_from.endswith("step-00000002")
    fresh = VaeTrainer(micro_config(steps=4, lr=1e-4), paths, dist)  # another LR: starts fresh
    assert fresh.step == 0 and fresh.resumed_from == ""


def test_resume_hash_ignores_other_stages_and_run_length(shards) -> None:
    from opensora_core.data.shards import ShardReader

    reader = ShardReader(shards, split="train")
    base = micro_config()
    other = micro_config(steps=999, log_every=5, ckpt_every=7, val_clips=1)
    other.evaluate.num_steps = 3
    other.launch.timeout_s = 60
    first = resume_config_hash(resolved_config(base, reader), RUN_EXCLUDE)
    assert resume_config_hash(resolved_config(other, reader), RUN_EXCLUDE) == first
    changed = micro_config(kl_weight=1e-3)
    assert resume_config_hash(resolved_config(changed, reader), RUN_EXCLUDE) != first


def test_random_crops_depend_on_seed_rank_and_step_only(tmp_path, shards, dist) -> None:
    trainer = VaeTrainer(micro_config(crop_size=16), paths_in(tmp_path, shards), dist)
    video = fixed_batch(trainer)["video"]
    first = trainer.prepare_video(video)
    assert first.shape == (2, 3, 9, 16, 16)
    assert torch.equal(first, trainer.prepare_video(video))  # same step: same crops
    # The crops are the windows at this step's offsets; other steps draw other offsets.
    tops, lefts = trainer.crop_offsets(2, 32, 32)
    for clip, crop, top, left in zip(video, first, tops, lefts):
        assert torch.equal(crop, clip[..., top : top + 16, left : left + 16])
    offsets = set()
    for step in range(6):
        trainer.step = step
        offsets.add(tuple(map(tuple, trainer.crop_offsets(2, 32, 32))))
    assert len(offsets) > 1
    assert torch.equal(
        VaeTrainer(micro_config(), paths_in(tmp_path, shards), dist).prepare_video(video), video
    )


def test_mse_term_enters_the_loss_with_its_weight(tmp_path, shards, dist) -> None:
    torch.manual_seed(0)
    with_mse = VaeTrainer(micro_config(mse_weight=10.0), paths_in(tmp_path / "a", shards), dist)
    batch = fixed_batch(with_mse)
    terms = with_mse.train_step(batch)
    rec = terms["l1"] + with_mse.tcfg.kl_weight * terms["kl"]
    assert terms["loss"] == pytest.approx(rec + 10.0 * terms["mse"], rel=1e-5)
    without = VaeTrainer(micro_config(mse_weight=0.0), paths_in(tmp_path / "b", shards), dist)
    terms = without.train_step(batch)
    assert terms["loss"] == pytest.approx(terms["l1"] + without.tcfg.kl_weight * terms["kl"], rel=1e-5)


def test_a_nan_batch_stops_with_non_finite_loss(tmp_path, shards, dist) -> None:
    trainer = VaeTrainer(micro_config(), paths_in(tmp_path, shards), dist)
    batch = fixed_batch(trainer)
    batch["video"] = torch.full_like(batch["video"], float("nan"))
    with pytest.raises(NonFiniteLoss, match="step 1"):
        trainer.train_step(batch)


def test_gan_term_updates_the_discriminator_after_its_start(tmp_path, shards, dist) -> None:
    cfg = micro_config(disc_weight=0.5, disc_start=1, disc_every=1)
    trainer = VaeTrainer(cfg, paths_in(tmp_path, shards), dist)
    batch = fixed_batch(trainer)
    disc = trainer.disc.unwrap() if hasattr(trainer.disc, "unwrap") else trainer.disc
    before = [p.detach().clone() for p in disc.parameters()]
    first = trainer.train_step(batch)
    assert first["gan"] == 0.0 and "d_loss" not in first  # before disc_start
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    second = trainer.train_step(batch)
    assert "d_loss" in second and second["gan_weight"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))


def test_load_vae_final_needs_the_folder(tmp_path) -> None:
    with pytest.raises(InputError, match="vae_train"):
        load_vae_final(tmp_path / "missing")
