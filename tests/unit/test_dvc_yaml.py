"""dvc.yaml follows the contract: python -m tasks.<stage> commands, profile sections as params deps."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def profile_files() -> list[str]:
    return sorted(f"params/{p.name}" for p in (ROOT / "params").glob("*.yaml"))


def test_commands_are_task_modules() -> None:
    for name, stage in load_stages().items():
        module = stage["cmd"].split()[2]
        assert stage["cmd"].startswith("python -m tasks."), name
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file() or module == "tasks.diffusion_train"
        assert f"{module.replace('.', '/')}.py" in stage["deps"], f"{name} must depend on its module"


def test_every_stage_tracks_its_sections_in_every_profile() -> None:
    for name, stage in load_stages().items():
        params = stage.get("params", [])
        plain = [p for p in params if isinstance(p, str)]
        assert "profile" in plain, f"{name} must track the profile key"
        by_file = {k: v for p in params if isinstance(p, dict) for k, v in p.items()}
        assert sorted(by_file) == profile_files(), f"{name} must track every profile file"
        sections = [p for p in plain if p != "profile"]
        for path, keys in by_file.items():
            assert sorted(keys) == sorted(sections), f"{name}: {path} sections differ from params.yaml's"
            profile = yaml.safe_load((ROOT / path).read_text()) or {}
            missing = [k for k in keys if k not in profile]
            assert not missing, f"{path} lacks sections {missing} (write them as empty mappings)"


def test_no_stage_declares_a_folder_holding_another_stages_output() -> None:
    outs: dict[str, str] = {}
    for name, stage in load_stages().items():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            outs[path] = name
    for a, sa in outs.items():
        for b, sb in outs.items():
            if sa != sb:
                assert not b.startswith(a.rstrip("/") + "/"), f"{sa} out {a} holds {sb} out {b}"
