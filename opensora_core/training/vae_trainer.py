"""Video-autoencoder training: the build_* pieces, one train step, checkpoints and the final folder.

The job entry point (:mod:`opensora_core.jobs.train_vae`) runs :func:`train_vae` on every rank of
a torchrun launch. Losses: L1 + KL, optional LPIPS, optional 3D PatchGAN with the adaptive
generator weight; AdamW with warmup, gradient clipping and an EMA of the weights. Checkpoints
hold the model, EMA, optimizer, LR schedule, discriminator and its optimizer, the sampler
position and every rank's RNG states; a restarted job resumes from the latest one whose config
hash matches and continues the same step count.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from opensora_core.config import Config, VaeTrainConfig
from opensora_core.data.buckets import BucketOptions, Buckets
from opensora_core.data.dataset import VideoDataset, build_dataloader
from opensora_core.data.sampler import BucketBatchSampler, InfiniteLoader
from opensora_core.data.shards import ShardReader
from opensora_core.distributed.booster import build_booster, maybe_clip_grad_norm, unwrap_model
from opensora_core.distributed.dist import DistInfo, all_reduce_sum, barrier, set_seed
from opensora_core.errors import InputError, NonFiniteLoss
from opensora_core.models.final import load_vae_final as load_vae_final
from opensora_core.models.final import registry_cache_dir
from opensora_core.models.vae import VaeModelConfig, VideoAutoencoder, build_vae
from opensora_core.models.vae.discriminator import PatchDiscriminator3D
from opensora_core.models.vae.losses import LPIPS, VaeLoss
from opensora_core.tracking import NullRun, start_stage_run
from opensora_core.training.checkpoint import CheckpointedTrainer
from opensora_core.training.ema import EMA
from opensora_core.training.loss_plot import plot_loss_curve
from opensora_core.training.lr_schedule import apply_peak_lr, build_lr_scheduler
from opensora_core.training.run_key import code_fingerprint, mark_finished, resume_config_hash, select_resume

log = logging.getLogger("opensora.vae_train")

# Keys that change how long or how loudly a run goes, not what it computes: a run with other
# values still resumes the same checkpoints.
RUN_EXCLUDE = (
    "vae_train.steps",
    "vae_train.log_every",
    "vae_train.sample_every",
    "vae_train.ckpt_every",
    "vae_train.keep_last_n",
    "vae_train.val_clips",
    "vae_train.num_workers",
    "vae_train.prefetch_factor",
)


@dataclass
class VaePaths:
    shards: Path = Path("data/shards")
    final: Path = Path("models/vae/final")
    ckpt: Path = Path("models/vae/ckpt")
    metrics: Path = Path("metrics/vae.json")
    loss_csv: Path = Path("metrics/vae_train_loss.csv")
    reports: Path = Path("reports/vae")


# --------------------------------------------------------------------------------------------
# build_*
# --------------------------------------------------------------------------------------------
def build_model(cfg: VaeTrainConfig) -> VideoAutoencoder:
    return build_vae(
        VaeModelConfig(
            family=cfg.family, size=cfg.size, pretrained_path=cfg.pretrained_path, shortcut=cfg.shortcut
        )
    )


def vae_init_folder(cfg: VaeTrainConfig, cache_root: str) -> tuple[Path, str] | None:
    """(folder, weights name) of ``vae_train.init_from``: a final/ folder (``ema``), a bundle
    (``vae``; a registry URI's bundle under the cache), or None when it is empty."""
    if not cfg.init_from:
        return None
    folder = Path(cfg.init_from)
    if cfg.init_from.startswith("models:/"):
        folder = registry_cache_dir(cache_root, cfg.init_from) / "bundle"
    for name in ("ema", "vae", "model"):
        if (folder / f"{name}.safetensors").is_file() and (folder / f"{name}.json").is_file():
            return folder, name
    raise InputError(f"vae_train.init_from: no VAE (ema, vae or model .safetensors + .json) in {folder}")


def load_vae_init(model: VideoAutoencoder, cfg: VaeTrainConfig, cache_root: str) -> None:
    """Copy ``vae_train.init_from``'s weights into ``model`` (strict: InputError when they do not fit)."""
    found = vae_init_folder(cfg, cache_root)
    if found is None:
        return
    source = VideoAutoencoder.load(*found)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise InputError(
            f"vae_train.init_from {found[0]} does not fit vae_train's architecture: {exc}"
        ) from exc
    log.info("vae_train: initial weights from %s/%s.safetensors", *found)


def build_loss(cfg: VaeTrainConfig) -> VaeLoss:
    lpips = LPIPS.from_file(cfg.lpips_path) if cfg.lpips_weight > 0 else None
    return VaeLoss(
        kl_weight=cfg.kl_weight,
        mse_weight=cfg.mse_weight,
        perceptual_weight=cfg.lpips_weight,
        lpips=lpips,
        gan_weight=cfg.disc_weight,
        disc_start=cfg.disc_start,
        disc_every=cfg.disc_every,
    )


def build_loader(
    cfg: VaeTrainConfig, reader: ShardReader, spatial_factor: int, info: DistInfo
) -> InfiniteLoader:
    """Same-shape micro-batches (B, C, T, H, W) of this rank, endless, resumable."""
    buckets = Buckets(
        BucketOptions(cfg.buckets, spatial_factor=spatial_factor, frame_interval=cfg.frame_interval)
    )
    dataset = VideoDataset(reader, cfg.frame_interval, random_start=True, seed=cfg.seed)
    sampler = BucketBatchSampler(reader, buckets, info.world_size, info.rank, seed=cfg.seed, drop_last=True)
    loader = build_dataloader(dataset, sampler, cfg.num_workers, cfg.prefetch_factor)
    return InfiniteLoader(loader, sampler)


def resolved_config(cfg: Config, reader: ShardReader) -> dict[str, Any]:
    """What this run computes from: the vae_train section, its code (the stage's dvc.yaml code
    deps, file by file) and the data it reads (the shard manifest's content hash)."""
    return {
        "vae_train": dataclasses.asdict(cfg.vae_train),
        "data": {"shards": reader.content_hash},
        "code": code_fingerprint("vae_train"),
    }


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class VaeTrainer(CheckpointedTrainer):
    """The boosted VAE (and discriminator), their optimizers, the data and the loop."""

    def __init__(self, cfg: Config, paths: VaePaths, info: DistInfo, run: NullRun | None = None) -> None:
        self.cfg, self.tcfg, self.paths, self.info = cfg, cfg.vae_train, paths, info
        self.run = run or NullRun()
        self.device = info.device
        # 1. data
        self.reader = ShardReader(paths.shards, split="train")
        self.resolved = resolved_config(cfg, self.reader)
        self.config_hash = resume_config_hash(self.resolved, RUN_EXCLUDE)
        # 2. model, EMA, loss; the same initial weights on every rank
        torch.manual_seed(self.tcfg.seed)
        model = build_model(self.tcfg)
        load_vae_init(model, self.tcfg, cfg.diffusion.cache_dir)
        model = model.to(self.device)
        self.ema = EMA(model, self.tcfg.ema_decay)
        self.loss_fn = build_loss(self.tcfg).to(self.device)
        self.loader = build_loader(self.tcfg, self.reader, model.spatial_factor, info)
        # 3. boosted model and optimizer (and the discriminator when the GAN term is on)
        # Stills (T = 1) skip the temporal layers a clip uses: DDP must expect unused parameters.
        ddp_kwargs = {"find_unused_parameters": True} if self.tcfg.plugin == "ddp" else {}
        self.booster = build_booster(self.tcfg.plugin, self.tcfg.precision, self.tcfg.grad_clip, **ddp_kwargs)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay
        )
        self.model, self.optimizer, *_ = self.booster.boost(model, optimizer)
        self.disc = self.disc_opt = None
        if self.tcfg.disc_weight > 0:
            disc = PatchDiscriminator3D().to(self.device)
            disc_opt = torch.optim.AdamW(disc.parameters(), lr=self.tcfg.disc_lr, betas=(0.5, 0.9))
            self.disc, self.disc_opt, *_ = self.booster.boost(disc, disc_opt)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer,
            self.tcfg.warmup_steps,
            max(1, self.tcfg.steps),
            self.tcfg.lr_schedule,
            self.tcfg.min_lr_ratio,
        )
        self.step = 0
        self.history: list[dict[str, float]] = []
        set_seed(self.tcfg.seed, info.rank)  # a resumed run restores its RNG states instead
        self.resumed_from = self._maybe_resume()

    @property
    def vae(self) -> VideoAutoencoder:
        return unwrap_model(self.model)

    def _maybe_resume(self) -> str:
        path, reason = select_resume(
            self.paths.ckpt, self.config_hash, self.resolved, RUN_EXCLUDE, self.tcfg.steps
        )
        log.info("vae_train: %s", reason)
        self.run.set_tags({"resume": reason[:250]})
        if path is None:
            return ""
        loaded = self.load_state(path)
        apply_peak_lr(self.lr_scheduler, self.tcfg.lr)
        self.step = loaded.step
        self.history = list(loaded.extra.get("history", []))
        if self.disc is not None and "disc" in loaded.extra:
            unwrap_model(self.disc).load_state_dict(loaded.extra["disc"])
            self.disc_opt.unwrap().load_state_dict(loaded.extra["disc_opt"])
        return str(path)

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser step on a batch ``video`` (B, C, T, H, W) in [-1, 1]; returns its metrics."""
        x = self.prepare_video(batch["video"])
        recon, mean, logvar = self.model(x, sample_posterior=self.tcfg.sample_posterior)
        use_gan = self.disc is not None and self.loss_fn.gan_active(self.step)
        terms = self.loss_fn(
            x,
            recon,
            mean,
            logvar,
            step=self.step,
            discriminator=self.disc if use_gan else None,
            last_layer=self.vae.last_layer_weight if use_gan else None,
        )
        loss = terms["loss"]
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLoss(
                f"vae_train: loss is {loss.item()} at step {self.step + 1} "
                f"(batch of {len(batch['path'])} clips from {batch['path'][0]}); no checkpoint written"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.booster.backward(loss, self.optimizer)
        grad_norm = maybe_clip_grad_norm(self.optimizer, self.tcfg.plugin, self.tcfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.vae)
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        if self.disc is not None and self.loss_fn.should_update_discriminator(self.step):
            self.disc_opt.zero_grad(set_to_none=True)
            d_terms = self.loss_fn.discriminator_loss(self.disc, x, recon.detach())
            self.booster.backward(d_terms["d_loss"], self.disc_opt)
            self.disc_opt.step()
            metrics.update({k: float(v.detach()) for k, v in d_terms.items()})
        metrics["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self.step += 1
        return metrics

    def crop_offsets(self, batch_size: int, h: int, w: int) -> tuple[list[int], list[int]]:
        """Top and left offsets of this step's ``crop_size`` crops, one pair per clip.

        They depend on (seed, rank, step) only, so a resumed run cuts the same crops.
        """
        size = self.tcfg.crop_size
        gen = torch.Generator().manual_seed(
            (self.tcfg.seed * 1_000_003 + self.info.rank) * 10_007 + self.step
        )
        tops = torch.randint(0, max(h - size, 0) + 1, (batch_size,), generator=gen).tolist()
        lefts = torch.randint(0, max(w - size, 0) + 1, (batch_size,), generator=gen).tolist()
        return tops, lefts

    def prepare_video(self, video: torch.Tensor) -> torch.Tensor:
        """A batch (B, C, T, H, W) on the device, randomly cropped to ``crop_size`` when set."""
        size = self.tcfg.crop_size
        h, w = video.shape[-2:]
        if size and (h > size or w > size):
            tops, lefts = self.crop_offsets(video.shape[0], h, w)
            video = torch.stack(
                [v[..., t : t + size, left : left + size] for v, t, left in zip(video, tops, lefts)]
            )
        return video.to(self.device, non_blocking=True)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict[str, Any]:
        rank0 = self.info.rank == 0
        start_step, start = self.step, time.perf_counter()
        samples = 0
        bar = tqdm(
            total=self.tcfg.steps,
            initial=self.step,
            desc="vae_train",
            disable=not (rank0 and progress),
            unit="step",
        )
        window: list[dict[str, float]] = []
        while self.step < self.tcfg.steps:
            batch = next(self.loader)
            metrics = self.train_step(batch)
            samples += batch["video"].shape[0]
            window.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step % self.tcfg.log_every == 0 or self.step == self.tcfg.steps:
                self._log(window, samples / max(time.perf_counter() - start, 1e-9))
                window = []
            if self.tcfg.sample_every and self.step % self.tcfg.sample_every == 0 and rank0:
                self.log_reconstruction(batch["video"][:2])
            if self.step % self.tcfg.ckpt_every == 0 or self.step == self.tcfg.steps:
                self.save()
        bar.close()
        return {
            "steps_run": self.step - start_step,
            "step": self.step,
            "seconds": time.perf_counter() - start,
            "resumed_from": self.resumed_from,
            "final_loss": self.history[-1]["loss"] if self.history else float("nan"),
        }

    def _log(self, window: list[dict[str, float]], samples_per_s: float) -> None:
        keys = sorted(window[0])
        local = torch.tensor([[m.get(k, 0.0) for k in keys] for m in window], dtype=torch.float64).mean(0)
        mean = (all_reduce_sum(local.to(self.device)) / self.info.world_size).cpu()
        metrics = dict(zip(keys, mean.tolist()))
        metrics["samples_per_s"] = samples_per_s * self.info.world_size
        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        self.history.append({"step": float(self.step), **metrics})
        self.run.log_metrics(metrics, step=self.step)

    def save(self) -> Path:
        extra: dict[str, Any] = {"history": self.history}
        if self.disc is not None:
            extra["disc"] = unwrap_model(self.disc).state_dict()
            extra["disc_opt"] = self.disc_opt.unwrap().state_dict()
        return self.save_state(self.paths.ckpt, extra, self.tcfg.keep_last_n)

    @torch.no_grad()
    def log_reconstruction(self, video: torch.Tensor, name: str | None = None) -> Path:
        """PNG of input frames (top row) over reconstructed frames (bottom row) of one clip."""
        self.vae.eval()
        recon = self.vae(video.to(self.device), sample_posterior=False)[0].cpu()
        self.vae.train()
        path = self.paths.reports / (name or f"recon_step{self.step:06d}.png")
        save_frame_grid([video[0], recon[0]], path)
        self.run.log_artifact(path, "reconstructions")
        return path

    def save_final(self) -> Path:
        """models/vae/final/: raw weights, EMA weights, their VAE configs and the resolved config."""
        final = self.paths.final
        final.mkdir(parents=True, exist_ok=True)
        # The stage's declared outputs exist even when a reused VAE trains 0 steps (no checkpoint).
        for folder in (self.paths.ckpt, self.paths.reports):
            folder.mkdir(parents=True, exist_ok=True)
        self.vae.save(final, "model")
        ema_model = build_model(self.tcfg)
        ema_model.load_state_dict(self.vae.state_dict())
        self.ema.copy_to(ema_model)
        ema_model.save(final, "ema")
        (final / "config.json").write_text(json.dumps({**self.resolved, "step": self.step}, indent=2) + "\n")
        return final


# --------------------------------------------------------------------------------------------
# Helpers shared with the other VAE stages
# --------------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_frame_grid(videos: list[torch.Tensor], path: Path, max_frames: int = 9) -> Path:
    """One row per video (C, T, H, W) in [-1, 1], up to ``max_frames`` frames side by side."""
    from PIL import Image

    rows = []
    for video in videos:
        frames = video[:, :max_frames].clamp(-1, 1).add(1).mul(127.5).round().byte()
        rows.append(np.concatenate(list(frames.permute(1, 2, 3, 0).numpy()), axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    """step,loss,l1,kl,... for `dvc plots`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first = ["step", "loss", "l1", "kl", "lr"]
    keys = [*first, *sorted({k for h in history for k in h} - set(first))]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in keys})


