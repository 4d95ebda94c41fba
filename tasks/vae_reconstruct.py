"""Encode and decode videos with the trained (or a local pretrained) VAE; PSNR/SSIM per file.

    python -m tasks.vae_reconstruct --input VIDEO_OR_CSV --save-dir DIR [--vae models/vae/final]

``--input`` is one video/image or a CSV with a ``path`` column. ``--vae`` is a ``models/vae/final``
folder or a local diffusers folder (``--family`` names its class). Inputs larger than
``--tile`` pixels on a side are processed in overlapping spatial tiles, blended linearly, so any
size fits in memory. Writes ``<name>_recon.mp4`` (PNG for stills) per input and prints PSNR and
SSIM per file, then their means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config
from opensora_core.data.tables import blank_rows, read_csv_table
from opensora_core.errors import InputError


def read_inputs(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(f"--input {path}: no such file")
    if path.suffix.lower() == ".csv":
        table = read_csv_table(path, "--input", ("path",))
        blank = blank_rows(table["path"])
        if blank:
            raise InputError(f"--input {path}: empty 'path' in data row {blank[0]}")
        return [Path(p) if Path(p).is_absolute() else path.parent / p for p in table["path"]]
    return [path]


def load_vae(path: Path, family: str):
    from opensora_core.models.final import load_vae_final
    from opensora_core.models.vae import VaeModelConfig, build_vae

    if not path.is_dir():
        raise InputError(f"--vae {path}: no such folder")
    if (path / "ema.safetensors").is_file() or (path / "model.safetensors").is_file():
        return load_vae_final(path)
    if (path / "config.json").is_file():  # a diffusers folder
        return build_vae(
            VaeModelConfig(
                family=family, size="wan2.1" if family == "wan" else "hunyuan", pretrained_path=str(path)
            )
        ).eval()
    raise InputError(f"--vae {path}: neither a models/vae/final folder nor a diffusers folder")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = [*range(0, size - tile, step), size - tile]
    return sorted(set(starts))


def reconstruct_tiled(vae, x, tile: int, overlap: int):
    """Reconstruct (1, C, T, H, W) in spatial tiles of ``tile`` px, blended with linear ramps."""
    import torch

    from opensora_core.evaluation.reconstruction import reconstruct

    _, _, _, h, w = x.shape
    out = torch.zeros_like(x)
    weight = torch.zeros(1, 1, 1, h, w)
    f = vae.spatial_factor
    tile, overlap = tile // f * f, overlap // f * f
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            th, tw = min(tile, h), min(tile, w)
            y = reconstruct(vae, x[..., top : top + th, left : left + tw])
            ramp_h = torch.ones(th)
            ramp_w = torch.ones(tw)
            if overlap:
                ramp = torch.linspace(0.05, 1.0, overlap)
                if top > 0:
                    ramp_h[:overlap] = ramp
                if top + th < h:
                    ramp_h[-overlap:] = ramp.flip(0)
                if left > 0:
                    ramp_w[:overlap] = ramp
                if left + tw < w:
                    ramp_w[-overlap:] = ramp.flip(0)
            mask = (ramp_h[:, None] * ramp_w[None, :])[None, None, None]
            out[..., top : top + th, left : left + tw] += y * mask
            weight[..., top : top + th, left : left + tw] += mask
    return out / weight


def stage(args: argparse.Namespace, cfg: Config) -> str:
    inputs = read_inputs(Path(args.input))
    missing = [p for p in inputs if not p.exists()]
    if missing:
        raise InputError(f"{len(missing)} input file(s) not found, e.g. {missing[0]}")
    vae = load_vae(Path(args.vae), args.family)
    from opensora_core.data.video_io import read_video, write_image, write_video
    from opensora_core.evaluation.reconstruction import clip_tensor, to_uint8
    from opensora_core.evaluation.video_metrics import psnr, ssim

    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    scores = []
    for path in inputs:
        frames, fps = read_video(path)
        x = clip_tensor(frames, vae.spatial_factor, vae.temporal_factor)
        y = reconstruct_tiled(vae, x, args.tile, args.overlap)
        p, s = float(psnr(x, y)[0]), float(ssim(x, y)[0])
        scores.append((p, s))
        out = to_uint8(y[0])
        target = save_dir / f"{path.stem}_recon{'.png' if out.shape[0] == 1 else '.mp4'}"
        write_image(target, out[0]) if out.shape[0] == 1 else write_video(target, out, fps or 8.0)
        print(f"{path}: psnr {p:.2f} dB, ssim {s:.4f} -> {target}")
    mean_p, mean_s = np.mean(scores, axis=0)
    return f"{len(scores)} file(s): mean psnr {mean_p:.2f} dB, ssim {mean_s:.4f} -> {save_dir}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "Encode and decode videos with the VAE; print PSNR/SSIM per file.", "vae_reconstruct"
    )
    parser.add_argument("--input", required=True, help="a video or image, or a CSV with a path column")
    parser.add_argument("--save-dir", required=True, help="folder for the reconstructions")
    parser.add_argument(
        "--vae", default="models/vae/final", help="models/vae/final or a local diffusers folder"
    )
    parser.add_argument(
        "--family", default="wan", choices=["wan", "hunyuan"], help="class of a diffusers folder"
    )
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels for large inputs")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
