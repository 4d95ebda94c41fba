"""What a diffusion stage writes besides checkpoints: ``final/`` (atomically), the loss curve
CSV, the sample grid of the EMA weights and the CLI's summary line.

The reader of ``final/`` is :func:`opensora_core.models.final.load_diffusion_final`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from opensora_core.config import DiffusionConfig, LoraConfig
from opensora_core.data.buckets import Buckets
from opensora_core.data.shards import ShardReader
from opensora_core.diffusion.sampling import SamplingOptions, prepare_noise, sample_euler
from opensora_core.errors import InputError
from opensora_core.models.final import FINAL_EMA, FINAL_MODEL
from opensora_core.models.lora import merged_state_dict, save_adapter
from opensora_core.models.mmdit import MMDiT, build_mmdit
from opensora_core.models.text.encoders import TextEmbeddings, TextEncoder
from opensora_core.training.ema import EMA


@dataclass
class AdapterExport:
    """What ``final/adapter/`` records of a LoRA stage beside the adapter's tensors."""

    lora: LoraConfig
    targets: list[str]
    """The wrapped module names."""
    base: dict[str, str]
    """The base's sha256 and path (and registry name and version when it came from there)."""


def save_final(
    directory: Path,
    model: MMDiT,
    ema: EMA,
    config: dict[str, Any],
    text_encoder: TextEncoder,
    samples_png: Path | None = None,
    adapter: AdapterExport | None = None,
) -> Path:
    """Write ``final/`` atomically (a temp folder renamed into place); returns the folder.

    model.safetensors (raw weights, fp32), ema.safetensors (the EMA weights), mmdit_config.json,
    config.json (the resolved config), text_encoder.json (its config, name and widths), and the
    last samples as samples.png. A LoRA stage (``adapter`` given) writes the merged weights (base
    + adapter, base + EMA adapter) under the same names, so later stages, evaluate and register
    read them as any other, and the EMA adapter alone in ``adapter/`` (see models.lora).
    """
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if adapter is not None:
        weights = merged_state_dict(model)
        ema_weights = merged_state_dict(model, ema.module_state_dict())
        save_adapter(tmp / "adapter", ema.module_state_dict(), adapter.lora, adapter.targets, adapter.base)
    else:
        weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        ema_weights = ema.module_state_dict()
    save_file(weights, str(tmp / FINAL_MODEL))
    save_file({k: v.contiguous() for k, v in ema_weights.items()}, str(tmp / FINAL_EMA))
    mmdit = {**dataclasses.asdict(model.config), "checkpoint_blocks": 0}
    text = {
        **config["diffusion"]["text_encoder"],
        "cache_dir": "",
        "name": text_encoder.name,
        "token_dim": text_encoder.token_dim,
        "pooled_dim": text_encoder.pooled_dim,
    }
    for name, data in (("mmdit_config.json", mmdit), ("config.json", config), ("text_encoder.json", text)):
        (tmp / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    if samples_png is not None and samples_png.is_file():
        shutil.copy2(samples_png, tmp / "samples.png")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    """The loss curve (step, loss, lr, grad_norm) as CSV, for ``dvc plots``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "grad_norm"])
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def sample_prompts(shards: Path, n: int) -> list[str]:
    """The captions of the first ``n`` held-out rows (training rows when there is no ``val`` split)."""
    if n <= 0:
        return []
    try:
        reader = ShardReader(shards, split="val")
    except InputError:
        reader = ShardReader(shards, split="train")
    return [str(reader[i]["text"]) for i in range(min(n, len(reader)))]


def sample_shape(buckets: Buckets) -> tuple[int, int, int]:
    """(T, H, W) of the samples: the stage's largest square bucket (else its largest)."""
    every = buckets.all()
    square = [b for b in every if b.height == b.width]
    return (square or every)[0].shape


@torch.no_grad()
def render_samples(
    ema: EMA,
    mmdit_config: Any,
    vae: torch.nn.Module,
    text_encoder: TextEncoder,
    null_text: TextEmbeddings,
    prompts: list[str],
    shape: tuple[int, int, int],
    cfg: DiffusionConfig,
    device: torch.device,
    out: Path,
    template: torch.nn.Module | None = None,
) -> Path:
    """Sample the EMA weights for ``prompts`` (noise seeds 0..N-1) at ``shape`` (T, H, W) and save
    the decoded videos as a frame grid PNG (rows: prompts, columns: frames) at ``out``.

    The sampling copy of the MMDiT is built under a forked RNG, so the training streams stay
    untouched; with ``template`` (a LoRA model, whose EMA covers the adapter only) it is a copy of
    it instead.
    """
    from opensora_core.training.vae_trainer import save_frame_grid

    latent_shape = vae.latent_shape(*shape)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if template is None:
            model = build_mmdit(mmdit_config, device=device, checkpoint_blocks=0)
        else:
            model = copy.deepcopy(template)
    ema.copy_to(model.eval())
    noise = prepare_noise(list(range(len(prompts))), latent_shape, device)
    opts = SamplingOptions(num_steps=cfg.sample_num_steps, guidance=cfg.sample_guidance)
    text = text_encoder.encode(prompts).to(device)
    latents = sample_euler(model, noise, text, null_text, opts, cfg.flow)
    del model
    video = vae.decode(latents.to(next(vae.parameters()).dtype)).float().cpu()
    return save_frame_grid(list(video), out, max_frames=8)


def new_samples_path(step: int) -> Path:
    """A fresh temporary path for the sample grid of ``step``."""
    return Path(tempfile.mkdtemp(prefix="opensora-samples-")) / f"samples-step-{step:06d}.png"


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the stage CLI."""
    resumed = f", resumed from {Path(summary['resumed_from']).name}" if summary.get("resumed_from") else ""
    loss = summary["final_loss"]
    loss_text = f"{loss:.4f}" if math.isfinite(loss) else "n/a"
    return (
        f"{summary['stage']}: {summary['steps']} steps ({summary['steps_run']} run{resumed}), "
        f"final loss {loss_text}, {summary['train_seconds']:.0f}s training"
    )
