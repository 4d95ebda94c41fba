"""The evaluate stage on tmp_path: MovingShapes data, shards and a tiny model; keys, reports, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from opensora_core.config import Config, load_config
from opensora_core.data.video_io import read_video
from opensora_core.errors import InputError
from opensora_core.jobs.evaluate import evaluate, make_grid
from tests.unit.tasks._tiny_t2v import write_eval_project

ROOT = Path(__file__).resolve().parents[3]
DESIGN_KEYS = {
    "val_loss",
    "val_loss_by_t",
    "vae_psnr",
    "vae_ssim",
    "adherence_color",
    "adherence_motion",
    "adherence_shape",
    "chance_color",
    "chance_motion",
    "num_samples",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    return root, write_eval_project(root)


def run(root, models, tag: str, cfg: Config) -> dict:
    return evaluate(
        cfg,
        models["diffusion"],
        models["vae"],
        models["latent_stats"],
        root / "data/shards",
        root / "data/raw/labels.parquet",
        root / f"metrics/{tag}.json",
        root / f"reports/{tag}",
        root=root,
        progress=False,
    )


def small_config() -> Config:
    sets = [
        "evaluate.num_steps=2",
        "evaluate.num_prompts=2",
        "evaluate.val_timesteps=[0.3, 0.8]",
        "evaluate.max_val_clips=3",
    ]
    return load_config(ROOT / "params.yaml", sets)


def test_eval_writes_the_contract_keys_reports_and_is_deterministic(project) -> None:
    root, models = project
    cfg = small_config()
    metrics = run(root, models, "a", cfg)
    written = json.loads((root / "metrics/a.json").read_text())
    assert set(written) >= DESIGN_KEYS
    assert set(written["val_loss_by_t"]) == {"0.3", "0.8"}
    assert math.isclose(written["val_loss"], np.mean(list(written["val_loss_by_t"].values())), abs_tol=1e-5)
    assert written["num_samples"] == 2 and written["num_val_clips"] == 3
    assert all(0.0 <= written[k] <= 1.0 for k in DESIGN_KEYS if k.startswith(("adherence", "chance")))
    assert written["chance_color"] == pytest.approx(1 / 6, abs=1e-6) and math.isfinite(written["vae_psnr"])
    assert metrics["val_loss"] == written["val_loss"]

    reports = root / "reports/a"
    videos = sorted((reports / "samples").glob("*.mp4"))
    assert len(videos) == 2 and all(v.with_suffix(".txt").is_file() for v in videos)
    frames, _ = read_video(videos[0])
    assert frames.shape == (9, 32, 32, 3)
    for name in ("grid.png", "metrics.png", "val_loss_by_t.csv", "adherence.csv"):
        assert (reports / name).is_file(), name
    assert len(pd.read_csv(reports / "adherence.csv")) == 2

    # Same seeds, same config: the same metrics file, byte for byte.
    run(root, models, "b", cfg)
    assert (root / "metrics/a.json").read_bytes() == (root / "metrics/b.json").read_bytes()


def test_missing_inputs_are_named(project, tmp_path) -> None:
    root, models = project
    with pytest.raises(InputError, match="nowhere"):
        evaluate(
            small_config(),
            tmp_path / "nowhere",
            models["vae"],
            models["latent_stats"],
            root / "data/shards",
            root / "data/raw/labels.parquet",
            tmp_path / "m.json",
            tmp_path / "r",
        )


def test_grid_has_one_row_per_video() -> None:
    videos = [np.full((9, 8, 10, 3), i * 50, dtype=np.uint8) for i in range(3)]
    grid = make_grid(videos, frames_per_row=4, gap=2)
    assert grid.shape == (3 * 8 + 2 * 2, 4 * 10 + 3 * 2, 3)
    assert grid[0, 0, 0] == 0 and grid[10, 0, 0] == 50 and grid[8, 0, 0] == 255


def test_data_without_labels_skips_adherence_and_reports_fvd_vae(project, tmp_path, caplog) -> None:
    from tasks.ingest import no_labels

    root, models = project
    empty = tmp_path / "labels.parquet"
    no_labels().to_parquet(empty, index=False)
    args = (models["diffusion"], models["vae"], models["latent_stats"], root / "data/shards")
    with caplog.at_level("WARNING"):
        metrics = evaluate(
            small_config(), *args, empty, tmp_path / "m.json", tmp_path / "r", root=root, progress=False
        )
    assert all(metrics[k] is None for k in DESIGN_KEYS if k.startswith(("adherence", "chance")))
    assert "no ground truth" in caplog.text and not (tmp_path / "r/adherence.csv").exists()
    # the label-free metrics, and the distance of 2 samples to the held-out clips in the VAE's latents
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["vae_psnr"])
    assert metrics["fvd_vae"] > 0 and metrics["fvd_vae_real_clips"] == 3
    assert json.loads((tmp_path / "m.json").read_text())["fvd_vae"] == metrics["fvd_vae"]

    with pytest.raises(InputError, match=r"labels table .*nothing\.parquet not found"):
        evaluate(small_config(), *args, tmp_path / "nothing.parquet", tmp_path / "m2.json", tmp_path / "r2")
