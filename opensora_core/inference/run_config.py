"""What inference reads from the resolved config a training run saved (``config.json``): the last
diffusion stage's settings, the rectified-flow options, the v2v frames and the text encoder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opensora_core.diffusion.rectified_flow import RectifiedFlowConfig
from opensora_core.models.final import dataclass_from, read_json
from opensora_core.models.text.encoders import TextEncoderConfig


def last_stage_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Settings of the last stage in a resolved config's ``diffusion.stages`` ({} when none)."""
    stages = (config.get("diffusion") or {}).get("stages") or {}
    if isinstance(stages, Mapping) and stages:
        last = list(stages.values())[-1]
        return last if isinstance(last, Mapping) else {}
    return {}


def find_flow_config(config: Mapping[str, Any]) -> RectifiedFlowConfig:
    """The rectified-flow options of a resolved pipeline config (``diffusion.flow``), else defaults."""
    diffusion = config.get("diffusion") or {}
    for key in ("flow", "rectified_flow"):
        if isinstance(diffusion.get(key), Mapping):
            return dataclass_from(RectifiedFlowConfig, diffusion[key])
    return RectifiedFlowConfig()


def find_v2v_frames(config: Mapping[str, Any]) -> int:
    """``v2v_frames`` of the last diffusion stage's condition settings (0 = half the clip)."""
    stage = last_stage_config(config)
    for node in (stage.get("conditions"), stage, config.get("diffusion")):
        if isinstance(node, Mapping) and "v2v_frames" in node:
            return int(node["v2v_frames"])
    return 0


def text_encoder_config(path: Path, config: Mapping[str, Any]) -> TextEncoderConfig:
    """The text encoder's config: ``text_encoder.json``, else ``diffusion.text_encoder``, else MiniLM."""
    data: Mapping[str, Any] = {}
    if path.is_file():
        data = read_json(path)
    elif isinstance((config.get("diffusion") or {}).get("text_encoder"), Mapping):
        data = config["diffusion"]["text_encoder"]
    return dataclass_from(TextEncoderConfig, {**data, "cache_dir": ""})
