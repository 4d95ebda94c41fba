"""Text-to-video inference: one pipeline object from VAE, latent statistics, MMDiT and text encoder.

Where a model comes from (``--model``), resolved before anything is loaded:

- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered pyfunc model (the register
  stage's), downloaded from the MLflow store;
- a 32-hex run id: the model that run logged;
- a folder: an inference bundle (``bundle.json``, what the pyfunc model carries) or a diffusion
  stage's ``final/`` folder (``mmdit_config.json``), paired with the VAE's ``final/`` folder and
  ``latent_stats.json``.

A bundle folder holds everything generation needs::

    bundle.json          format, video defaults (frames, size, fps), flow config, v2v frames
    vae.safetensors      VAE weights with the latent statistics in its buffers (+ vae.json)
    latent_stats.json    the statistics, readable
    mmdit.safetensors    MMDiT weights (EMA) + mmdit_config.json
    text_encoder.json    the text encoder's config (a reference: weights come from its package)
    config.json          the resolved pipeline config of the run that trained it

:meth:`T2VPipeline.generate` encodes the prompts, draws each sample's noise from its own seed,
samples latents (:mod:`opensora_core.diffusion.sampling`) and decodes them to uint8 frames.
With ``offload`` the models not in use wait on the CPU.
"""

from opensora_core.inference.pipeline import DEFAULT_LATENT_STATS, DEFAULT_VAE_DIR, DTYPES, T2VPipeline
from opensora_core.inference.run_config import find_flow_config, find_v2v_frames, last_stage_config
from opensora_core.inference.sources import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    DEFAULT_MODEL,
    ModelSource,
    download_bundle,
    resolve_model,
)
from opensora_core.inference.video import (
    VideoSpec,
    default_video_spec,
    load_reference,
    prepare_reference,
    to_uint8,
    video_size,
)
from opensora_core.models.final import load_latent_stats, load_mmdit_final, load_vae_dir

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "DEFAULT_LATENT_STATS",
    "DEFAULT_MODEL",
    "DEFAULT_VAE_DIR",
    "DTYPES",
    "ModelSource",
    "T2VPipeline",
    "VideoSpec",
    "default_video_spec",
    "download_bundle",
    "find_flow_config",
    "find_v2v_frames",
    "last_stage_config",
    "load_latent_stats",
    "load_mmdit_final",
    "load_reference",
    "load_vae_dir",
    "prepare_reference",
    "resolve_model",
    "to_uint8",
    "video_size",
]
