"""Config precedence (defaults < params.yaml < profile < --set), unknown keys, types, hashing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from opensora_core.config import (
    Config,
    ConfigError,
    IngestConfig,
    config_hash,
    load_config,
    parse_overrides,
    section_help,
)

ROOT = Path(__file__).resolve().parents[2]


def write_params(tmp_path: Path, params: dict, profiles: dict[str, dict] | None = None) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    for name, body in (profiles or {}).items():
        (tmp_path / "params").mkdir(exist_ok=True)
        (tmp_path / "params" / name).write_text(yaml.safe_dump(body))
    return path


def test_precedence_defaults_params_profile_set(tmp_path: Path) -> None:
    path = write_params(
        tmp_path,
        {"profile": "small.yaml", "ingest": {"num_clips": 10, "num_stills": 3, "seed": 1}},
        {"small.yaml": {"ingest": {"num_stills": 2, "seed": 2}}},
    )
    cfg = load_config(path, ["ingest.seed=3"])
    assert cfg.ingest.num_clips == 10  # params.yaml
    assert cfg.ingest.num_stills == 2  # profile beats params.yaml
    assert cfg.ingest.seed == 3  # --set beats the profile
    assert cfg.ingest.fps == IngestConfig().fps  # default
    assert cfg.profile == "small.yaml"


def test_profile_chosen_by_set_and_without_suffix(tmp_path: Path) -> None:
    path = write_params(tmp_path, {}, {"tiny.yaml": {"shard": {"rows_per_shard": 3}}})
    assert load_config(path, ["profile=tiny"]).shard.rows_per_shard == 3
    assert load_config(path).shard.rows_per_shard == Config().shard.rows_per_shard


def test_missing_profile_names_known_ones(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"profile": "nope.yaml"}, {"ci.yaml": {}})
    with pytest.raises(ConfigError, match=r"profile 'nope.yaml' not found.*ci.yaml"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ingest.num_clipz=3", r"unknown key 'ingest.num_clipz'; valid keys in \[ingest\]: .*num_clips"),
        ("ingestt.num_clips=3", r"unknown key 'ingestt'; valid keys in \[params\]: .*ingest"),
        ("ingest.num_clips=many", r"ingest.num_clips must be an integer"),
        ("meta.progress=3", r"meta.progress must be true or false"),
        ("ingest.source=ftp", r"ingest.source must be synthetic, folder or csv"),
        ("ingest", r"--set expects section.key=value"),
        ("vae_train.crop_size=20", r"vae_train: crop_size must be a multiple of 8"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    path = write_params(tmp_path, {})
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_unknown_key_in_params_file(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"shard": {"rows": 4}})
    with pytest.raises(ConfigError, match=r"unknown key 'shard.rows'"):
        load_config(path)


def test_override_values_parse_as_yaml() -> None:
    tree = parse_overrides(["ingest.sizes=[[32, 32]]", "validate.max_fps=60", "a.b.c=x"])
    assert tree == {"ingest": {"sizes": [[32, 32]]}, "validate": {"max_fps": 60}, "a": {"b": {"c": "x"}}}


def test_int_accepted_for_float_and_types_coerced(tmp_path: Path) -> None:
    cfg = load_config(write_params(tmp_path, {}), ["validate.max_fps=60", "ingest.path=123"])
    assert cfg.validate.max_fps == 60.0 and isinstance(cfg.validate.max_fps, float)
    assert cfg.ingest.path == "123"


def test_config_hash_ignores_excluded_keys() -> None:
    a, b = Config(), Config()
    b.vae_train.steps += 1
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, exclude=("vae_train.steps",)) == config_hash(b, exclude=("vae_train.steps",))


def test_repository_params_and_profiles_load() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.ingest.source == "synthetic"
    for profile in sorted((ROOT / "params").glob("*.yaml")):
        load_config(ROOT / "params.yaml", [f"profile={profile.name}"])


def test_every_field_is_documented() -> None:
    import dataclasses

    def walk(cls: type) -> None:
        docs = section_help(cls)
        for f in dataclasses.fields(cls):
            tp = f.type if not isinstance(f.type, str) else None
            if cls is not Config:
                assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            if tp is not None and dataclasses.is_dataclass(tp):
                walk(tp)

    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            walk(type(section))


def test_vae_shortcut_refuses_pretrained_weights(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"vae_train": {"shortcut": True, "pretrained_path": "/models/wan"}})
    with pytest.raises(ConfigError, match=r"vae_train.shortcut is for training from scratch.*/models/wan"):
        load_config(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1e12", 1e12), ("1e-4", 1e-4), ("5E3", 5e3), ("-2.5e-3", -2.5e-3), ("+3e2", 300.0), (".5e1", 5.0)],
)
def test_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path, raw: str, expected: float) -> None:
    # PyYAML (YAML 1.1) reads "1e12" as a string; DVC (YAML 1.2) as a number. Ours must agree with DVC.
    assert parse_overrides([f"vae_train.lr={raw}"]) == {"vae_train": {"lr": expected}}
    cfg = load_config(write_params(tmp_path, {}), [f"vae_train.lr={raw}"])
    assert cfg.vae_train.lr == expected and isinstance(cfg.vae_train.lr, float)


def test_exponent_numbers_in_params_files(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("vae_train:\n  lr: 1e-4\n  disc_lr: 2E-5\ningest:\n  path: 1e3x\n")
    cfg = load_config(path)
    assert (cfg.vae_train.lr, cfg.vae_train.disc_lr) == (1e-4, 2e-5)
    assert cfg.ingest.path == "1e3x"  # not a number: stays a string


def test_word_for_a_number_still_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vae_train.lr must be a number, got 'fast'"):
        load_config(write_params(tmp_path, {}), ["vae_train.lr=fast"])
