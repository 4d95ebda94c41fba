"""The register stage end to end: a tiny model registered as ``opensora-t2v@champion``, then loaded
with ``mlflow.pyfunc.load_model`` in a fresh process that writes a video PyAV decodes.

Runs in the scratch project copy, with its own MLflow store in ``tmp_path`` (the copy's store is
left to the pipeline tests).
"""

from __future__ import annotations

import json
import textwrap

import pytest

from opensora_core.data.video_io import read_video
from tests.unit.tasks._tiny_t2v import write_tiny_models

pytestmark = pytest.mark.slow

METRICS = {
    "val_loss": 1.0,
    "val_loss_by_t": {"0.5": 1.0},
    "vae_psnr": 30.0,
    "vae_ssim": 0.9,
    "adherence_color": 0.5,
    "adherence_motion": 0.4,
    "adherence_shape": 0.4,
    "chance_color": 1 / 6,
    "chance_motion": 0.2,
    "num_samples": 4,
}

LOAD_AND_PREDICT = """
import json, sys
import mlflow
import pandas as pd
model = mlflow.pyfunc.load_model("models:/opensora-t2v@champion")
prompts = pd.DataFrame({"prompt": ["a red circle moves left"]})
out = model.predict(prompts, params={"num_steps": 2, "save_dir": sys.argv[1], "seed": 3})
print(json.dumps({"paths": out["path"].tolist(), "seeds": out["seed"].tolist()}))

# The inference CLI resolves a run id to the model that run logged.
from tasks import sample
code = sample.main(["--model", sys.argv[2], "--prompt", "a blue square", "--num-steps", "2",
                    "--save-dir", sys.argv[1] + "/cli", "-q"])
sys.exit(code)
"""


def test_registered_champion_generates_in_a_fresh_process(project, tmp_path) -> None:
    models = write_tiny_models(tmp_path)
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(METRICS))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def register(metrics_path, out) -> dict:
        project.python(
            "-m",
            "tasks.register",
            "--model",
            str(models["diffusion"]),
            "--vae",
            str(models["vae"]),
            "--latent-stats",
            str(models["latent_stats"]),
            "--eval",
            str(metrics_path),
            "--output",
            str(out),
            "--set",
            f"tracking.artifact_dir={tmp_path / 'mlartifacts'}",
            "--set",
            "register.gate={vae_psnr: 20.0}",
            env=env,
        )
        return json.loads(out.read_text())

    # 1. the first version passes the gate and, with no champion yet, takes it
    record = register(eval_json, tmp_path / "registry.json")
    assert record["model_name"] == "opensora-t2v" and record["version"] == "1"
    assert record["aliases"] == ["candidate", "champion"] and record["gate"]["passed"]
    assert len(record["run_id"]) == 32 and record["tags"]["params_hash"]

    # 2. a fresh process loads @champion through pyfunc and writes a video
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(LOAD_AND_PREDICT))
    out = project.python(str(script), str(tmp_path / "videos"), record["run_id"], env=env)
    result = json.loads(out.stdout.strip().splitlines()[0])
    assert result["seeds"] == [3]
    frames, fps = read_video(result["paths"][0])
    assert frames.shape == (9, 32, 32, 3) and fps == pytest.approx(8.0)
    frames, _ = read_video(tmp_path / "videos" / "cli" / "0000_a-blue-square.mp4")
    assert frames.shape == (9, 32, 32, 3)
