"""Checkpoints: round trip, atomicity, pruning, resume selection, RNG states, a real DDP Booster."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_core.config import Config, LaunchConfig
from opensora_core.data.shards import file_sha256
from opensora_core.distributed.booster import build_booster, maybe_clip_grad_norm, unwrap_model
from opensora_core.distributed.dist import (
    destroy_distributed,
    get_rng_states,
    init_distributed,
    set_rng_states,
)
from opensora_core.distributed.launcher import run_job
from opensora_core.errors import ConfigError
from opensora_core.training import checkpoint as ckpt
from opensora_core.training.checkpoint import (
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resume_config_hash,
    save_checkpoint,
)
from opensora_core.training.checkpoint_files import verify_checkpoint
from opensora_core.training.ema import EMA
from opensora_core.training.lr_schedule import build_lr_scheduler


class CountingSampler:
    """The smallest stateful sampler: where in which epoch the data order stands."""

    def __init__(self, epoch: int = 0, index: int = 0) -> None:
        self.epoch, self.index = epoch, index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_lr_scheduler(opt, warmup_steps=2, total_steps=10, schedule="cosine")
    return model, opt, sched, EMA(model, decay=0.9)


def _train(model, opt, sched, ema, steps: int, booster=None) -> None:
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        if booster is not None:
            booster.backward(loss, opt)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(model)


def _save(tmp_path, step, model, cfg=None, **kwargs):
    return save_checkpoint(tmp_path / "ckpt", step, model=model, config=cfg or {"lr": 1e-2}, **kwargs)


def test_round_trip_restores_every_part(tmp_path):
    model, opt, sched, ema = _parts()
    _train(model, opt, sched, ema, 3)
    path = save_checkpoint(
        tmp_path / "ckpt",
        100,
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        ema=ema,
        sampler=CountingSampler(2, 17),
        config=Config(),
        extra={"tokens_seen": 1234},
    )
    assert path == tmp_path / "ckpt" / "step-00000100"
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {
        "model.pt",
        "optimizer.pt",
        "lr_scheduler.pt",
        "ema.pt",
        "trainer_state.pt",
        "config.json",
    } <= files
    assert {"meta.json", "COMPLETE", "rng/rank-00000.pt"} <= files
    assert json.loads((path / "meta.json").read_text())["config_hash"] == resume_config_hash(Config())
    expected_draws = (torch.rand(3), random.random(), np.random.rand())  # right after saving

    model2, opt2, sched2, ema2 = _parts(seed=1)
    sampler2 = CountingSampler()
    state = load_checkpoint(
        path, model=model2, optimizer=opt2, lr_scheduler=sched2, ema=ema2, sampler=sampler2
    )
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    assert state.step == 100 and state.extra == {"tokens_seen": 1234}
    assert (sampler2.epoch, sampler2.index) == (2, 17)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == sched.last_epoch == 3
    for name in ema.shadow:
        assert torch.equal(ema.shadow[name], ema2.shadow[name])
    # The optimizer continues exactly: one more step on both gives the same weights.
    torch.manual_seed(7)
    _train(model, opt, sched, ema, 1)
    torch.manual_seed(7)
    _train(model2, opt2, sched2, ema2, 1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_rng_states_round_trip_through_a_file(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save(get_rng_states(), tmp_path / "rng.pt")
    first = (torch.randn(4), random.random(), np.random.rand(2))
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.randn(4), random.random(), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    np.testing.assert_array_equal(first[2], second[2])


def test_crash_before_rename_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, *_ = _parts()
    first = _save(tmp_path, 100, model)

    def crash(tmp, final):
        raise RuntimeError("simulated crash between writing and rename")

    monkeypatch.setattr(ckpt, "_publish", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save(tmp_path, 200, model)
    leftover = tmp_path / "ckpt" / ".tmp-step-00000200"
    assert (leftover / "model.pt").is_file() and (leftover / "COMPLETE").is_file()  # fully written...
    assert list_checkpoints(tmp_path / "ckpt") == [first]  # ...yet never taken for a checkpoint
    path, reason = find_resume_checkpoint(tmp_path / "ckpt", resume_config_hash({"lr": 1e-2}))
    assert path == first and "step 100" in reason

    monkeypatch.undo()
    second = _save(tmp_path, 200, model)
    assert list_checkpoints(tmp_path / "ckpt") == [first, second]
    assert not leftover.exists()


def test_folder_without_complete_marker_is_ignored(tmp_path):
    model, *_ = _parts()
    _save(tmp_path, 5, model)
    (tmp_path / "ckpt" / "step-00000009").mkdir()  # e.g. a copy interrupted half way
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step-00000005"]


def test_files_json_lists_every_file_with_size_and_sha256(tmp_path):
    model, *_ = _parts()
    path = _save(tmp_path, 5, model)
    files = json.loads((path / "files.json").read_text())["files"]
    assert {"model.pt", "meta.json", "trainer_state.pt", "config.json", "rng/rank-00000.pt"} <= set(files)
    assert "COMPLETE" not in files and "files.json" not in files
    assert files["model.pt"]["size"] == (path / "model.pt").stat().st_size
    assert files["model.pt"]["sha256"] == file_sha256(path / "model.pt")
    assert verify_checkpoint(path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete", "bad_meta"])
def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous(tmp_path, caplog, damage):
    model, *_ = _parts()
    first = _save(tmp_path, 10, model)
    newest = _save(tmp_path, 20, model)
    target = newest / ("meta.json" if damage == "bad_meta" else "model.pt")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        target.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("{not json")
    with caplog.at_level("WARNING", logger="opensora.checkpoint"):
        path, reason = find_resume_checkpoint(tmp_path / "ckpt", resume_config_hash({"lr": 1e-2}))
    assert path == first and "step 10" in reason and "skipped corrupt step-00000020" in reason
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "step-00000020" in warning and target.name in warning
    # the skipped one loads no more: the check is what stands between a rerun and a crash
    if damage != "bad_meta":
        restored, *_ = _parts(seed=1)
        load_checkpoint(path, model=restored)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))


def test_every_checkpoint_corrupt_starts_fresh(tmp_path):
    model, *_ = _parts()
    only = _save(tmp_path, 10, model)
    (only / "model.pt").write_bytes(b"")
    path, reason = find_resume_checkpoint(tmp_path / "ckpt", resume_config_hash({"lr": 1e-2}))
    assert path is None and "corrupt" in reason and "starting fresh" in reason


DISK_FULL_SCRIPT = """
import json, sys, torch
from pathlib import Path
from opensora_core.errors import DiskFull
from opensora_core.training.checkpoint import list_checkpoints, save_checkpoint
from opensora_core.training.checkpoint_files import verify_checkpoint
ckpt = Path(sys.argv[1])
save_checkpoint(ckpt, 1, model=torch.nn.Linear(8, 8), config={"k": 1})
out = {}
try:
    save_checkpoint(ckpt, 2, model=torch.nn.Linear(1000, 1000), config={"k": 1})
