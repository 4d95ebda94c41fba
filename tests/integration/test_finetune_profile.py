"""``params/finetune.yaml`` end to end: the session pipeline's champion LoRA-fine-tuned on a folder
of captioned videos through the Prefect flow and the same DVC stages, in a second repository copy
that shares the session's registry (a copy of its sqlite store), ending with a new version whose
tags name its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from opensora_core.config import deep_merge
from tests.integration.conftest import Project, make_project_copy

MICRO = {  # the sizes of params/ci.yaml: micro steps, 9-frame buckets, a small evaluation
    "meta": {"num_workers": 0, "progress": False},
    "ingest": {"val_fraction": 0.3},
    "register": {"gate": {"vae_psnr": 0.0}, "gate_max": {"val_loss": 1000.0}},
}


def micro_profile(repo: Path) -> None:
    """The copy's finetune.yaml with ci.yaml's micro sizes (steps, buckets, evaluation) merged in."""
    ci = yaml.safe_load((repo / "params" / "ci.yaml").read_text())
    path = repo / "params" / "finetune.yaml"
    profile = yaml.safe_load(path.read_text())
    micro = {**MICRO, "evaluate": ci["evaluate"]}
    micro["diffusion"] = {k: v for k, v in ci["diffusion"].items() if k != "stages"}
    micro["diffusion"]["stages"] = {
        n: {"steps": 2, "buckets": s["buckets"]} for n, s in ci["diffusion"]["stages"].items()
    }
    path.write_text(yaml.safe_dump(deep_merge(profile, micro)))


@pytest.fixture(scope="module")
def finetune(project: Project, pipeline_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Project:
    champion = json.loads((project.root / "models" / "registry.json").read_text())
    assert "champion" in champion["aliases"]
    ft = make_project_copy(tmp_path_factory.mktemp("finetune"), profile="finetune.yaml")
    shutil.copy2(project.root / "mlflow.db", ft.root / "mlflow.db")  # the same registry, a new store file
    # a team's folder: the session's clips, each with its caption beside it
    index = pd.read_csv(project.root / "data" / "raw" / "index.csv")
    clips = index[index["path"].str.endswith(".mp4")]
    folder = ft.root / "data" / "finetune"
    folder.mkdir(parents=True)
    for i, row in enumerate(clips.itertuples()):
        shutil.copy2(project.root / row.path, folder / f"clip{i:03d}.mp4")
        (folder / f"clip{i:03d}.txt").write_text(row.text)
    micro_profile(ft.root)
    ft.python("-m", "flows.pipeline", "--root", str(ft.root), timeout=1500)
    ft.champion_before = champion  # type: ignore[attr-defined]
    return ft


def test_finetune_registers_a_lora_version_naming_its_base(finetune: Project) -> None:
    from mlflow.tracking import MlflowClient

    before = finetune.champion_before  # type: ignore[attr-defined]
    record = json.loads((finetune.root / "models" / "registry.json").read_text())
    assert int(record["version"]) == int(before["version"]) + 1
    client = MlflowClient(f"sqlite:///{finetune.root / 'mlflow.db'}")
    tags = client.get_model_version("opensora-t2v", record["version"]).tags
    assert tags["lora"] == "true" and tags["base.model_name"] == "opensora-t2v"
    assert tags["base.version"] == before["version"] and len(tags["base.sha256"]) == 64


def test_finetune_reused_the_vae_and_trained_one_adapter(finetune: Project) -> None:
    from safetensors.torch import load_file

    root = finetune.root
    stats = json.loads((root / "models" / "vae" / "latent_stats.json").read_text())
    assert stats["reused_from"] == "models:/opensora-t2v@champion"
    bundles = list((root / "data" / "cache" / "registry").glob("*/bundle/vae.safetensors"))
    assert bundles
    theirs, ours = (
        load_file(str(bundles[0])),
        load_file(str(root / "models" / "vae" / "final" / "ema.safetensors")),
    )
    assert theirs.keys() == ours.keys() and all(theirs[k].equal(ours[k]) for k in ours)
    adapters = [
        json.loads((root / f"models/diffusion/{s}/final/adapter/adapter.json").read_text())
        for s in ("stage1", "stage2", "stage3")
    ]
    assert len({a["base"]["sha256"] for a in adapters}) == 1  # every stage adapted the same base
    ckpt = sorted((root / "models" / "diffusion" / "stage3" / "ckpt").glob("step-*"))[-1]
    assert json.loads((ckpt / "meta.json").read_text())["trainable_only"] is True
