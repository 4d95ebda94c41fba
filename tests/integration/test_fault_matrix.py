"""The training fault matrix on the micro profile: real torchrun, real DVC, real files, kill -9.

Every case runs ``python -m tasks.vae_train`` (or ``dvc repro``) in a scratch copy of the
repository, breaks it the way a machine does (a worker or the whole stage killed at a random
step, a kill inside a checkpoint write, a full disk, a corrupt checkpoint) and reruns it: the
rerun resumes from the last complete checkpoint and ends with the weights of an uninterrupted run
(same seed). The table of cases is benchmarks/RELIABILITY.md ("Training and checkpoints").
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from opensora_core.training.checkpoint import list_checkpoints
from opensora_core.training.checkpoint_files import HOLD_ENV, verify_checkpoint
from tests.integration.conftest import Project, make_project_copy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 6
FAULT = [
    "--set", f"vae_train.steps={STEPS}",
    "--set", "vae_train.ckpt_every=2",
    "--set", "vae_train.log_every=2",
    "--set", "vae_train.sample_every=0",
    "--set", "vae_train.val_clips=1",
    "--set", "vae_train.buckets={32px: {9: [1.0, 2]}}",
]  # fmt: skip
WEIGHTS = ("model.safetensors", "ema.safetensors")


@pytest.fixture(scope="module")
def fault_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    project = make_project_copy(tmp_path_factory.mktemp("faults") / "repo")
    project.dvc("repro", "shard")
    return project


@pytest.fixture(scope="module")
def reference(fault_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final weights of an uninterrupted run, kept aside."""
    root = fault_project.root
    fault_project.python("-m", "tasks.vae_train", *FAULT)
    keep = tmp_path_factory.mktemp("reference")
    for name in WEIGHTS:
        shutil.copy2(root / "models/vae/final" / name, keep / name)
    shutil.rmtree(root / "models/vae")
    return keep


