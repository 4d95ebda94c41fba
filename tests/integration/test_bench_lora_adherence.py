"""benchmarks/lora_adherence.py --tiny end to end (data stages, two torchrun trainings, both arms
scored), so that the script cannot rot: the structure of what it writes, both arms on the same
prompts and seeds, the held-out split kept apart from the base and given to the fine-tune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from opensora_core.data.shards import file_sha256
from opensora_core.data.synthetic import held_out_combos

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lora_adherence.py"
PAIRS = ["red circle", "blue square", "up triangle"]


def shard_rows(folder: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora-adherence")
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--seeds", "5,9"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "held-out delta: overall" in done.stdout
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.bench
@pytest.mark.slow
def test_both_arms_scored_on_the_same_prompts_and_seeds(tiny: tuple[Path, dict]) -> None:
    out, report = tiny
    assert report["pairs"] == PAIRS and report["seeds"] == [5, 9] and report["splits"] == ["val"]
    held = set(held_out_combos(0, 0, PAIRS))
    base, lora = (report["results"][arm]["val"] for arm in ("base", "lora"))
    keys = {"color", "motion", "shape", "overall", "joint"}
    for arm in (base, lora):
        assert set(arm["mean"]) == keys and set(arm["per_seed"]) == {"5", "9"}
        assert len(arm["samples"]) == 2 * report["num_prompts"]
        for s in arm["samples"]:  # every prompt asks for a held-out combination
            assert (s["asked"]["shape"], s["asked"]["color"], s["asked"]["motion"]) in held
    assert [(s["prompt"], s["seed"]) for s in base["samples"]] == [
        (s["prompt"], s["seed"]) for s in lora["samples"]
    ]
    assert {s["seed"] for s in base["samples"]} == {5, 6, 7, 8, 9, 10, 11, 12}  # seed + i, two seeds
    for key in keys:
        assert report["delta"]["val"][key] == pytest.approx(lora["mean"][key] - base["mean"][key])
        per_seed = [base["per_seed"][s][key] for s in ("5", "9")]
        assert base["mean"][key] == pytest.approx(sum(per_seed) / 2)
    table = (out / "results.md").read_text()
    assert "| held out | base |" in table and "| held out | base + LoRA |" in table and "**delta**" in table
    assert (out / "grid.png").stat().st_size > 0


@pytest.mark.bench
@pytest.mark.slow
def test_base_never_saw_the_pairs_and_the_adapter_trained_on_them(tiny: tuple[Path, dict]) -> None:
    out, report = tiny
    held = set(held_out_combos(0, 0, PAIRS))
    labels = pd.read_parquet(out / "base" / "data" / "raw" / "labels.parquet")
    train = labels[labels["split"] == "train"]
    assert not {(r.shape, r.color, r.motion) for r in train.itertuples()} & held
    assert set(shard_rows(out / "base" / "data" / "shards").query("split == 'train'")["path"]) <= set(
        train["path"]
    )
    # the fine-tune trains on the second draw's held-out clips, and on nothing else
    draw = pd.read_parquet(out / "ft" / "data" / "draw" / "raw" / "labels.parquet")
    ft = shard_rows(out / "ft" / "data" / "shards")
    assert len(ft) == report["finetune"]["clips"] > 0 and set(ft["split"]) == {"train"}
    held_paths = {str((ROOT / p).resolve()) for p in draw[draw["split"] == "val"]["path"]}
    assert {str((ROOT / p).resolve()) for p in ft["path"]} == held_paths
    # an adapter of the base: its recorded hash is the base's weights file, a few % of its size
    base_final = Path(report["base"]["final"])
    assert report["finetune"]["adapter_base_sha256"] == file_sha256(base_final / "ema.safetensors")
    ft_summary = report["finetune"]
    assert 0 < ft_summary["adapter_parameters"] < 0.05 * ft_summary["base_parameters"]
    assert ft_summary["stage"]["lora"]["rank"] == 4 and ft_summary["stage"]["steps"] == 3


def test_one_seed_is_refused_before_any_work(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--seeds", "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--seeds needs at least two" in done.stderr
    assert not any(tmp_path.iterdir())


def test_bad_pair_and_missing_vae_exit_2_naming_them(tmp_path: Path) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), *extra]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    bad = run("--tiny", "--pairs", "purple circle")
    assert bad.returncode == 2 and "ingest.val_pairs" in bad.stderr and "'purple circle'" in bad.stderr
    missing = run("--vae", str(tmp_path / "no-vae"), "--latent-stats", str(tmp_path / "no.json"))
    assert missing.returncode == 2 and "no-vae" in missing.stderr
