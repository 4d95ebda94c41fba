"""LoRA fine-tuning in the diffusion trainer (single-rank gloo group, ColossalAI ddp) on real tiny
data: only the adapter trains and is checkpointed, loss falls, final/ holds merged weights and the
adapter, and bad LoRA settings stop before training with exit code 2."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opensora_core.config import LoraConfig
from opensora_core.data.shards import file_sha256
from opensora_core.distributed.dist import DistInfo, destroy_distributed, init_distributed
from opensora_core.errors import ConfigError, InputError
from opensora_core.models.lora import apply_adapter
from opensora_core.models.mmdit import build_mmdit
from opensora_core.training.checkpoint import list_checkpoints, read_meta
from opensora_core.training.diffusion_trainer import DiffusionTrainer, StagePaths, validate_stage
from tests.unit.training._diffusion_data import DiffusionInputs, make_diffusion_inputs, tiny_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> DiffusionInputs:
    return make_diffusion_inputs(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def info() -> Iterator[DistInfo]:
    yield init_distributed()
    destroy_distributed()


@pytest.fixture(scope="module")
def base_file(inputs: DiffusionInputs) -> Path:
    """A base to fine-tune: the tiny MMDiT with random weights everywhere (its last layer too)."""
    torch.manual_seed(3)
    model = build_mmdit("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    path = inputs.root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def stage_paths(inputs: DiffusionInputs, out: Path) -> StagePaths:
    return dataclasses.replace(inputs.paths, models=out / "models", metrics=out / "metrics")


def lora_config(cache: Path, base: Path, steps: int, **lora: object):
    cfg = tiny_config(cache, steps=steps, ckpt_every=steps, init_from=str(base))
    cfg.diffusion.stages["stage1"].lora = LoraConfig(enabled=True, **lora)
    return cfg


def read_losses(paths: StagePaths) -> list[float]:
    with open(paths.loss_csv("stage1")) as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_lora_trains_a_small_adapter_loss_falls_and_final_merges(
    inputs: DiffusionInputs, info: DistInfo, base_file: Path, tmp_path: Path
) -> None:
    cfg = lora_config(tmp_path / "cache", base_file, steps=30, rank=4)
    cfg.diffusion.stages["stage1"].lr = 3e-3
    paths = stage_paths(inputs, tmp_path / "lora")
    trainer = DiffusionTrainer(cfg, "stage1", paths, info)
    params = list(trainer.mmdit.module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    assert 0 < trainable <= 0.05 * sum(p.numel() for p in params)
    trainer.fit()

    # loss falls on the fine-tune set
    losses = read_losses(paths)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.9 * first, f"LoRA loss did not fall: {first:.3f} -> {last:.3f}"
    # the base stayed frozen: the trainer's base weights are the file's
    base = load_file(str(base_file))
    state = trainer.mmdit.module.state_dict()
    assert all(
        torch.equal(state[k.replace(".weight", ".base_layer.weight")], v)
        for k, v in base.items()
        if k.replace(".weight", ".base_layer.weight") in state
    )

    # the checkpoint: adapter only, <= 10% of a full checkpoint, base hash recorded
    (ckpt,) = list_checkpoints(paths.ckpt("stage1"))
    assert read_meta(ckpt)["base_sha256"] == file_sha256(base_file)
    full_cfg = tiny_config(tmp_path / "cache", steps=1, ckpt_every=1, init_from=str(base_file))
    full_paths = stage_paths(inputs, tmp_path / "full")
    DiffusionTrainer(full_cfg, "stage1", full_paths, info).fit()
    (full_ckpt,) = list_checkpoints(full_paths.ckpt("stage1"))
    ratio = folder_bytes(ckpt) / folder_bytes(full_ckpt)
    assert ratio <= 0.10, f"LoRA checkpoint is {ratio:.1%} of a full one"
    print(
        f"LoRA: {trainable} parameters train; loss {first:.3f} -> {last:.3f}; checkpoint {ratio:.1%} of full"
    )

    # final/: merged EMA weights equal the base with the exported (EMA) adapter applied
    final = paths.final("stage1")
    merged = build_mmdit("tiny")
    merged.load_state_dict(load_file(str(final / "ema.safetensors")))
    rebuilt = build_mmdit("tiny")
    rebuilt.load_state_dict(base)
    meta = apply_adapter(rebuilt, final / "adapter")
    assert meta["base"]["sha256"] == file_sha256(base_file)
    x = torch.randn(1, 8, 32), torch.zeros(1, 8, 3), torch.randn(1, 3, 384), torch.zeros(1, 3, 3)
    with torch.no_grad():
        a = merged(x[0], x[1], x[2], x[3], torch.tensor([0.5]), torch.zeros(1, 384))
        b = rebuilt(x[0], x[1], x[2], x[3], torch.tensor([0.5]), torch.zeros(1, 384))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(
        merged.state_dict()["single_blocks.0.linear2.weight"], base["single_blocks.0.linear2.weight"]
    )


def test_lora_resumes_its_adapter_exactly(
    inputs: DiffusionInputs, info: DistInfo, base_file: Path, tmp_path: Path
) -> None:
    cfg = lora_config(tmp_path / "cache", base_file, steps=6, rank=2)
    cfg.diffusion.ckpt_every = 3
    whole = stage_paths(inputs, tmp_path / "whole")
    DiffusionTrainer(cfg, "stage1", whole, info).fit()
    short = dataclasses.replace(cfg.diffusion.stages["stage1"], steps=3)
    broken = stage_paths(inputs, tmp_path / "broken")
    cfg3 = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, stages={"stage1": short}))
    DiffusionTrainer(cfg3, "stage1", broken, info).fit()  # steps are not in the resume hash
    resumed = DiffusionTrainer(cfg, "stage1", broken, info)
    assert resumed.step == 3
    resumed.fit()
    assert read_losses(broken) == read_losses(whole)
    a = load_file(str(whole.final("stage1") / "adapter" / "adapter.safetensors"))
    b = load_file(str(broken.final("stage1") / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("lora", "error", "message"),
    [
        ({"target_modules": ["double_blocks.*.no_such_linear"]}, ConfigError, "matches no Linear"),
        ({"init_from": ""}, ConfigError, "needs a base"),
        ({"init_from": "missing.safetensors"}, InputError, "not found"),
        ({"init_from": "small"}, InputError, "shape"),
    ],
)
def test_bad_lora_settings_exit_2_before_training(
    inputs: DiffusionInputs, base_file: Path, tmp_path: Path, lora: dict, error: type, message: str
) -> None:
    base = base_file
    if lora.get("init_from") == "small":  # a base of another size: its tensors do not fit `tiny`
        base = tmp_path / "small.safetensors"
        save_file({k: v.contiguous() for k, v in build_mmdit("small").state_dict().items()}, str(base))
    elif "init_from" in lora:
        base = Path(lora["init_from"]) if lora["init_from"] else Path("")
    targets = {k: v for k, v in lora.items() if k != "init_from"}
    cfg = lora_config(tmp_path / "cache", base, steps=2, **targets)
    cfg.diffusion.init_from = str(base) if str(base) not in ("", ".") else ""
    with pytest.raises(error, match=message) as err:
        validate_stage(cfg, "stage1", stage_paths(inputs, tmp_path))
    assert err.value.exit_code == 2
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(enabled=True, rank=0)