except DiskFull as exc:
    out = {"code": exc.exit_code, "message": str(exc)}
out["entries"] = sorted(p.name for p in ckpt.iterdir())
out["complete"] = [p.name for p in list_checkpoints(ckpt)]
out["problems"] = verify_checkpoint(ckpt / "step-00000001")
print(json.dumps(out))
"""


def test_disk_full_during_a_save_exits_74_and_keeps_the_previous_checkpoint(tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs `unshare --mount` (a private 2 MiB tmpfs)")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    root = Path(__file__).resolve().parents[3]
    shell = f'mount -t tmpfs -o size=2m tmpfs "$1" && exec "{sys.executable}" -c "$2" "$1"'
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", shell, "sh", str(ckpt), DISK_FULL_SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 74 and "step-2 checkpoint" in out["message"]
    assert "step-00000001 is intact" in out["message"] and "MiB free" in out["message"]
    assert out["entries"] == ["step-00000001"]  # the partial folder is gone
    assert out["complete"] == ["step-00000001"] and out["problems"] == []


def test_keep_last_n_prunes_older_checkpoints(tmp_path):
    model, *_ = _parts()
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, model, keep_last_n=2)
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step-00000040", "step-00000050"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000040", "step-00000050"]


def test_resume_selection_by_config_hash(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    path, reason = find_resume_checkpoint(ckpt_dir, "abc")
    assert path is None and "no complete checkpoint" in reason and "starting fresh" in reason

    model, *_ = _parts()
    cfg = Config()
    first = save_checkpoint(ckpt_dir, 10, model=model, config=cfg)

    longer = Config()
    longer.vae_train.steps = cfg.vae_train.steps * 2  # step counts are excluded: still resumable
    longer.tracking.enabled = not cfg.tracking.enabled  # and so is logging
    assert resume_config_hash(longer) == resume_config_hash(cfg)
    path, reason = find_resume_checkpoint(ckpt_dir, resume_config_hash(longer), longer)
    assert path == first and reason.startswith("resuming from") and "step 10" in reason

    changed = Config()
    changed.shard.seed = cfg.shard.seed + 1
    path, reason = find_resume_checkpoint(ckpt_dir, resume_config_hash(changed), changed)
    assert path is None
    assert "differs" in reason and "step-00000010" in reason
    assert f"shard.seed: {cfg.shard.seed} -> {changed.shard.seed}" in reason

    # A newer checkpoint with another config does not hide an older matching one.
    save_checkpoint(ckpt_dir, 20, model=model, config=changed)
    path, reason = find_resume_checkpoint(ckpt_dir, resume_config_hash(cfg), cfg)
    assert path == first and "step-00000020" in reason

    # The excluded keys are a parameter.
    assert resume_config_hash(longer, exclude=()) != resume_config_hash(cfg, exclude=())


# --------------------------------------------------------------------------------------------
# Through a real ColossalAI Booster (TorchDDPPlugin, one-process gloo group)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def gloo_group():
    info = init_distributed()
    yield info
    destroy_distributed()


@pytest.mark.filterwarnings("ignore:.*broadcast_buffers.*:FutureWarning")
def test_checkpoint_through_ddp_booster(tmp_path, gloo_group):
    assert gloo_group.backend == "gloo" and gloo_group.world_size == 1
    booster = build_booster("ddp", "fp32", grad_clip=1.0)

    def boosted(seed):
        model, opt, sched, _ = _parts(seed)
        model, opt, _, _, sched = booster.boost(model, opt, lr_scheduler=sched)
        return model, opt, sched, EMA(model, decay=0.9)

    model, opt, sched, ema = boosted(0)
    assert isinstance(unwrap_model(model), torch.nn.Sequential)
    assert set(ema.shadow) == {n for n, _ in unwrap_model(model).named_parameters()}
    _train(model, opt, sched, ema, 2, booster=booster)
    path = save_checkpoint(
        tmp_path / "ckpt", 2, model=model, optimizer=opt, lr_scheduler=sched, ema=ema, booster=booster
    )
    # What the Booster wrote is a plain state dict of the unwrapped model.
    saved = torch.load(path / "model.pt", weights_only=True)
    assert set(saved) == set(unwrap_model(model).state_dict())

    model2, opt2, sched2, ema2 = boosted(1)
    load_checkpoint(path, model=model2, optimizer=opt2, lr_scheduler=sched2, ema=ema2, booster=booster)
    for a, b in zip(unwrap_model(model).parameters(), unwrap_model(model2).parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(11)
    _train(model, opt, sched, ema, 1, booster=booster)
    torch.manual_seed(11)
    _train(model2, opt2, sched2, ema2, 1, booster=booster)
    for a, b in zip(unwrap_model(model).parameters(), unwrap_model(model2).parameters()):
        assert torch.equal(a, b)

    # Clipping for ddp is the training step's; the returned value is the norm before clipping.
    loss = model(torch.randn(5, 4)).pow(2).sum() * 100
    booster.backward(loss, opt)
    norm = maybe_clip_grad_norm(opt, "ddp", 1.0)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in unwrap_model(model).parameters()])
    assert norm > 1.0 and clipped.item() == pytest.approx(1.0, rel=1e-4)
    assert maybe_clip_grad_norm(opt, "zero2", 1.0) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_booster_refuses_what_cpu_cannot_run(gloo_group):
    with pytest.raises(ConfigError, match=r"zero2.*CUDA"):
        build_booster("zero2", "bf16")
    with pytest.raises(ConfigError, match="use plugin zero2 for bf16"):
        build_booster("ddp", "bf16")
    with pytest.raises(ConfigError, match="unknown plugin"):
        build_booster("fsdp")


def test_two_ranks_each_save_and_restore_their_rng(tmp_path):
    root = Path(__file__).resolve().parents[3]
    launch = LaunchConfig(nproc_per_node=2, omp_num_threads=1)
    args = ["checkpoint", str(tmp_path)]
    assert (
        run_job("tests.unit.distributed._toy_job", args, launch, env={"PYTHONPATH": str(root)}, cwd=root) == 0
    )
    (path,) = list_checkpoints(tmp_path / "ckpt")
    assert sorted(p.name for p in (path / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert json.loads((path / "meta.json").read_text())["world_size"] == 2
    draws = [json.loads((tmp_path / f"draws-{r}.json").read_text()) for r in range(2)]
    assert all(d["save"] == d["load"] for d in draws)  # each rank got its own stream back
    assert draws[0]["save"] != draws[1]["save"]  # and the streams differ by rank