def train_vae(cfg: Config, paths: VaePaths, info: DistInfo, progress: bool = True) -> dict[str, Any]:
    """Train (or resume), write the final folder, reconstruct val clips; the stage's summary.

    ``progress``: a progress bar on rank 0.
    """
    from opensora_core.evaluation.reconstruction import reconstruction_metrics

    with start_stage_run(
        "vae_train", cfg.tracking, params={"vae_train": dataclasses.asdict(cfg.vae_train)}, rank=info.rank
    ) as run:
        trainer = VaeTrainer(cfg, paths, info, run)
        summary = trainer.fit(progress)
        barrier()
        if info.rank == 0:
            trainer.save_final()
            write_loss_csv(paths.loss_csv, trainer.history)
            run.log_artifact(paths.loss_csv)
            run.log_artifact(plot_loss_curve(paths.loss_csv, paths.loss_csv.with_suffix(".png"), "vae_train"))
            vae = load_vae_final(paths.final).to(info.device)
            metrics = reconstruction_metrics(
                vae, ShardReader(paths.shards, split="val"), cfg.vae_train.val_clips, paths.reports
            )
            paths.metrics.parent.mkdir(parents=True, exist_ok=True)
            paths.metrics.write_text(json.dumps(metrics.summary(), indent=2) + "\n")
            run.log_metrics({f"val_{k}": v for k, v in metrics.summary().items()})
            for artifact in metrics.artifacts:
                run.log_artifact(artifact, "val")
            summary.update(metrics.summary())
            mark_finished(paths.ckpt, trainer.config_hash, trainer.step)
        barrier()
    return summary
