"""The register stage on tmp_path with a real sqlite MLflow store: versions, aliases, tags, the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opensora_core.config import load_config
from opensora_core.errors import GateFailed
from tasks.register import register
from tests.unit.tasks._tiny_t2v import write_tiny_models

ROOT = Path(__file__).resolve().parents[3]
GOOD = {"val_loss": 1.0, "vae_psnr": 30.0, "vae_ssim": 0.9, "adherence_color": 0.5, "num_samples": 4}


def test_versions_aliases_tags_and_the_gate(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    models = write_tiny_models(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"content_hash": "abc123"}))

    def run(metrics: dict, *sets: str) -> dict:
        eval_path = tmp_path / "eval.json"
        eval_path.write_text(json.dumps(metrics))
        cfg = load_config(
            ROOT / "params.yaml",
            [f"tracking.artifact_dir={tmp_path / 'mlartifacts'}", "register.gate={vae_psnr: 20.0}", *sets],
        )
        out = tmp_path / "registry.json"
        args = (models["diffusion"], models["vae"], models["latent_stats"], eval_path, manifest, out)
        try:
            return register(cfg, *args, root=ROOT)
        finally:
            assert out.is_file()

    first = run(GOOD)
    assert first["version"] == "1" and first["aliases"] == ["candidate", "champion"] and first["promoted"]
    client = MlflowClient(uri)
    tags = client.get_model_version("opensora-t2v", "1").tags
    assert tags["data_manifest_hash"] == "abc123" and tags["metric.adherence_color"] == "0.5"
    assert tags["params_hash"] and "git_commit" in tags and tags["gate_passed"] == "true"
    assert client.get_model_version("opensora-t2v", "1").run_id == first["run_id"]

    # A worse model is registered as candidate only; the champion stays.
    second = run({**GOOD, "adherence_color": 0.3}, "register.fail_on_gate=true")
    assert second["aliases"] == ["candidate"] and not second["promoted"] and second["gate"]["passed"]
    assert str(client.get_model_version_by_alias("opensora-t2v", "champion").version) == "1"
    assert json.loads((tmp_path / "registry.json").read_text())["version"] == "2"

    # A failed gate with fail_on_gate: registered, recorded, exit code 3.
    with pytest.raises(GateFailed, match="vae_psnr") as err:
        run({**GOOD, "adherence_color": 0.9, "vae_psnr": 10.0}, "register.fail_on_gate=true")
    assert err.value.exit_code == 3
    record = json.loads((tmp_path / "registry.json").read_text())
    assert record["version"] == "3" and not record["gate"]["passed"] and record["aliases"] == ["candidate"]
    assert str(client.get_model_version_by_alias("opensora-t2v", "champion").version) == "1"
