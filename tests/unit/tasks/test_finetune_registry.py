"""Fine-tuning the registered champion with LoRA, on a real sqlite MLflow store: ``init_from``
takes ``models:/opensora-t2v@champion``, the fine-tune registers as its adapter plus tags naming
its base, ``models:/`` loads base + adapter, and ``tasks.sample --lora/--lora-scale/--merge``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opensora_core.config import LoraConfig, load_config
from opensora_core.data.shards import file_sha256
from opensora_core.distributed.dist import DistInfo, destroy_distributed, init_distributed
from opensora_core.errors import InputError
from opensora_core.models.lora import adapter_state_dict, apply_lora, save_adapter
from opensora_core.models.mmdit import build_mmdit
from opensora_core.training.diffusion_stage import validate_stage
from opensora_core.training.diffusion_trainer import DiffusionTrainer
from tasks import sample
from tasks.diffusion_train import maybe_fetch_init
from tasks.register import register
from tests.unit.tasks._tiny_t2v import write_tiny_models
from tests.unit.training._diffusion_data import make_diffusion_inputs, tiny_config

ROOT = Path(__file__).resolve().parents[3]
METRICS = {"val_loss": 1.0, "vae_psnr": 30.0, "vae_ssim": 0.9, "adherence_color": 0.5, "num_samples": 4}


@pytest.fixture(scope="module")
def info() -> Iterator[DistInfo]:
    yield init_distributed()
    destroy_distributed()


def register_folder(tmp: Path, model_dir: Path, vae: Path, stats: Path, metrics: dict) -> dict:
    eval_path, manifest = tmp / "eval.json", tmp / "manifest.json"
    eval_path.write_text(json.dumps(metrics))
    manifest.write_text(json.dumps({"content_hash": "abc"}))
    cfg = load_config(
        ROOT / "params.yaml",
        [f"tracking.artifact_dir={tmp / 'mlartifacts'}", "register.gate={vae_psnr: 20.0}"],
    )
    return register(cfg, model_dir, vae, stats, eval_path, manifest, tmp / "registry.json", root=ROOT)


def mmdit_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_lora_fine_tune_of_the_champion_registers_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, info: DistInfo
) -> None:
    from mlflow.tracking import MlflowClient

    from opensora_core.inference import T2VPipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    torch.set_num_threads(1)
    # 1. a champion: version 1
    base = write_tiny_models(tmp_path / "base")
    first = register_folder(tmp_path, base["diffusion"], base["vae"], base["latent_stats"], METRICS)
    assert first["version"] == "1" and "champion" in first["aliases"]

    # 2. init_from the champion: copied under the cache, the same weights, the base recorded
    data = make_diffusion_inputs(tmp_path / "data")
    cfg = tiny_config(tmp_path / "cache", steps=4, ckpt_every=4, init_from="models:/opensora-t2v@champion")
    cfg.diffusion.stages["stage1"].lora = LoraConfig(enabled=True, rank=2)
    cfg.diffusion.stages["stage1"].lr = 1e-2
    copy = maybe_fetch_init(cfg, "stage1").parent
    weights = load_file(str(copy / "mmdit.safetensors"))
    assert mmdit_close(weights, load_file(str(base["diffusion"] / "ema.safetensors")))
    assert json.loads((copy / "source.json").read_text())["version"] == "1"
    validate_stage(cfg, "stage1", data.paths)
    DiffusionTrainer(cfg, "stage1", data.paths, info).fit(progress=False)
    final = data.paths.final("stage1")
    adapter_meta = json.loads((final / "adapter" / "adapter.json").read_text())
    assert adapter_meta["base"]["model_name"] == "opensora-t2v" and adapter_meta["base"]["version"] == "1"
    assert adapter_meta["base"]["sha256"] == file_sha256(copy / "mmdit.safetensors")

    # 3. registered as version 2: the adapter and tags naming its base, no MMDiT weights
    second = register_folder(tmp_path, final, data.paths.vae, data.paths.latent_stats, METRICS)
    tags = MlflowClient(uri).get_model_version("opensora-t2v", second["version"]).tags
    assert tags["base.model_name"] == "opensora-t2v" and tags["base.version"] == "1"
    assert tags["base.sha256"] == adapter_meta["base"]["sha256"] and tags["lora"] == "true"
    from opensora_core.inference import download_bundle

    bundle = download_bundle(f"models:/opensora-t2v/{second['version']}", tmp_path / "v2")
    assert (bundle / "adapter" / "adapter.safetensors").is_file() and not (
        bundle / "mmdit.safetensors"
    ).exists()

    # 4. models:/ loads base + adapter = the fine-tune's merged EMA weights
    pipeline = T2VPipeline.load(f"models:/opensora-t2v/{second['version']}", tracking_uri=uri, device="cpu")
    merged = load_file(str(final / "ema.safetensors"))
    assert mmdit_close({k: v.float() for k, v in pipeline.mmdit.state_dict().items()}, merged)
    assert not mmdit_close(merged, weights), "the fine-tune did not change the base"

    # 5. sample --lora on the base folder, --merge: the same merged weights; scale 0: the base
    for scale, want in ((1.0, merged), (0.0, weights)):
        out = tmp_path / f"merged-{scale}"
        args = ["--model", str(base["diffusion"]), "--vae", str(base["vae"]), "--latent-stats",
                str(base["latent_stats"]), "--lora", str(final), "--lora-scale", str(scale), "--merge", str(out)]  # fmt: skip
        assert sample.main(args) == 0
        assert mmdit_close(load_file(str(out / "mmdit.safetensors")), want)


def test_sample_rejects_an_adapter_of_another_base(tmp_path: Path) -> None:
    base = write_tiny_models(tmp_path)
    small = build_mmdit("small")
    cfg = LoraConfig(enabled=True, rank=2)
    targets = apply_lora(small, cfg)
    save_adapter(tmp_path / "small-adapter", adapter_state_dict(small), cfg, targets, {})
    args = ["--model", str(base["diffusion"]), "--vae", str(base["vae"]), "--latent-stats",
            str(base["latent_stats"]), "--lora", str(tmp_path / "small-adapter"), "--merge", str(tmp_path / "m")]  # fmt: skip
    assert sample.main(args) == 2
    assert sample.main([*args[:6], "--lora", str(tmp_path / "nothing"), "--prompt", "a red circle"]) == 2
    assert not (tmp_path / "m" / "mmdit.safetensors").exists()


def test_missing_or_unknown_registry_init_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = tiny_config(tmp_path / "cache", init_from="models:/opensora-t2v@champion")
    with pytest.raises(InputError) as err:
        maybe_fetch_init(cfg, "stage1")
    assert err.value.exit_code == 2
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    assert maybe_fetch_init(tiny_config(tmp_path / "cache", init_from=str(weights)), "stage1") is None
