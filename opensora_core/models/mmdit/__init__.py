"""MMDiT (Open-Sora 2.0 / Flux style): model, named sizes, input preparation and weight loading."""

from opensora_core.models.mmdit.loader import IncompatibleWeights, LoadReport, load_mmdit_weights
from opensora_core.models.mmdit.model import MMDIT_SIZES, MMDiT, MMDiTConfig, build_mmdit, get_mmdit_config
from opensora_core.models.mmdit.prepare import (
    patchify,
    prepare_cond,
    prepare_img_ids,
    prepare_txt_ids,
    unpatchify,
)

__all__ = [
    "MMDIT_SIZES",
    "IncompatibleWeights",
    "LoadReport",
    "MMDiT",
    "MMDiTConfig",
    "build_mmdit",
    "get_mmdit_config",
    "load_mmdit_weights",
    "patchify",
    "prepare_cond",
    "prepare_img_ids",
    "prepare_txt_ids",
    "unpatchify",
]
