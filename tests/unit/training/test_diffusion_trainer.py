"""The diffusion trainer in this process (single-rank gloo group, ColossalAI ddp) on real tiny data.

Loss drops on the tiny default, a crashed run resumes exactly, the NaN guard stops before any
checkpoint, the OOM guard halves a bucket's micro-batch and keeps it in the checkpoint, --load
reports its keys, final/ loads back.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opensora_core.config import TrackingConfig
from opensora_core.distributed.dist import DistInfo, destroy_distributed, init_distributed
from opensora_core.errors import ConfigError, InputError, NonFiniteLoss, OutOfMemory
from opensora_core.jobs.common import exit_code_for
from opensora_core.models.mmdit import build_mmdit
from opensora_core.training.checkpoint import list_checkpoints
from opensora_core.training.diffusion_trainer import (
    DiffusionTrainer,
    LoadOptions,
    OomGuard,
    StagePaths,
    load_diffusion_final,
    train_stage,
    validate_stage,
)
from opensora_core.training.latent_cache import encode_batch_latents
from tests.unit.training._diffusion_data import DiffusionInputs, make_diffusion_inputs, tiny_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny kernels: threads only add contention on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> DiffusionInputs:
    return make_diffusion_inputs(tmp_path_factory.mktemp("diffusion"))


@pytest.fixture(scope="module")
def info() -> Iterator[DistInfo]:
    # Torn down after the module: the group's fallback RANK/WORLD_SIZE would otherwise stay in
    # os.environ and make later tests in the session look like torchrun workers.
    yield init_distributed()
    destroy_distributed()


def stage_paths(inputs: DiffusionInputs, out: Path) -> StagePaths:
    return dataclasses.replace(inputs.paths, models=out / "models", metrics=out / "metrics")


def read_curve(paths: StagePaths) -> list[dict[str, float]]:
    with open(paths.loss_csv("stage1")) as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


class CrashAfter:
    """The trainer's loader, raising after ``n`` batches: a run killed mid-way."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.left = loader, n

    def __next__(self):
        if self.left == 0:
            raise KeyboardInterrupt("simulated kill")
        self.left -= 1
        return next(self.loader)

    def state_dict(self):
        return self.loader.state_dict()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def test_tiny_default_loss_drops(inputs: DiffusionInputs, info: DistInfo, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "cache", steps=40, ckpt_every=40)
    paths = stage_paths(inputs, tmp_path)
    summary = DiffusionTrainer(cfg, "stage1", paths, info).fit()
    losses = [row["loss"] for row in read_curve(paths)]
    assert len(losses) == 40 and summary["steps"] == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, f"loss did not drop: first steps {first:.3f}, last steps {last:.3f}"
    assert [c.name for c in list_checkpoints(paths.ckpt("stage1"))] == ["step-00000040"]
    # final/ loads back as the EMA weights with the resolved config
    model, config = load_diffusion_final(paths.final("stage1"))
    ema = load_file(str(paths.final("stage1") / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert config["run"]["stage"] == "stage1" and config["run"]["vae_sha256"] == inputs.vae_sha256
    assert (paths.final("stage1") / "samples.png").is_file()
    assert json.loads(paths.summary("stage1").read_text())["final_loss"] == pytest.approx(
        sum(losses[-5:]) / 5
    )


def test_killed_run_resumes_exactly(inputs: DiffusionInputs, info: DistInfo, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "cache", steps=6, ckpt_every=3)
    whole = stage_paths(inputs, tmp_path / "whole")
    DiffusionTrainer(cfg, "stage1", whole, info).fit()

    broken = stage_paths(inputs, tmp_path / "broken")
    trainer = DiffusionTrainer(cfg, "stage1", broken, info)
    trainer.loader = CrashAfter(trainer.loader, 4)  # dies in step 5, after the checkpoint of step 3
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert [c.name for c in list_checkpoints(broken.ckpt("stage1"))] == ["step-00000003"]
    assert not broken.final("stage1").exists()

    resumed = DiffusionTrainer(cfg, "stage1", broken, info)
    assert resumed.step == 3 and resumed.resumed_from.endswith("step-00000003")
    summary = resumed.fit()
    assert summary["steps"] == 6 and summary["steps_run"] == 3
    assert read_curve(broken) == read_curve(whole)  # same losses, LRs and grad norms, step by step
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(whole.final("stage1") / name))
        b = load_file(str(broken.final("stage1") / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_changed_config_starts_fresh_and_says_why(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    paths = stage_paths(inputs, tmp_path)
    DiffusionTrainer(tiny_config(tmp_path / "cache", steps=3), "stage1", paths, info).fit()
    longer = tiny_config(tmp_path / "cache", steps=5)  # step counts do not change the hash
    assert DiffusionTrainer(longer, "stage1", paths, info).step == 3
    other = tiny_config(tmp_path / "cache", steps=5)
    other.diffusion.stages["stage1"].lr = 5e-4
    trainer = DiffusionTrainer(other, "stage1", paths, info)
    assert trainer.step == 0 and trainer.resume_path is None


def test_nan_guard_stops_before_any_checkpoint(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    stats = json.loads(inputs.paths.latent_stats.read_text())
    stats["scale"] = 1e30  # latents of 1e30: the squared error overflows float32
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    paths = dataclasses.replace(stage_paths(inputs, tmp_path), latent_stats=tmp_path / "stats.json")
    cfg = tiny_config(tmp_path / "cache", steps=4, ckpt_every=1)
    trainer = DiffusionTrainer(cfg, "stage1", paths, info)
    with pytest.raises(
        NonFiniteLoss, match=r"non-finite loss at step 1 .*bucket 32px/\d+x32x32, samples \[\d"
    ) as caught:
        trainer.fit()
    assert not paths.ckpt("stage1").exists() or not any(paths.ckpt("stage1").iterdir())
    assert not paths.final("stage1").exists()
    assert exit_code_for(caught.value) == 5  # what the job exits with


# --------------------------------------------------------------------------------------------
# OOM guard
# --------------------------------------------------------------------------------------------
def test_oom_guard_halves_the_bucket_and_keeps_it() -> None:
    calls, freed = [], []

    def step(micro: int) -> int:
        calls.append(micro)
        if micro > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return micro

    guard = OomGuard()
    assert guard.run("32px/9x32x32", 8, step, lambda: freed.append(1)) == 2
    assert calls == [8, 4, 2] and len(freed) == 2
    assert guard.limits == {"32px/9x32x32": 2}
    calls.clear()
    assert guard.run("32px/9x32x32", 8, step, lambda: None) == 2 and calls == [2]  # for the rest of the run
    assert guard.run("32px/1x32x32", 2, step, lambda: None) == 2  # other buckets keep their size

    restored = OomGuard()
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.micro_batch("32px/9x32x32", 8) == 2
    restored.merge([{"limits": {"32px/9x32x32": 1, "64px/17x64x64": 1}}])
    assert restored.limits == {"32px/9x32x32": 1, "64px/17x64x64": 1}

    def always(micro: int) -> int:
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(OutOfMemory, match="micro-batch 1"):
        OomGuard().run("b", 4, always, lambda: None)
    with pytest.raises(OutOfMemory, match="oom_guard is off"):
        OomGuard(enabled=False).run("b", 4, always, lambda: None)


def test_oom_in_a_step_is_recovered_and_checkpointed(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path / "cache", steps=3, ckpt_every=3)
    paths = stage_paths(inputs, tmp_path)
    trainer = DiffusionTrainer(cfg, "stage1", paths, info)
    real = trainer.forward_backward
    micro_sizes = []

    def tight_memory(batch_inputs, micro, batch):
        micro_sizes.append((batch_inputs.x_t.shape[0], micro))
        if micro > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch_inputs, micro, batch)

    trainer.forward_backward = tight_memory
    summary = trainer.fit()
    assert summary["steps"] == 3
    assert [m for _, m in micro_sizes].count(1) == 3  # every step went through once, one sample at a time
    assert summary["oom_limits"] and set(summary["oom_limits"].values()) == {1}
    state = torch.load(list_checkpoints(paths.ckpt("stage1"))[-1] / "trainer_state.pt", weights_only=True)
    assert state["extra"]["oom_guard"]["limits"] == summary["oom_limits"]
    # A longer run resumes the finished one (the same length would train again: a forced rerun).
    longer = tiny_config(tmp_path / "cache", steps=4, ckpt_every=3)
    assert DiffusionTrainer(longer, "stage1", paths, info).guard.limits == summary["oom_limits"]


def test_micro_batches_give_the_full_batch_gradient(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    trainer = DiffusionTrainer(tiny_config(tmp_path / "cache"), "stage1", stage_paths(inputs, tmp_path), info)
    batch = next(trainer.loader)
    raw = trainer.vae.normalize_latents(encode_batch_latents(batch, trainer.vae, trainer.cache))
    inputs_ = trainer.prepare_inputs(raw, batch["text"])
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = []
    for micro in (len(raw), 1):
        trainer.optimizer.zero_grad(set_to_none=True)
        losses = trainer.forward_backward(inputs_, micro, batch)
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    assert len(losses) == len(raw)
    for full, split in zip(*grads):
        torch.testing.assert_close(full, split, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# --load, validation
# --------------------------------------------------------------------------------------------
def test_load_weights_reports_missing_and_unexpected_keys(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    weights = {k: v.clone() for k, v in build_mmdit("tiny").state_dict().items()}
    torch.nn.init.constant_(weights["txt_in.weight"], 0.01)
    del weights["final_layer.linear.bias"]
    weights["module.extra_head.weight"] = torch.zeros(3)
    save_file(weights, str(tmp_path / "released.safetensors"))

    cfg = tiny_config(tmp_path / "cache", steps=2)
    load = LoadOptions(str(tmp_path / "released.safetensors"))
    trainer = DiffusionTrainer(cfg, "stage1", stage_paths(inputs, tmp_path), info, load)
    report = trainer.load_report
    assert report is not None and trainer.step == 0
    assert report.missing == ["final_layer.linear.bias"] and report.unexpected == ["module.extra_head.weight"]
    assert torch.all(trainer.mmdit.module.txt_in.weight == 0.01)
    assert trainer.resolved["run"]["load"]["path"] == load.path


def test_load_checkpoint_keeps_or_resets_step_and_optimizer(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    source = stage_paths(inputs, tmp_path / "source")
    DiffusionTrainer(tiny_config(tmp_path / "cache", steps=3), "stage1", source, info).fit()
    ckpt = str(list_checkpoints(source.ckpt("stage1"))[-1])
    cfg = tiny_config(tmp_path / "cache", steps=8)

    kept = DiffusionTrainer(cfg, "stage1", stage_paths(inputs, tmp_path / "a"), info, LoadOptions(ckpt))
    assert kept.step == 3 and kept.optimizer.unwrap().state  # Adam moments restored
    fresh = DiffusionTrainer(
        cfg,
        "stage1",
        stage_paths(inputs, tmp_path / "b"),
        info,
        LoadOptions(ckpt, optimizer=False, reset_step=True),
    )
    assert fresh.step == 0 and not fresh.optimizer.unwrap().state
    warm = DiffusionTrainer(
        cfg, "stage1", stage_paths(inputs, tmp_path / "c"), info, LoadOptions(ckpt, redo_warmup=True)
    )
    assert warm.step == 3 and warm.warmup_start == 3
    assert warm.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 2)  # first warmup step again
    assert kept.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    for a, b in zip(kept.mmdit.module.parameters(), fresh.mmdit.module.parameters()):
        assert torch.equal(a, b)
    # a final/ folder loads its EMA weights
    final = DiffusionTrainer(
        cfg, "stage1", stage_paths(inputs, tmp_path / "d"), info, LoadOptions(str(source.final("stage1")))
    )
    assert final.init_path == source.final("stage1") / "ema.safetensors"
    assert final.load_report is not None and final.load_report.ok and final.step == 0


def test_loaded_optimizer_takes_the_stage_learning_rate(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    source = stage_paths(inputs, tmp_path / "source")
    DiffusionTrainer(tiny_config(tmp_path / "cache", steps=3), "stage1", source, info).fit()  # lr 1e-3
    ckpt = str(list_checkpoints(source.ckpt("stage1"))[-1])
    cfg = tiny_config(tmp_path / "cache", steps=8)
    cfg.diffusion.stages["stage1"].lr = 5e-4
    loaded = DiffusionTrainer(cfg, "stage1", stage_paths(inputs, tmp_path / "a"), info, LoadOptions(ckpt))
    assert loaded.step == 3 and loaded.optimizer.unwrap().state  # the Adam moments came with it
    group = loaded.optimizer.unwrap().param_groups[0]
    assert group["lr"] == pytest.approx(5e-4) and group["initial_lr"] == pytest.approx(5e-4)
    assert loaded.lr_scheduler.base_lrs == [pytest.approx(5e-4)]
    loaded.fit()
    lrs = [row["lr"] for row in read_curve(stage_paths(inputs, tmp_path / "a"))]
    assert lrs[-5:] == [pytest.approx(5e-4)] * 5  # steps 4..8 at the stage's LR, not the checkpoint's 1e-3
    # a damaged checkpoint is refused before anything launches (exit 2), naming the file
    model = Path(ckpt) / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(InputError, match=r"corrupt: model\.pt has 100 bytes"):
        validate_stage(cfg, "stage1", stage_paths(inputs, tmp_path / "b"), LoadOptions(ckpt))


def test_validate_stage_names_stages_and_missing_inputs(inputs: DiffusionInputs, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "cache")
    with pytest.raises(
        ConfigError, match=r"unknown diffusion stage 'stage9'; stages in diffusion.stages: stage1"
    ):
        validate_stage(cfg, "stage9", inputs.paths)
    validate_stage(cfg, "stage1", inputs.paths)
    cfg.diffusion.stages["stage2"] = cfg.diffusion.stages["stage1"]
    with pytest.raises(InputError, match=r"run diffusion_stage1.*stage1/final/ema.safetensors not found"):
        validate_stage(cfg, "stage2", stage_paths(inputs, tmp_path))
    with pytest.raises(InputError, match="VAE"):
        validate_stage(cfg, "stage1", dataclasses.replace(inputs.paths, vae=tmp_path / "none"))
    with pytest.raises(ConfigError, match="--load-optimizer needs a checkpoint"):
        validate_stage(
            cfg, "stage1", inputs.paths, LoadOptions(str(inputs.paths.latent_stats), optimizer=True)
        )


# --------------------------------------------------------------------------------------------
# Tracking and profiling
# --------------------------------------------------------------------------------------------
def test_mlflow_run_has_metrics_samples_and_profiler_trace(
    inputs: DiffusionInputs, info: DistInfo, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path / "cache", steps=4, log_every=2, sample_every=2)
    cfg.tracking = TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_dir=str(tmp_path / "art")
    )
    cfg.train.profile_steps, cfg.train.profile_wait = 2, 0
    train_stage(cfg, "stage1", stage_paths(inputs, tmp_path), info)

    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("opensora").experiment_id])
    assert run.info.run_name == "diffusion_stage1" and run.info.status == "FINISHED"
    assert run.data.params["diffusion.stages.stage1.steps"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    for key in ("lr", "grad_norm", "tokens_per_s", "img_tokens_per_s", "peak_memory_mb", "final_loss"):
        assert key in run.data.metrics, key
    assert any(k.startswith("loss_t/") for k in run.data.metrics)
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/samples-step-000002.png", "samples/samples-step-000004.png"]
    traces = [a.path for a in client.list_artifacts(run.info.run_id, "profiler")]
    assert len(traces) == 1 and traces[0].endswith(".json")