class Stage:
    """The stage running in the background, its merged output collected as it comes."""

    def __init__(self, project: Project, *cmd: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *cmd],
            cwd=project.root,
            env={**project.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.chunks: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.chunks.append(chunk.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.chunks)

    def steps_done(self) -> int:
        """The progress bar's last count (``vae_train: ... k/STEPS``)."""
        counts = re.findall(rf"\| *(\d+)/{STEPS} \[", self.output)
        return int(counts[-1]) if counts else 0

    def workers(self) -> list[psutil.Process]:
        """The training workers (not torchrun itself) in the stage's process tree."""
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "opensora_core.jobs.train_vae" in cmd and "torch.distributed.run" not in cmd:
                found.append(p)
        return found

    def kill_everything(self) -> None:
        """SIGKILL every process group of the stage's tree at once (a lost node, the OOM killer)."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for group in {os.getpgid(p.pid) for p in procs}:
            os.killpg(group, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc


def gone(pids: list[int]) -> bool:
    """True when none of ``pids`` runs any more (a zombie counts as gone)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def fresh(root: Path) -> None:
    shutil.rmtree(root / "models/vae", ignore_errors=True)


def random_step(request: pytest.FixtureRequest) -> int:
    seed = random.randrange(1 << 30)
    step = random.Random(seed).randint(3, STEPS - 1)
    print(f"{request.node.name}: kill at step {step} (seed {seed})")
    return step


def assert_same_weights(root: Path, reference: Path) -> None:
    for name in WEIGHTS:
        want, got = load_file(str(reference / name)), load_file(str(root / "models/vae/final" / name))
        assert want.keys() == got.keys()
        worst = max(float((want[k] - got[k]).abs().max()) for k in want)
        print(f"{name}: max weight difference to the uninterrupted run {worst}")
        assert worst <= 1e-6, f"{name}: max weight difference {worst}"


def rerun_resumes(project: Project, expected_step: int) -> str:
    out = project.python("-m", "tasks.vae_train", *FAULT)
    text = out.stdout + out.stderr
    assert f"resumed from models/vae/ckpt/step-{expected_step:08d}" in text, text[-3000:]
    assert f"{STEPS - expected_step} steps to step {STEPS}" in text
    return text


def latest_step(root: Path) -> int:
    complete = list_checkpoints(root / "models/vae/ckpt")
    assert complete, "no complete checkpoint before the kill"
    return int(complete[-1].name.split("-")[1])


# --------------------------------------------------------------------------------------------
# kill -9
# --------------------------------------------------------------------------------------------
def test_worker_killed_at_a_random_step_resumes_to_the_same_weights(
    fault_project: Project, reference: Path, request: pytest.FixtureRequest
) -> None:
    root = fault_project.root
    fresh(root)
    kill_at = random_step(request)
    stage = Stage(fault_project, "tasks.vae_train", *FAULT)
    wait_until(lambda: stage.steps_done() >= kill_at, 300, f"step {kill_at}", stage.proc)
    workers = stage.workers()
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    assert stage.wait() == 75, stage.output[-3000:]  # a killed worker is retryable
    assert not (root / "models/vae/final").exists()
    rerun_resumes(fault_project, latest_step(root))
    assert_same_weights(root, reference)


def test_whole_stage_killed_at_a_random_step_resumes_to_the_same_weights(
    fault_project: Project, reference: Path, request: pytest.FixtureRequest
) -> None:
    root = fault_project.root
    fresh(root)
    kill_at = random_step(request)
    stage = Stage(fault_project, "tasks.vae_train", *FAULT)
    wait_until(lambda: stage.steps_done() >= kill_at, 300, f"step {kill_at}", stage.proc)
    pids = [p.pid for p in stage.workers()]
    assert pids
    stage.kill_everything()
    assert stage.wait() == -signal.SIGKILL
    wait_until(lambda: gone(pids), 30, "the killed workers to go")
    rerun_resumes(fault_project, latest_step(root))
    assert_same_weights(root, reference)


def test_kill_inside_a_checkpoint_write_resumes_the_previous_complete_one(
    fault_project: Project, reference: Path
) -> None:
    root = fault_project.root
    fresh(root)
    stage = Stage(fault_project, "tasks.vae_train", *FAULT, env={HOLD_ENV: "4"})
    partial = root / "models/vae/ckpt/.tmp-step-00000004"
    wait_until(lambda: (partial / "HOLD").is_file(), 300, "the held step-4 save", stage.proc)
    assert (partial / "model.pt").is_file() and (partial / "files.json").is_file()  # all written...
    assert not (partial / "COMPLETE").exists()  # ...but not complete
    for worker in stage.workers():
        worker.send_signal(signal.SIGKILL)
    assert stage.wait() == 75, stage.output[-3000:]
    assert [p.name for p in list_checkpoints(root / "models/vae/ckpt")] == ["step-00000002"]
    rerun_resumes(fault_project, 2)
    assert not partial.exists()  # the next save cleared it
    assert_same_weights(root, reference)


# --------------------------------------------------------------------------------------------
# damaged checkpoints, a full disk
# --------------------------------------------------------------------------------------------
def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(
    fault_project: Project, reference: Path
) -> None:
    root = fault_project.root
    fresh(root)
    stage = Stage(fault_project, "tasks.vae_train", *FAULT)
    newest = root / "models/vae/ckpt/step-00000004"
    wait_until(lambda: (newest / "COMPLETE").is_file(), 300, "the step-4 checkpoint", stage.proc)
    for worker in stage.workers():
        worker.send_signal(signal.SIGKILL)
    assert stage.wait() == 75
    step = latest_step(root)  # 4, or 6 when the kill came after one more save
    model = root / f"models/vae/ckpt/step-{step:08d}/model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    text = rerun_resumes(fault_project, step - 2)
    assert f"skipping corrupt checkpoint models/vae/ckpt/step-{step:08d}: model.pt has" in text
    assert_same_weights(root, reference)


def test_disk_full_during_a_checkpoint_write_exits_74_and_keeps_the_previous(
    fault_project: Project, reference: Path, tmp_path: Path
) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs `unshare --mount` for a private size-limited tmpfs")
    root = fault_project.root
    fresh(root)
    ckpt = root / "models/vae/ckpt"
    ckpt.mkdir(parents=True)
    kept = tmp_path / "ckpt_after"
    # A 16 MiB tmpfs holds one 11 MiB checkpoint, not two. What it held is copied out before the
    # private mount goes away with the shell.
    script = (
        'mount -t tmpfs -o size=16m tmpfs "$1" || exit 99; '
        f'"{sys.executable}" -m tasks.vae_train "${{@:3}}"; rc=$?; cp -a "$1" "$2"; exit $rc'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "bash", "-c", script, "bash", str(ckpt), str(kept), *FAULT],
        cwd=root,
        env=fault_project.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "DiskFull: could not write the step-4 checkpoint" in proc.stderr
    assert "step-00000002 is intact" in proc.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["step-00000002"]  # no partial folder left
    assert verify_checkpoint(kept / "step-00000002") == []
    # With space again, the kept checkpoint resumes to the uninterrupted run's weights.
    shutil.rmtree(ckpt)
    shutil.copytree(kept, ckpt)
    rerun_resumes(fault_project, 2)
    assert_same_weights(root, reference)


# --------------------------------------------------------------------------------------------
# What DVC says ran is what produced the model
# --------------------------------------------------------------------------------------------
def test_code_change_retrains_from_step_0_under_dvc_and_names_the_file(fault_project: Project) -> None:
    root = fault_project.root
    fresh(root)
    # DVC reads its parameters from the tracked files: a shorter micro run (6 steps, a checkpoint
    # every 3) written into the profile, as the flow writes overrides.
    profile = root / "params/ci.yaml"
    settings = yaml.safe_load(profile.read_text())
    settings["vae_train"].update(steps=6, ckpt_every=3, val_clips=1)
    profile.write_text(yaml.safe_dump(settings, sort_keys=False))
    first = fault_project.dvc("repro", "vae_train")
    assert "6 steps to step 6" in first.stdout + first.stderr
    trainer = root / "opensora_core/training/vae_trainer.py"
    original = trainer.read_text()
    try:
        # 1. a one-line change to the VAE trainer: DVC reruns the stage, which trains from step 0
        trainer.write_text(original.replace("RUN_EXCLUDE = (", "RUN_EXCLUDE = (  # changed", 1))
        changed = fault_project.dvc("repro", "vae_train")
        text = changed.stdout + changed.stderr
        assert "Running stage 'vae_train'" in text
        assert "changed: code.opensora_core/training/vae_trainer.py" in text and "starting fresh" in text
        assert "6 steps to step 6" in text and "resumed from" not in text
        stale = [p.name for p in (root / "models/vae/ckpt").iterdir() if p.name.startswith("stale-")]
        assert len(stale) == 1  # the old run's checkpoints, set aside, never resumed
        # 2. nothing changed: DVC skips it
        assert "didn't change" in fault_project.dvc("repro", "vae_train").stdout
        # 3. dvc repro --force: trains again
        forced = fault_project.dvc("repro", "--force", "--single-item", "vae_train")
        text = forced.stdout + forced.stderr
        assert "already finished at step 6" in text and "6 steps to step 6" in text
        # 4. a killed run retried under DVC resumes (nothing changed)
        stage = Stage(fault_project, "dvc", "repro", "--force", "--single-item", "vae_train")
        saved = "saved checkpoint models/vae/ckpt/step-00000003"
        wait_until(lambda: saved in stage.output, 300, "the step-3 checkpoint", stage.proc)
        stage.kill_everything()
        stage.wait()
        retry = fault_project.dvc("repro", "vae_train")
        text = retry.stdout + retry.stderr
        assert "resumed from models/vae/ckpt/step-00000003" in text and "3 steps to step 6" in text
    finally:
        trainer.write_text(original)
