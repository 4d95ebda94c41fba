"""Diffusion training, one stage of ``diffusion.stages``: the MMDiT learns the rectified flow of VAE latents.

The job ``opensora_core.jobs.train_diffusion`` runs :func:`train_stage` on every rank:

1. the frozen parts: the VAE with its latent statistics, the text encoder;
2. the data: shard rows -> bucket batches (resumable sampler) -> cached latents or clips to encode;
3. the MMDiT, started from the previous stage's final EMA weights (the first stage from
   ``diffusion.init_from`` or from scratch; ``--load`` overrides both), boosted by ColossalAI
   (``ddp`` / ``zero2``) with AdamW, beside the LR schedule and the EMA; with the stage's
   ``lora.enabled`` those weights are a frozen base, only a LoRA adapter (opensora_core.models.lora)
   trains, EMA and checkpoints hold the adapter only, and a LoRA stage after a LoRA stage keeps
   the base and trains the same adapter on;
4. the latest checkpoint saved with the same resolved config, if any, is resumed;
5. :meth:`DiffusionTrainer.train_step`: latents -> flow inputs (times, noise, conditions, text
   dropout) -> masked flow loss -> backward -> clip -> optimizer step -> EMA, under the OOM guard and
   the non-finite-loss guard; metrics every ``log_every`` steps, samples every ``sample_every``,
   checkpoints every ``ckpt_every``;
6. ``models/diffusion/NAME/final/`` (written atomically), the loss curve and the summary.

The resume key covers the resolved config less step counts and logging (see :data:`RUN_EXCLUDE`)
plus what the stage read: the initial weights' sha256, the VAE's sha256, the shards' content
hash and the stage's code (:mod:`~opensora_core.training.run_key`), so new upstream outputs or a
code change start the stage fresh; a finished run is trained again only by a forced rerun.

This file holds the loop; the rest of a stage sits beside it: its wiring (paths, init weights,
model, optimizer, encoders: :mod:`~opensora_core.training.diffusion_stage`), the step guards
(:mod:`~opensora_core.training.guards`), the metric window and profiler
(:mod:`~opensora_core.training.metrics`) and what it writes (``final/``, loss CSV, sample grid:
:mod:`~opensora_core.training.diffusion_outputs`). Their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from opensora_core.config import Config, DiffusionConfig, TrainConfig
from opensora_core.data.dataset import VideoDataset
from opensora_core.data.sampler import BucketBatchSampler, InfiniteLoader
from opensora_core.data.shards import ShardReader, file_sha256
from opensora_core.diffusion.conditions import build_conditions, sample_condition_types
from opensora_core.diffusion.denoiser import predict_velocity
from opensora_core.diffusion.rectified_flow import RectifiedFlow
from opensora_core.distributed.booster import build_booster, maybe_clip_grad_norm, unwrap_model
from opensora_core.distributed.dist import DistInfo, broadcast_object, set_seed
from opensora_core.errors import NonFiniteLoss
from opensora_core.models.final import FINAL_EMA as FINAL_EMA
from opensora_core.models.final import FINAL_FILES as FINAL_FILES
from opensora_core.models.final import FINAL_MODEL as FINAL_MODEL
from opensora_core.models.final import build_frozen_vae, read_latent_stats, resolve_weights_file
from opensora_core.models.final import load_diffusion_final as load_diffusion_final
from opensora_core.models.mmdit import MMDIT_SIZES
from opensora_core.models.mmdit.loader import LoadReport
from opensora_core.models.text.encoders import drop_conditions
from opensora_core.tracking import NullRun, start_stage_run
from opensora_core.training.checkpoint import CheckpointedTrainer, is_complete
from opensora_core.training.diffusion_outputs import (
    AdapterExport,
    new_samples_path,
    render_samples,
    sample_prompts,
    sample_shape,
    save_final,
    write_loss_csv,
)
from opensora_core.training.diffusion_outputs import summary_line as summary_line
from opensora_core.training.diffusion_stage import (
    RUN_EXCLUDE,
    BoostedMMDiT,
    FlowInputs,
    LoadOptions,
    StagePaths,
    apply_stage_lora,
    base_reference,
    build_buckets,
    build_model,
    build_optimizer,
    build_stage_encoders,
    get_stage,
    init_weights_path,
    load_initial_weights,
    position_lr_scheduler,
    previous_adapter,
    previous_stage,
    validate_stage,
)
from opensora_core.training.ema import EMA
from opensora_core.training.guards import OomGuard, bucket_key, check_finite
from opensora_core.training.latent_cache import LatentDataset, build_latent_loader, encode_batch_latents
from opensora_core.training.loss_plot import plot_loss_curve
from opensora_core.training.lr_schedule import build_lr_scheduler, reset_peak_lr
from opensora_core.training.metrics import MetricWindow, flop_counter, maybe_profiler
from opensora_core.training.run_key import code_fingerprint, mark_finished, resume_config_hash, select_resume

log = logging.getLogger("opensora.diffusion")


# --------------------------------------------------------------------------------------------


class DiffusionTrainer(CheckpointedTrainer):
    """One stage's training: the frozen encoders, the data, the boosted MMDiT, its state and the loop."""

    def __init__(
        self,
        cfg: Config,
        stage: str,
        paths: StagePaths,
        info: DistInfo,
        load: LoadOptions | None = None,
        run: NullRun | None = None,
    ) -> None:
        self.cfg, self.stage, self.paths, self.info = cfg, stage, paths, info
        self.dcfg: DiffusionConfig = cfg.diffusion
        self.scfg = get_stage(cfg.diffusion, stage)
        self.tcfg: TrainConfig = cfg.train
        self.load = load or LoadOptions()
        self.run = run or NullRun()
        self.device = info.device
        self.flow = RectifiedFlow(self.dcfg.flow)

        # 1. frozen VAE and text encoder; the cache they share
        stats = read_latent_stats(paths.latent_stats)
        self.reader = ShardReader(paths.shards, split="train")
        self.vae = build_frozen_vae(paths.vae, stats, self.device)
        self.text_encoder, self.cache = build_stage_encoders(
            self.dcfg, str(stats["vae_sha256"]), self.reader.content_hash, self.device
        )
        self.null_text = self.text_encoder.null_embeddings().to(self.device)

        # 2. data
        set_seed(self.dcfg.seed, info.rank)
        self.patch = MMDIT_SIZES[self.dcfg.model].patch_size
        self.buckets = build_buckets(self.scfg, self.vae.spatial_factor * self.patch)
        self.loader = self._build_loader()

        # 3. identity of this run -> resume decision
        if self.load.path:
            self.init_path: Path | None = resolve_weights_file(Path(self.load.path))
        else:
            self.init_path = init_weights_path(self.dcfg, stage, paths)
        self.init_adapter = previous_adapter(self.dcfg, stage, paths) if not self.load.path else None
        self.resolved = self._resolved_config(stats)
        self.exclude = RUN_EXCLUDE + tuple(f"diffusion.stages.{n}" for n in self.dcfg.stages if n != stage)
        self.config_hash = resume_config_hash(self.resolved, self.exclude)
        self.resume_path, reason = select_resume(
            paths.ckpt(stage), self.config_hash, self.resolved, self.exclude, self.scfg.steps
        )
        log.info("%s", reason)
        self.run.set_tags({"resume": reason[:250]})

        # 4. model (the same initial weights on every rank; LoRA: the frozen base plus an adapter),
        #    EMA, optimizer, booster
        self.lora_cfg = self.scfg.lora
        self.trainable_only = self.lora_cfg.enabled
        self.base_sha256 = self.resolved["run"]["init_sha256"] if self.trainable_only else ""
        self._build_model()

        # 5. training state: fresh, resumed, or from --load
        self.guard = OomGuard(self.tcfg.oom_guard)
        self.step = 0
        self.warmup_start = 0
        self.history: list[dict[str, float]] = []
        self.resumed_from = ""
        self._restore()
        reset_peak_lr(self.optimizer, self.scfg.lr)  # the stage's LR, not a loaded optimizer's
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer,
            self.scfg.warmup_steps,
            max(1, self.scfg.steps - self.warmup_start),
            self.scfg.lr_schedule,
            self.scfg.min_lr_ratio,
        )
        position_lr_scheduler(self.lr_scheduler, self.step - self.warmup_start)
        self.flops: dict[tuple[str, int], float] = {}
        self.count_flops = self.device.type == "cuda" and self.tcfg.peak_tflops > 0

    # ---- setup helpers -----------------------------------------------------------------------
    def _build_loader(self) -> InfiniteLoader:
        """Shard rows -> bucket batches of this rank (resumable sampler) -> cached latents or clips."""
        videos = VideoDataset(
            self.reader, self.scfg.frame_interval, random_start=self.cache is None, seed=self.dcfg.seed
        )
        sampler = BucketBatchSampler(
            self.reader,
            self.buckets,
            self.info.world_size,
            self.info.rank,
            seed=self.dcfg.seed,
            drop_last=True,
        )
        loader = build_latent_loader(LatentDataset(videos, self.cache), sampler, self.dcfg.num_workers)
        return InfiniteLoader(loader, sampler)

    def _build_model(self) -> None:
        """The MMDiT with its initial weights (the same on every rank), the EMA, AdamW and the booster."""
        torch.manual_seed(self.dcfg.seed)
        model = build_model(self.dcfg, self.text_encoder, self.vae.latent_channels, self.device)
        self.load_report: LoadReport | None = None
        # A LoRA checkpoint holds the adapter only, so its base is loaded on resume too.
        fresh = self.resume_path is None or self.trainable_only
        if fresh and self.init_path is not None and not is_complete(self.init_path):
            # The previous stage's weights fit exactly, and so must a LoRA base; released or
            # --load weights may not.
            strict = self.trainable_only or (
                not self.load.path and previous_stage(self.dcfg, self.stage) is not None
            )
            self.load_report = load_initial_weights(model, self.init_path, strict, self.run)
        self.lora_targets: list[str] = []
        if self.trainable_only:
            adapter = self.init_adapter if self.resume_path is None else None
            self.lora_targets = apply_stage_lora(model, self.lora_cfg, self.dcfg.seed + 1, adapter, self.run)
        set_seed(self.dcfg.seed, self.info.rank)
        self.ema = EMA(model, self.dcfg.ema_decay, trainable_only=self.trainable_only)
        self.booster = build_booster(self.dcfg.plugin, self.dcfg.precision, self.dcfg.grad_clip)
        optimizer = build_optimizer(model, self.dcfg, self.scfg)
        self.model, self.optimizer, *_ = self.booster.boost(model, optimizer)
        self.mmdit = BoostedMMDiT(self.model)

    def _resolved_config(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The config plus what this stage read (hashes), as saved beside checkpoints and final/."""
        init_sha = ""
        if self.init_path is not None and self.init_path.is_file():
            init_sha = broadcast_object(file_sha256(self.init_path) if self.info.rank == 0 else None)
        run = {
            "stage": self.stage,
            "init": str(self.init_path or ""),
            "init_sha256": init_sha,
            "base": base_reference(self.init_path, init_sha),
            "init_adapter": str(self.init_adapter or ""),
            "init_adapter_sha256": file_sha256(self.init_adapter / "adapter.safetensors")
            if self.init_adapter
            else "",
            "vae_sha256": str(stats["vae_sha256"]),
            "shards_hash": self.reader.content_hash,
            "text_encoder": self.text_encoder.name,
            "load": self.load.spec(),
            "code": code_fingerprint(f"diffusion_{self.stage}"),
        }
        return {**self.cfg.to_dict(), "run": run}

    def _restore(self) -> None:
        """Resume the matching checkpoint, or apply ``--load`` of a checkpoint folder."""
        if self.resume_path is not None:
            # The scheduler is rebuilt from the step and the warmup start, not loaded.
            loaded = self.load_state(self.resume_path, lr_scheduler=None)
            self.resumed_from = str(self.resume_path)
        elif self.load.path and is_complete(self.load.path):
            keep_step = not self.load.reset_step
            load_optimizer = self.load.optimizer is not False
            loaded = self.load_state(
                self.load.path,
                lr_scheduler=None,
                optimizer=self.optimizer if load_optimizer else None,
                sampler=self.loader if keep_step else None,
                load_rng=keep_step,
            )
            log.info(
                "loaded %s (optimizer %s, step %s)",
                self.load.path,
                "loaded" if load_optimizer else "reset",
                loaded.step if keep_step else "reset to 0",
            )
            if not keep_step:
                loaded.step, loaded.extra = 0, {}
        else:
            return
        self.step = loaded.step
        self.guard.load_state_dict(loaded.extra.get("oom_guard", {}))
        self.history = list(loaded.extra.get("history", []))
        self.warmup_start = int(loaded.extra.get("warmup_start", 0))
        if self.load.redo_warmup and self.resume_path is None:
            self.warmup_start = self.step

    # ---- one step ----------------------------------------------------------------------------
    def prepare_inputs(self, x0: Tensor, prompts: list[str]) -> FlowInputs:
        """Draw the step's randomness for latents x0 (B, C, T, H, W): text dropout, conditions, t, noise."""
        b, _, frames, h, w = x0.shape
        te = self.dcfg.text_encoder
        text = self.text_encoder.encode(prompts).to(self.device)
        text, _, _ = drop_conditions(
            text, self.null_text, token_prob=te.token_dropout, pooled_prob=te.pooled_dropout
        )
        conditions = self.scfg.conditions
        types = sample_condition_types(b, conditions.weights, frames, v2v_frames=conditions.v2v_frames)
        cond = build_conditions(types, x0, conditions.v2v_frames)
        t = self.flow.sample_t(b, (h // self.patch) * (w // self.patch), frames, device=self.device)
        noise = torch.randn_like(x0)
        x_t, target = self.flow.prepare_inputs(x0, noise, t)
        return FlowInputs(x_t, t, target, text, cond)

    def forward_backward(self, inputs: FlowInputs, micro: int, batch: dict[str, Any]) -> Tensor:
        """Loss and gradients of the batch in micro-batches of ``micro``; per-sample losses (B,)."""
        b = inputs.x_t.shape[0]
        losses = []
        starts = list(range(0, b, micro))
        for i, lo in enumerate(starts):
            part = slice(lo, lo + micro)
            last = i == len(starts) - 1
            sync = (
                contextlib.nullcontext()
                if last or self.dcfg.plugin == "zero2"
                else self.booster.no_sync(self.model, self.optimizer)
            )
            with sync:
                c = inputs.cond
                pred = predict_velocity(
                    self.mmdit,
                    inputs.x_t[part],
                    inputs.t[part],
                    inputs.text.select(part),
                    c.mask[part],
                    c.masked_ref[part],
                )
                loss = self.flow.loss(pred, inputs.target[part], c.loss_mask[part])
                check_finite(loss, self.step, batch)
                self.booster.backward(loss.sum() / b, self.optimizer)
            losses.append(loss.detach())
        return torch.cat(losses)

    def free_memory(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def train_step(self, batch: dict[str, Any], window: MetricWindow) -> Tensor:
        """One optimizer step on a collated batch; adds to ``window``; returns per-sample losses (B,)."""
        # 1. latents (cache or VAE) and the step's random draws
        raw = encode_batch_latents(batch, self.vae, self.cache, self.scfg.frame_interval)
        x0 = self.vae.normalize_latents(raw)
        inputs = self.prepare_inputs(x0, batch["text"])
        # 2. forward and backward under the OOM guard (FLOPs counted once per shape on GPU)
        key = bucket_key(batch)
        counting = self.count_flops and (key, len(x0)) not in self.flops
        with flop_counter(counting) as counter:
            losses = self.guard.run(
                key, len(x0), lambda micro: self.forward_backward(inputs, micro, batch), self.free_memory
            )
        if counting:
            self.flops[(key, len(x0))] = float(counter.get_total_flops())
        # 3. update: clip, step, schedule, EMA
        grad_norm = maybe_clip_grad_norm(self.optimizer, self.dcfg.plugin, self.dcfg.grad_clip)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"non-finite gradient norm at step {self.step + 1} (bucket {key})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        n = self.ema.num_updates
        self.ema.update(self.model, decay=min(self.dcfg.ema_decay, (1 + n) / (10 + n)))
        self.step += 1
        # 4. bookkeeping
        b, _, frames, h, w = x0.shape
        img_tokens = b * frames * (h // self.patch) * (w // self.patch)
        hits = sum(z is not None for z in batch["latents"])
        window.add(losses, inputs.t, grad_norm, img_tokens, b * inputs.text.tokens.shape[1], hits)
        window.flops += self.flops.get((key, len(x0)), 0.0)
        return losses

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train to ``steps``, then write final/; returns the summary (also metrics/diffusion_NAME.json)."""
        start, first_step = time.perf_counter(), self.step
        rank0 = self.info.rank == 0
        window = MetricWindow(self.dcfg.loss_bins)
        samples_png, sampled_at = None, -1
        bar = tqdm(
            total=self.scfg.steps,
            initial=self.step,
            desc=f"diffusion {self.stage}",
            disable=not (rank0 and progress),
        )
        with maybe_profiler(self.tcfg, self.run, rank0) as profiler:
            while self.step < self.scfg.steps:
                losses = self.train_step(next(self.loader), window)
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses.mean()):.4f}")
                if profiler is not None:
                    profiler.step()
                last = self.step == self.scfg.steps
                if self.step % self.dcfg.log_every == 0 or last:
                    self._log(window)
                    window = MetricWindow(self.dcfg.loss_bins)
                if rank0 and self.dcfg.sample_every and self.step % self.dcfg.sample_every == 0:
                    samples_png, sampled_at = self.log_samples(), self.step
                if self.step % self.dcfg.ckpt_every == 0 or last:
                    self.save()
        bar.close()
        summary = self._summary(time.perf_counter() - start, self.step - first_step)
        if rank0:
            if sampled_at != self.step:
                samples_png = self.log_samples()
            final = self.paths.final(self.stage)
            adapter = None
            if self.trainable_only:
                adapter = AdapterExport(self.lora_cfg, self.lora_targets, self.resolved["run"]["base"])
            save_final(
                final,
                unwrap_model(self.model),
                self.ema,
                self.resolved,
                self.text_encoder,
                samples_png,
                adapter,
            )
            write_loss_csv(self.paths.loss_csv(self.stage), self.history)
            plot_loss_curve(
                self.paths.loss_csv(self.stage), self.paths.loss_png(self.stage), f"diffusion {self.stage}"
            )
            self.paths.summary(self.stage).write_text(json.dumps(summary, indent=2) + "\n")
            self.run.log_metrics({"final_loss": summary["final_loss"]}, step=self.step)
            mark_finished(self.paths.ckpt(self.stage), self.config_hash, self.step)
        return summary

    def save(self) -> Path:
        """A checkpoint of the whole state at the current step (every rank calls it)."""
        states = [self.guard.state_dict()]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, self.guard.state_dict())
        self.guard.merge(states)
        extra = {
            "oom_guard": self.guard.state_dict(),
            "history": self.history,
            "warmup_start": self.warmup_start,
        }
        return self.save_state(self.paths.ckpt(self.stage), extra, self.dcfg.keep_last_n)

    def _log(self, window: MetricWindow) -> None:
        metrics = window.reduce(self.device)
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        if self.count_flops:
            metrics["mfu"] = metrics["tflops_per_device"] / self.tcfg.peak_tflops
        else:
            metrics.pop("tflops_per_device")
        from opensora_core.training.vae_trainer import peak_memory_mb

        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        if self.info.rank != 0:
            return
        self.run.log_metrics(metrics, step=self.step)
        row = {
            "step": self.step,
            "loss": metrics["loss"],
            "lr": metrics["lr"],
            "grad_norm": metrics["grad_norm"],
        }
        self.history.append(row)
        write_loss_csv(self.paths.loss_csv(self.stage), self.history)

    def log_samples(self) -> Path | None:
        """Rank 0: a PNG of EMA samples at fixed seeds (rows: prompts, columns: frames), logged to MLflow."""
        prompts = sample_prompts(self.paths.shards, self.dcfg.num_samples)
        if not prompts:
            return None
        out = render_samples(
            self.ema,
            unwrap_model(self.model).config,
            self.vae,
            self.text_encoder,
            self.null_text,
            prompts,
            sample_shape(self.buckets),
            self.dcfg,
            self.device,
            new_samples_path(self.step),
            template=unwrap_model(self.model) if self.trainable_only else None,
        )
        self.run.log_artifact(out, "samples")
        return out

    def _summary(self, seconds: float, steps_run: int) -> dict[str, Any]:
        recent = [row["loss"] for row in self.history[-5:]]
        return {
            "stage": self.stage,
            "steps": self.step,
            "steps_run": steps_run,
            "final_loss": float(np.mean(recent)) if recent else float("nan"),
            "first_loss": self.history[0]["loss"] if self.history else float("nan"),
            "train_seconds": round(seconds, 2),
            "resumed_from": self.resumed_from,
            "init": self.resolved["run"]["init"],
            "oom_limits": self.guard.limits,
        }


def train_stage(
    cfg: Config,
    stage: str,
    paths: StagePaths,
    info: DistInfo,
    load: LoadOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``stage`` on this rank (every rank calls it); returns the summary."""
    load = load or LoadOptions()
    validate_stage(cfg, stage, paths, load)
    params = {"stage": stage, "diffusion": cfg.to_dict()["diffusion"], "train": dataclasses.asdict(cfg.train)}
    params["diffusion"]["stages"] = {stage: params["diffusion"]["stages"][stage]}
    tags = {"diffusion.stage": stage, "world_size": info.world_size, "device": info.device.type}
    with start_stage_run(f"diffusion_{stage}", cfg.tracking, params=params, tags=tags, rank=info.rank) as run:
        trainer = DiffusionTrainer(cfg, stage, paths, info, load, run)
        summary = trainer.fit(progress)
        run.log_artifact(paths.loss_csv(stage))
        run.log_artifact(paths.loss_png(stage))
    return summary
