"""Promotion rule: the gate, the comparison with the champion, and the aliases in a real MLflow registry."""

from __future__ import annotations

import pytest

from opensora_core.registry import (
    CANDIDATE,
    CHAMPION,
    _prompts_and_seeds,
    aliases_of,
    apply_promotion,
    check_gate,
    decide_promotion,
    get_alias_version,
    metric_tags,
    metrics_from_tags,
    pip_requirements,
)

GATE = {"vae_psnr": 20.0}
GATE_MAX = {"val_loss": 1.5}


def test_gate_checks_minimums_maximums_and_missing_values() -> None:
    assert check_gate({"vae_psnr": 25.0, "val_loss": 1.0}, GATE, GATE_MAX) == []
    failures = check_gate({"vae_psnr": 10.0, "val_loss": float("nan")}, GATE, GATE_MAX)
    assert failures == ["vae_psnr = 10, needs >= 20", "val_loss is missing or not finite (needs <= 1.5)"]
    assert check_gate({}, {}, {}) == []


@pytest.mark.parametrize(
    ("metrics", "champion", "promote", "reason"),
    [
        ({"vae_psnr": 25.0, "val_loss": 1.0, "acc": 0.5}, None, True, "no champion yet"),
        ({"vae_psnr": 25.0, "val_loss": 1.0, "acc": 0.5}, {"acc": 0.6}, False, "does not beat"),
        ({"vae_psnr": 25.0, "val_loss": 1.0, "acc": 0.5}, {"acc": 0.5}, False, "does not beat"),
        ({"vae_psnr": 25.0, "val_loss": 1.0, "acc": 0.7}, {"acc": 0.6}, True, "beats champion"),
        ({"vae_psnr": 25.0, "val_loss": 1.0, "acc": 0.7}, {"other": 1.0}, True, "has no acc"),
        ({"vae_psnr": 15.0, "val_loss": 1.0, "acc": 0.9}, None, False, "gate failed"),
        ({"vae_psnr": 25.0, "val_loss": 2.0, "acc": 0.9}, {"acc": 0.1}, False, "gate failed"),
    ],
)
def test_decide_promotion(metrics, champion, promote: bool, reason: str) -> None:
    d = decide_promotion(metrics, GATE, "acc", champion, "1" if champion else None, GATE_MAX)
    assert d.promote is promote
    assert reason in d.reason


def test_metric_tags_round_trip() -> None:
    tags = metric_tags({"val_loss": 0.25, "num_samples": 12, "val_loss_by_t": {"0.1": 1.0}, "ok": True})
    assert tags == {"metric.val_loss": "0.25", "metric.num_samples": "12.0"}
    assert metrics_from_tags({**tags, "git_commit": "abc"}) == {"val_loss": 0.25, "num_samples": 12.0}


def test_predict_input_forms_and_pinned_requirements() -> None:
    import pandas as pd

    assert _prompts_and_seeds("a", 5) == (["a"], [5])
    assert _prompts_and_seeds(["a", "b"], 5) == (["a", "b"], [5, 6])
    frame = pd.DataFrame({"prompt": ["a", "b"], "seed": [1, None]})
    assert _prompts_and_seeds(frame, 10) == (["a", "b"], [1, 11])
    pins = pip_requirements()
    assert any(p.startswith("torch==") for p in pins) and any(p.startswith("mlflow==") for p in pins)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("t2v")
    return client, root


def new_version(client, root, metrics: dict) -> str:
    count = len(client.search_model_versions("name='t2v'"))
    source = root / f"model-{count}"
    source.mkdir()
    return client.create_model_version("t2v", str(source), tags=metric_tags(metrics)).version


