"""Which tiny VAE reconstructs the embedded data within the CPU budget: variants side by side.

Each variant trains from the same seed on the same stream of random 32x32x9 crops of the
training clips in ``data/shards`` (batch 4, AdamW, 20 warmup steps, gradient clipping at 1), in one
process with one torch thread, and is scored every ``--eval-every`` steps on the held-out video
clips at their own size: PSNR with the squared error pooled over all clips (the ``vae_train``
stage's metric), against the same clips replaced by their per-pixel temporal mean.

    .venv/bin/python benchmarks/vae_variants.py --steps 600            # after `make run` (or dvc repro shard)
    .venv/bin/python benchmarks/vae_variants.py --steps 600 --variants wan,wan+shortcut+mse10

Variants (``family[+shortcut][+mseN]``): ``wan``/``hunyuan`` are the ``tiny`` diffusers
configurations; ``+shortcut`` adds the parameter-free latent shortcut
(opensora_core/models/vae/shortcut.py); ``+mseN`` adds N x MSE to the L1 loss. Training uses the
posterior mean (as ``vae_train.sample_posterior: false``) and no EMA, so the figures are the raw
weights'. Prints one line per variant and, with ``--write``, a Markdown table to paste into
benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from opensora_core.data.shards import ShardReader
from opensora_core.data.video_io import read_video
from opensora_core.evaluation.reconstruction import clip_tensor
from opensora_core.models.vae import VaeModelConfig, VideoAutoencoder, build_vae

DEFAULT_VARIANTS = "wan,hunyuan,wan+shortcut,wan+shortcut+mse1,wan+shortcut+mse10,hunyuan+shortcut+mse10"
CROP, FRAMES, BATCH = 32, 9, 4


def load_clips(shards: Path, split: str) -> list[torch.Tensor]:
    """Every video (T > 1) of ``split`` as ``(3, T, H, W)`` in [-1, 1]."""
    reader = ShardReader(shards, split=split)
    clips = []
    for i in range(len(reader)):
        row = reader[i]
        if int(row.get("num_frames") or 1) > 1:
            frames, _ = read_video(row["path"])
            clips.append(torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2))
    return clips


def crops(clips: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """A batch ``(BATCH, 3, FRAMES, CROP, CROP)`` of random windows of random clips."""
    out = []
    for _ in range(BATCH):
        c = clips[int(torch.randint(len(clips), (1,), generator=gen))]
        t = int(torch.randint(c.shape[1] - FRAMES + 1, (1,), generator=gen))
        y = int(torch.randint(c.shape[2] - CROP + 1, (1,), generator=gen))
        x = int(torch.randint(c.shape[3] - CROP + 1, (1,), generator=gen))
        out.append(c[:, t : t + FRAMES, y : y + CROP, x : x + CROP])
    return torch.stack(out)


def pooled_psnr(vals: list[torch.Tensor], fn) -> float:
    """``10 log10(4 / MSE)`` with the MSE pooled over every value of every clip."""
    se = sum(float(((fn(v) - v) ** 2).sum()) for v in vals)
    return 10 * math.log10(4 / (se / sum(v.numel() for v in vals)))


def parse_variant(name: str) -> tuple[str, bool, float]:
    parts = name.split("+")
    family, shortcut, mse = parts[0], False, 0.0
    for part in parts[1:]:
        if part == "shortcut":
            shortcut = True
        elif part.startswith("mse"):
            mse = float(part[3:])
        else:
            raise SystemExit(f"unknown variant part {part!r} in {name!r}")
    return family, shortcut, mse


def run_variant(name: str, train: list, vals: list, steps: int, eval_every: int, lr: float) -> dict:
    family, shortcut, mse = parse_variant(name)
    torch.manual_seed(0)
    vae: VideoAutoencoder = build_vae(VaeModelConfig(family=family, size="tiny", shortcut=shortcut))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))

    def recon(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.decode_raw(vae.encode_raw(v))

    curve = [(0, pooled_psnr(vals, recon))]
    gen, seconds = torch.Generator().manual_seed(0), 0.0
    for step in range(1, steps + 1):
        x = crops(train, gen)
        start = time.perf_counter()
        out, _, _ = vae(x, sample_posterior=False)
        loss = (out - x).abs().mean() + mse * ((out - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            curve.append((step, pooled_psnr(vals, recon)))
    params = sum(p.numel() for p in vae.parameters())
    return {"name": name, "params": params, "curve": curve, "s_per_step": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--write", action="store_true", help="print a Markdown table at the end")
    args = parser.parse_args()
    for name in args.variants.split(","):
        parse_variant(name)  # a typo fails before minutes of loading and training
    torch.set_num_threads(1)
    train, vals = load_clips(Path(args.shards), "train"), load_clips(Path(args.shards), "val")
    vals = [clip_tensor(((v.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy(), 8, 4) for v in vals]
    baseline = pooled_psnr(vals, lambda v: v.mean(dim=2, keepdim=True).expand_as(v))
    print(
        f"{len(train)} train videos, {len(vals)} val videos; mean-frame baseline {baseline:.2f} dB",
        flush=True,
    )
    rows = []
    for name in args.variants.split(","):
        result = run_variant(name, train, vals, args.steps, args.eval_every, args.lr)
        curve = ", ".join(f"{s}: {p:.2f}" for s, p in result["curve"])
        print(
            f"{name}: {result['params']} params, {result['s_per_step']:.3f} s/step; PSNR by step {curve}",
            flush=True,
        )
        rows.append(result)
    if args.write:
        print(
            f"\n{platform.node()}, torch {torch.__version__}, {args.steps} steps, baseline {baseline:.2f} dB\n"
        )
        print("| variant | parameters | s/step | PSNR at 0 | PSNR at half | PSNR at end | end - baseline |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            half = min(r["curve"], key=lambda c: abs(c[0] - args.steps // 2))[1]
            end = r["curve"][-1][1]
            print(
                f"| {r['name']} | {r['params']:,} | {r['s_per_step']:.3f} | {r['curve'][0][1]:.2f} | "
                f"{half:.2f} | {end:.2f} | {end - baseline:+.2f} |"
            )


if __name__ == "__main__":
    main()
