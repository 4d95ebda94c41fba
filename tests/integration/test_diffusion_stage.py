"""``python -m tasks.diffusion_train`` end to end: CLI -> torchrun -> job, in the session's repository copy.

Inputs (clips, shards, a tiny VAE and its statistics) are written under ``<copy>/dtest/`` and the
stage reads them through its path options, on the ``params/ci.yaml`` micro profile. Outputs,
cache and MLflow store stay in that folder, apart from the pipeline's own.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

from opensora_core.models.mmdit import build_mmdit
from opensora_core.training.diffusion_trainer import load_diffusion_final
from tests.integration.conftest import Project
from tests.unit.training._diffusion_data import DiffusionInputs, make_diffusion_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The helper's clips are 32x32: stage2 of the micro profile gets a 32 px bucket beside its 48 px one.
STAGE2_32PX = "diffusion.stages.stage2.buckets={32px: {9: [1.0, 2]}}"


@dataclass
class Stage:
    project: Project
    inputs: DiffusionInputs

    def run(self, stage: str, *extra: str, models: str = "models", stats: Path | None = None):
        p = self.inputs.paths
        base = self.inputs.root
        return self.project.run(
            sys.executable,
            "-m",
            "tasks.diffusion_train",
            "--stage",
            stage,
            "--shards",
            str(p.shards),
            "--vae",
            str(p.vae),
            "--latent-stats",
            str(stats or p.latent_stats),
            "--models-dir",
            str(base / models),
            "--metrics-dir",
            str(base / models / "metrics"),
            "--set",
            f"diffusion.cache_dir={base / 'cache'}",
            *extra,
            check=False,
            timeout=600,
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}"},
        )


@pytest.fixture(scope="module")
def stage(project: Project) -> Stage:
    return Stage(project, make_diffusion_inputs(project.root / "dtest"))


def summary_of(stage: Stage, name: str, models: str = "models") -> dict:
    return json.loads((stage.inputs.root / models / "metrics" / f"diffusion_{name}.json").read_text())


@pytest.fixture(scope="module")
def stage1(stage: Stage):
    """The micro profile's stage1, run once for the tests that read or continue it."""
    return stage.run("stage1")


def test_stage1_writes_final_weights_curve_and_summary(stage: Stage, stage1) -> None:
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    assert re.search(r"diffusion_train: stage1: 4 steps \(4 run\), final loss \d", stage1.stdout), (
        stage1.stdout
    )
    model, config = load_diffusion_final(stage.inputs.root / "models" / "stage1" / "final")
    assert config["diffusion"]["stages"]["stage1"]["steps"] == 4  # the micro profile's
    assert model.config.hidden_size == build_mmdit("tiny").config.hidden_size
    curve = (stage.inputs.root / "models" / "metrics" / "diffusion_stage1_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss,lr,grad_norm" and len(curve) == 3  # logged at steps 2 and 4
    png = Image.open(stage.inputs.root / "models" / "metrics" / "diffusion_stage1_loss.png")
    assert png.format == "PNG" and png.size == (640, 420)
    ckpts = sorted(p.name for p in (stage.inputs.root / "models" / "stage1" / "ckpt").iterdir())
    assert ckpts == ["FINISHED.json", "step-00000004"]  # the finished run's marker (run_key.py)


def test_stage2_starts_from_stage1_final_ema(stage: Stage, stage1) -> None:
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    second = stage.run("stage2", "--set", STAGE2_32PX)
    assert second.returncode == 0, second.stderr[-3000:]
    final1 = stage.inputs.root / "models" / "stage1" / "final"
    assert summary_of(stage, "stage2")["init"] == str(final1 / "ema.safetensors")
    _, config2 = load_diffusion_final(stage.inputs.root / "models" / "stage2" / "final")
    assert config2["run"]["init_sha256"] and config2["run"]["stage"] == "stage2"


def test_longer_rerun_resumes_the_checkpoint(stage: Stage, stage1) -> None:
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    # a copy of stage1's checkpoints: a rerun asking for more steps continues from them
    shutil.copytree(
        stage.inputs.root / "models" / "stage1" / "ckpt", stage.inputs.root / "resume" / "stage1" / "ckpt"
    )
    again = stage.run("stage1", "--set", "diffusion.stages.stage1.steps=6", models="resume")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = summary_of(stage, "stage1", "resume")
    assert summary["steps"] == 6 and summary["steps_run"] == 2
    assert summary["resumed_from"].endswith("step-00000004")
    assert "resumed from step-00000004" in again.stdout


def test_bad_stage_and_missing_inputs_exit_2_before_launch(stage: Stage) -> None:
    bad = stage.run("stage9")
    assert bad.returncode == 2
    assert (
        "unknown diffusion stage 'stage9'; stages in diffusion.stages: stage1, stage2, stage3" in bad.stderr
    )
    assert "launch:" not in bad.stderr  # nothing was started
    missing = stage.run("stage3", models="nothing-yet")
    assert missing.returncode == 2 and "run diffusion_stage2" in missing.stderr


def test_non_finite_loss_exits_5_without_checkpoint(stage: Stage) -> None:
    stats = json.loads(stage.inputs.paths.latent_stats.read_text())
    stats["scale"] = 1e30  # latents of 1e30: the loss overflows float32 at once
    poisoned = stage.inputs.root / "poisoned_stats.json"
    poisoned.write_text(json.dumps(stats))
    out = stage.run("stage1", "--set", "diffusion.ckpt_every=1", models="nan", stats=poisoned)
    assert out.returncode == 5, out.stderr[-3000:]
    assert re.search(r"NonFiniteLoss: non-finite loss at step 1 .*bucket 32px/", out.stderr)
    ckpt = stage.inputs.root / "nan" / "stage1" / "ckpt"
    assert not ckpt.exists() or not [p for p in ckpt.iterdir() if (p / "COMPLETE").exists()]
    assert not (stage.inputs.root / "nan" / "stage1" / "final").exists()


def test_load_released_weights_with_report(stage: Stage) -> None:
    weights = build_mmdit("tiny").state_dict()
    weights.pop("cond_in.weight")  # an older checkpoint without the condition embedding
    released = stage.inputs.root / "released.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(released))
    out = stage.run(
        "stage3", "--load", str(released), "--set", STAGE2_32PX.replace("stage2", "stage3"), models="load"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"loaded \d+/\d+ model tensors .* 1 missing, 0 unexpected", out.stderr)
    assert "cond_in.weight" in out.stderr
    summary = summary_of(stage, "stage3", "load")
    assert summary["init"] == str(released) and summary["steps"] == 3