def test_a_worse_model_does_not_take_champion(client) -> None:
    client, root = client
    assert get_alias_version(client, "t2v", CHAMPION) is None
    good = {"vae_psnr": 25.0, "val_loss": 1.0, "acc": 0.6}
    v1 = new_version(client, root, good)
    assert apply_promotion(client, "t2v", v1, good, GATE, "acc", GATE_MAX).promote
    assert aliases_of(client, "t2v", v1) == [CANDIDATE, CHAMPION]

    worse = {**good, "acc": 0.4}
    v2 = new_version(client, root, worse)
    decision = apply_promotion(client, "t2v", v2, worse, GATE, "acc", GATE_MAX)
    assert not decision.promote and decision.champion_version == str(v1) and decision.champion_value == 0.6
    assert aliases_of(client, "t2v", v2) == [CANDIDATE]
    assert aliases_of(client, "t2v", v1) == [CHAMPION]
    assert client.get_model_version("t2v", v2).tags["gate_passed"] == "true"

    failing = {**good, "acc": 0.9, "vae_psnr": 5.0}
    v3 = new_version(client, root, failing)
    assert not apply_promotion(client, "t2v", v3, failing, GATE, "acc", GATE_MAX).promote
    assert get_alias_version(client, "t2v", CHAMPION).version == v1
    assert client.get_model_version("t2v", v3).tags["gate_passed"] == "false"

    better = {**good, "acc": 0.8}
    v4 = new_version(client, root, better)
    assert apply_promotion(client, "t2v", v4, better, GATE, "acc", GATE_MAX).promote
    assert get_alias_version(client, "t2v", CHAMPION).version == v4
    assert get_alias_version(client, "t2v", CANDIDATE).version == v4
    assert aliases_of(client, "t2v", v1) == []


NO_LABELS = {"vae_psnr": 25.0, "val_loss": 1.0, "adherence_color": None, "fvd_vae": 2.0}


@pytest.mark.parametrize(
    ("champion", "promote", "reason"),
    [
        (
            {"adherence_color": 0.5, "fvd_vae": 3.0},
            True,
            "no adherence_color, compared on fvd_vae; fvd_vae 2 beats",
        ),
        ({"adherence_color": 0.5, "fvd_vae": 1.0}, False, "fvd_vae 2 does not beat champion v1's 1 (lower"),
        (
            {"adherence_color": 0.5},
            True,
            "no adherence_color, compared on fvd_vae; passed the gate; champion",
        ),
    ],
)
def test_data_without_labels_is_compared_on_the_fallback_lower_is_better(champion, promote, reason) -> None:
    d = decide_promotion(
        NO_LABELS, GATE, "adherence_color", champion, "1", GATE_MAX,
        fallback_metric="fvd_vae", lower_is_better=["fvd_vae"],
    )  # fmt: skip
    assert d.promote is promote and d.compare_metric == "fvd_vae"
    assert reason in d.reason


def test_without_a_fallback_a_candidate_without_the_metric_is_not_promoted() -> None:
    d = decide_promotion(NO_LABELS, GATE, "adherence_color", {"adherence_color": 0.5}, "1", GATE_MAX)
    assert not d.promote and d.compare_metric == "adherence_color"
    assert "candidate has no adherence_color" in d.reason
    # a candidate that has the compare metric ignores the fallback
    labelled = {**NO_LABELS, "adherence_color": 0.7}
    d = decide_promotion(labelled, GATE, "adherence_color", {"adherence_color": 0.5}, "1", GATE_MAX,
                         fallback_metric="fvd_vae", lower_is_better=["fvd_vae"])  # fmt: skip
    assert d.promote and d.compare_metric == "adherence_color" and "compared on" not in d.reason


def test_a_gate_on_a_metric_evaluate_left_null_names_the_key() -> None:
    from opensora_core.errors import ConfigError
    from tasks.register import check_gate_metrics

    check_gate_metrics(NO_LABELS, {"vae_psnr": 1.0}, {"fvd_vae": 10.0})  # label-free bounds: fine
    with pytest.raises(ConfigError, match=r"register\.gate\.adherence_color: .*no ground-truth labels"):
        check_gate_metrics(NO_LABELS, {"adherence_color": 0.3}, {})
