"""Held-out-caption adherence of a LoRA fine-tune against its base, side by side in one run.

1. Base data: MovingShapes with ``ingest.val_pairs`` (default ``red circle``, ``blue square``,
   ``up triangle``): every clip that shows one of those words with that shape is ``val``, so the
   base never sees a red circle, a blue square or a triangle moving up (it sees red, blue and
   ``up`` with the other shapes). ingest, meta, validate and shard run in-process.
2. Base: the diffusion stages of params.yaml, trained with ``tasks.diffusion_train`` (torchrun,
   ddp on gloo) on the VAE and latent statistics of a prior ``make run`` (``--vae``).
3. Fine-tune data: a second MovingShapes draw (another seed, the same pairs); its ``val`` clips,
   the held-out combinations only, go through a CSV ingest as the training set of the fine-tune.
4. Fine-tune: one LoRA stage (rank, alpha, lr and warmup of ``params/finetune.yaml``'s first
   stage; the base's last-stage buckets, text-to-video) with ``diffusion.init_from`` the base.
5. Scores: the same prompts (``build_adherence_prompts`` over the held-out combinations, new
   captions and backgrounds) at the same seeds and sampler steps, base then base + adapter
   (``T2VPipeline.apply_lora``), measured from the pixels (colour, motion, shape); ``overall``
   is the mean of the three, ``joint`` the share of samples right on all three. ``--splits
   val,train`` adds the seen combinations as a control (does the adapter cost the rest?).

Writes to ``--out``: ``results.json`` (every figure, every sample's prompt, seed and
measurements), ``results.md`` (the table for benchmarks/BENCHMARKS.md) and ``grid.png`` (one
row per held-out prompt at the first seed: base frames on the left, base + LoRA on the right).
Nothing under ``models/``, ``metrics/`` or MLflow changes.

    .venv/bin/python benchmarks/lora_adherence.py                    # after `make run` (its VAE)
    .venv/bin/python benchmarks/lora_adherence.py --reuse-base --ft-steps 600
    .venv/bin/python benchmarks/lora_adherence.py --tiny --out /tmp/lora-tiny   # seconds: the test

``--tiny`` shrinks every step (micro data, an untrained tiny VAE with statistics measured on the
clips, a few training and sampler steps) so the whole path runs in about a minute; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's packages first
    sys.path.insert(0, str(ROOT))

DEFAULT_PAIRS = "red circle,blue square,up triangle"
ATTRS = ("color", "motion", "shape")
ARMS = ("base", "lora")
FT_STAGE = "finetune"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@dataclass
class Sizing:
    """How big each step is: the real run, or ``--tiny`` for the test."""

    base_clips: int = 150
    """Clips of the base's data set (params.yaml's ingest otherwise)."""
    ft_clips: int = 450
    """Clips of the second draw whose held-out ones make the fine-tune set (5 per combination)."""
    ingest: dict[str, Any] = field(default_factory=dict)
    """Extra ``ingest`` keys of both draws."""
    base_stages: dict[str, Any] | None = None
    """``diffusion.stages`` of the base (None: params.yaml's)."""
    ft_buckets: dict[str, Any] | None = None
    """Buckets of the LoRA stage (None: the base's last stage's)."""
    diffusion: dict[str, Any] = field(default_factory=dict)
    """Extra ``diffusion`` keys of both trainings."""


TINY = Sizing(
    base_clips=40,
    ft_clips=40,
    ingest={"num_stills": 0, "sizes": [[32, 32]], "num_frames": [9], "fps": [8]},
    base_stages={
        "stage1": {
            "steps": 3,
            "warmup_steps": 1,
            "buckets": {"32px": {9: [1.0, 2]}},
            "conditions": {"weights": {"t2v": 1.0}},
        }
    },
    diffusion={"log_every": 1, "ckpt_every": 100, "sample_every": 0, "num_samples": 1, "sample_num_steps": 1},
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def build_data(out: Path, ingest_keys: dict[str, Any]) -> Path:
    """ingest, meta, validate and shard into ``out`` (``raw/``, ``meta/``, ``shards/``) with
    params.yaml's sections and ``ingest_keys``; returns the shard folder."""
    from opensora_core.config import IngestConfig, ValidateConfig, build_dataclass, load_config
    from tasks.ingest import ingest
    from tasks.meta import meta
    from tasks.shard import run_shard
    from tasks.validate import run_validate

    cfg = load_config(ROOT / "params.yaml")
    ingest_cfg = build_dataclass(IngestConfig, {**asdict(cfg.ingest), **ingest_keys}, "ingest")
    ingest(ingest_cfg, out / "raw", ROOT, progress=False)
    (out / "meta").mkdir(parents=True, exist_ok=True)
    meta(out / "raw" / "index.csv", out / "meta" / "meta.parquet", cfg.meta, num_workers=0, progress=False)
    validate_cfg = build_dataclass(ValidateConfig, asdict(cfg.validate), "validate")
    run_validate(
        out / "meta" / "meta.parquet",
        out / "meta" / "clean.parquet",
        out / "meta" / "quarantine.parquet",
        out / "reports",
        validate_cfg,
    )
    run_shard(out / "meta" / "clean.parquet", out / "shards", cfg.shard, progress=False)
    return out / "shards"


def finetune_data(out: Path, pairs: list[str], clips: int, ingest_keys: dict[str, Any]) -> tuple[Path, int]:
    """The fine-tune set: the held-out clips of a second draw (seed + 1), through a CSV ingest
    (``val_fraction`` 0: every row trains); returns the shard folder and its clip count."""
    import pandas as pd

    from opensora_core.config import load_config

    seed = load_config(ROOT / "params.yaml").ingest.seed + 1
    draw = out / "draw"
    build_raw_only(
        draw, {**ingest_keys, "num_clips": clips, "val_pairs": pairs, "val_combos": 0, "seed": seed}
    )
    labels = pd.read_parquet(draw / "raw" / "labels.parquet")
    held = labels[labels["split"] == "val"]
    table = pd.DataFrame({"path": [str((ROOT / p).resolve()) for p in held["path"]], "text": held["text"]})
    table.to_csv(out / "finetune.csv", index=False)
    shards = build_data(out, {"source": "csv", "path": str(out / "finetune.csv"), "val_fraction": 0.0})
    return shards, len(table)


def build_raw_only(out: Path, ingest_keys: dict[str, Any]) -> None:
    """The ingest stage alone (synthetic, params.yaml's section with ``ingest_keys``) into ``out/raw``."""
    from opensora_core.config import IngestConfig, build_dataclass, load_config
    from tasks.ingest import ingest

    cfg = load_config(ROOT / "params.yaml")
    ingest(
        build_dataclass(IngestConfig, {**asdict(cfg.ingest), **ingest_keys}, "ingest"),
        out / "raw",
        ROOT,
        progress=False,
    )


def untrained_vae(out: Path, shards: Path) -> tuple[Path, Path]:
    """``--tiny`` only: a randomly initialised tiny VAE (``VaeModelConfig()``) and the per-channel
    mean/std of its latents on some of the shards' clips (so latents are about N(0, 1))."""
    import pandas as pd
    import torch

    from opensora_core.data.dataset import prepare_video
    from opensora_core.data.decoding import decode_frames
    from opensora_core.data.shards import file_sha256
    from opensora_core.models.vae.model import VaeModelConfig, build_vae

    torch.manual_seed(0)
    vae = build_vae(VaeModelConfig())
    weights = vae.save(out / "vae", "model")
    rows = pd.concat([pd.read_parquet(p) for p in sorted(shards.glob("*.parquet"))]).head(8)
    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode_raw(prepare_video(decode_frames(Path(p)), 32, 32)[None]).flatten(2)
                for p in rows["path"]
            ],
            dim=2,
        )  # (1, C, N)
    stats = {
        "mean": z.mean(dim=(0, 2)).tolist(),
        "std": z.std(dim=(0, 2)).clamp(min=1e-3).tolist(),
        "scale": 1.0,
        "shift": 0.0,
        "num_samples": len(rows),
        "vae_sha256": file_sha256(weights),
    }
    (out / "latent_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return out / "vae", out / "latent_stats.json"


# --------------------------------------------------------------------------------------------
# Training (the stage CLI, torchrun)
# --------------------------------------------------------------------------------------------
def write_params(path: Path, diffusion: dict[str, Any]) -> Path:
    """params.yaml with tracking off and ``diffusion`` merged in (its ``stages`` replacing the file's)."""
    from opensora_core.config import deep_merge

    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = diffusion.get("stages")
    tree["diffusion"] = deep_merge(tree["diffusion"], {k: v for k, v in diffusion.items() if k != "stages"})
    if stages is not None:
        tree["diffusion"]["stages"] = stages
    tree["tracking"]["enabled"] = False
    tree["profile"] = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def train_stage(params: Path, stage: str, shards: Path, vae: Path, stats: Path, out: Path) -> float:
    """``python -m tasks.diffusion_train --stage STAGE`` into ``out/models``; its wall seconds."""
    cmd = [
        sys.executable, "-m", "tasks.diffusion_train", "--stage", stage, "--params", str(params), "--quiet",
        "--shards", str(shards), "--vae", str(vae), "--latent-stats", str(stats),
        "--models-dir", str(out / "models"), "--metrics-dir", str(out / "metrics"),
    ]  # fmt: skip
    log = out / f"{stage}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(
            cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=os.environ | ENV
        ).returncode
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return time.perf_counter() - start


def finetune_stage(
    base_params: Path, base_final: Path, buckets: dict[str, Any] | None, steps: int
) -> dict[str, Any]:
    """The LoRA stage: ``params/finetune.yaml``'s first stage (lr, warmup, lora) with ``steps``,
    the base's last-stage buckets (or ``buckets``), text-to-video only."""
    profile = yaml.safe_load((ROOT / "params" / "finetune.yaml").read_text())
    first = next(iter(profile["diffusion"]["stages"].values()))
    base = yaml.safe_load(base_params.read_text())["diffusion"]["stages"]
    last = base[list(base)[-1]]
    return {
        "steps": steps,
        "lr": first["lr"],
        "warmup_steps": first["warmup_steps"],
        "lr_schedule": "constant",
        "buckets": buckets or last["buckets"],
        "conditions": {"weights": {"t2v": 1.0}},
        "lora": first["lora"],
    }


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def score(videos: list[np.ndarray], prompts: list[Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Adherence of ``videos`` (each (T, H, W, 3) uint8) to ``prompts``: per attribute, ``overall``
    (their mean) and ``joint`` (all three right); and one row per sample."""
    from opensora_core.evaluation.adherence import measure_clip, score_adherence

    measured = [measure_clip(v) for v in videos]
    scores = score_adherence(prompts, measured)
    out = {a: scores[f"adherence_{a}"] for a in ATTRS}
    out["overall"] = float(np.mean([out[a] for a in ATTRS]))
    rows = [{a: getattr(m, a) for a in ATTRS} for m in measured]
    hits = [all(getattr(p, a) == r[a] for a in ATTRS) for p, r in zip(prompts, rows)]
    out["joint"] = float(np.mean(hits)) if hits else 0.0
    return out, rows


def numel(weights: Path) -> int:
    """Number of values in a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(weights), "np") as fh:
        return int(sum(np.prod(fh.get_slice(k).get_shape()) for k in fh.keys()))  # noqa: SIM118 (safe_open is not iterable)


def side_by_side(left: list[np.ndarray], right: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """Frame rows of ``left`` and ``right`` videos next to each other: (H', W', 3) uint8."""
    from opensora_core.evaluation.samples import make_grid

    a, b = make_grid(left), make_grid(right)
    return np.concatenate([a, np.full((a.shape[0], gap, 3), 255, np.uint8), b], axis=1)


def score_arms(
    base_final: Path,
    adapter: Path,
    vae: Path,
    stats: Path,
    labels: Path,
    splits: list[str],
    seeds: list[int],
    num_prompts: int,
    num_steps: int,
    guidance: float,
    batch_size: int,
) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Both arms on each split's prompts at every seed (sample i of seed s draws noise seed s + i);
    the base first, then the same pipeline with the adapter merged in. Returns the figures and
    the first seed's held-out videos per arm (for the grid)."""
    import pandas as pd
    import torch

    from opensora_core.diffusion.sampling import SamplingOptions
    from opensora_core.evaluation.adherence import build_adherence_prompts
    from opensora_core.inference import T2VPipeline

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    table = pd.read_parquet(labels)
    prompts = {s: build_adherence_prompts(table, num_prompts, seed=0, split=s) for s in splits}
    options = SamplingOptions(num_steps=num_steps, guidance=guidance, progress=False)
    pipeline = T2VPipeline.from_training(base_final, vae, stats, device="cpu")
    results: dict[str, Any] = {}
    grid: dict[str, list[np.ndarray]] = {}
    for arm in ARMS:
        if arm == "lora":
            pipeline.apply_lora(adapter)
        start = time.perf_counter()
        results[arm] = {}
        for split in splits:
            per_seed, samples = {}, []
            for seed in seeds:
                texts = [p.text for p in prompts[split]]
                noise = [seed + i for i in range(len(texts))]
                videos = pipeline.generate(texts, noise, options, batch_size=batch_size)
                per_seed[str(seed)], rows = score(videos, prompts[split])
                samples += [
                    {"prompt": p.text, "seed": n, "asked": {a: getattr(p, a) for a in ATTRS}, "measured": r}
                    for p, n, r in zip(prompts[split], noise, rows)
                ]
                if split == "val" and seed == seeds[0]:
                    grid[arm] = videos
            mean = {
                k: float(np.mean([s[k] for s in per_seed.values()])) for k in next(iter(per_seed.values()))
            }
            results[arm][split] = {"mean": mean, "per_seed": per_seed, "samples": samples}
        results[arm]["sampling_s"] = round(time.perf_counter() - start, 1)
    return results, grid


def deltas(results: dict[str, Any], splits: list[str]) -> dict[str, dict[str, float]]:
    """base + LoRA minus base, per split and figure (means over the seeds)."""
    return {
        s: {
            k: results["lora"][s]["mean"][k] - results["base"][s]["mean"][k]
            for k in results["base"][s]["mean"]
        }
        for s in splits
    }


def markdown(report: dict[str, Any]) -> str:
    """The results table: one row per arm and split (means over the seeds, then each seed), the delta."""
    keys = (*ATTRS, "overall", "joint")
    head = "| split | model | colour | motion | shape | overall | all three | per seed (overall) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    names = {"val": "held out", "train": "seen"}
    for split in report["splits"]:
        for arm, label in (("base", "base"), ("lora", "base + LoRA")):
            r = report["results"][arm][split]
            seeds = " / ".join(f"{v['overall']:.2f}" for v in r["per_seed"].values())
            cells = " | ".join(f"{r['mean'][k]:.3f}" for k in keys)
            lines.append(f"| {names[split]} | {label} | {cells} | {seeds} |")
        d = report["delta"][split]
        lines.append(f"| {names[split]} | **delta** | " + " | ".join(f"{d[k]:+.3f}" for k in keys) + " | |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "lora_adherence")
    p.add_argument("--pairs", default=DEFAULT_PAIRS, help="held-out 'WORD SHAPE' pairs, comma-separated")
    p.add_argument(
        "--vae", type=Path, default=ROOT / "models" / "vae" / "final", help="a trained VAE (make run)"
    )
    p.add_argument("--latent-stats", type=Path, default=ROOT / "models" / "vae" / "latent_stats.json")
    p.add_argument(
        "--ft-steps", type=int, default=0, help="optimiser steps of the LoRA stage (0: 400; tiny 3)"
    )
    p.add_argument(
        "--rank", type=int, default=0, help="LoRA rank (0: params/finetune.yaml's, alpha scaled with it)"
    )
    p.add_argument("--lr", type=float, default=0.0, help="LoRA learning rate (0: params/finetune.yaml's)")
    p.add_argument("--seeds", default="1024,2048", help="sampling seeds, comma-separated (>= 2)")
    p.add_argument(
        "--prompts", type=int, default=0, help="prompts per split, the combinations in turn (0: 32; tiny 4)"
    )
    p.add_argument("--num-steps", type=int, default=0, help="sampler steps (0: evaluate.num_steps)")
    p.add_argument(
        "--splits", default="", help="val (held out) and/or train (seen, a control); default both (tiny: val)"
    )
    p.add_argument("--reuse-base", action="store_true", help="keep a base this --out already trained")
    p.add_argument("--tiny", action="store_true", help="micro sizes for the test (meaningless figures)")
    args = p.parse_args(argv)
    args.pairs = [x.strip() for x in args.pairs.split(",") if x.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.ft_steps = args.ft_steps or (3 if args.tiny else 400)
    args.prompts = args.prompts or (4 if args.tiny else 32)
    args.splits = [s.strip() for s in (args.splits or ("val" if args.tiny else "val,train")).split(",")]
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds needs at least two different seeds, got {args.seeds}")
    if not args.splits or set(args.splits) - {"val", "train"}:
        p.error(f"--splits takes val and/or train, got {args.splits}")
    if args.ft_steps < 1 or args.prompts < 1:
        p.error("--ft-steps and --prompts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from opensora_core.config import load_config
    from opensora_core.data.video_io import write_image
    from opensora_core.errors import StageError

    sizing = TINY if args.tiny else Sizing()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    evaluate = load_config(ROOT / "params.yaml").evaluate
    num_steps = args.num_steps or (2 if args.tiny else evaluate.num_steps)
    timings: dict[str, float] = {}
    for path in () if args.tiny else (args.vae, args.latent_stats):  # before any work
        if not path.exists():
            print(
                f"error: not found: {path} (run `make run` first, or pass --vae and --latent-stats)",
                file=sys.stderr,
            )
            sys.exit(2)
    try:
        # 1. the base's data, with the pairs held out
        start = time.perf_counter()
        base_keys = {
            **sizing.ingest,
            "num_clips": sizing.base_clips,
            "val_pairs": args.pairs,
            "val_combos": 0,
        }
        base_shards = build_data(out / "base" / "data", base_keys)
        ft_shards, ft_clips = finetune_data(out / "ft" / "data", args.pairs, sizing.ft_clips, sizing.ingest)
        timings["data_s"] = time.perf_counter() - start
        vae, stats = (args.vae, args.latent_stats) if not args.tiny else untrained_vae(out, base_shards)

        # 2. the base, stage after stage (kept with --reuse-base when its pairs match)
        base_params = write_params(
            out / "base" / "params.yaml",
            {**sizing.diffusion, "cache_dir": str(out / "cache"), "stages": sizing.base_stages}
            if sizing.base_stages
            else {**sizing.diffusion, "cache_dir": str(out / "cache")},
        )
        stages = list(yaml.safe_load(base_params.read_text())["diffusion"]["stages"])
        base_final = out / "base" / "models" / stages[-1] / "final"
        marker = out / "base" / "pairs.json"
        reuse = args.reuse_base and base_final.is_dir() and marker.is_file()
        if reuse and json.loads(marker.read_text()) != args.pairs:
            sys.exit(
                f"--reuse-base: the base in {out} held out {marker.read_text().strip()}, not {args.pairs}"
            )
        timings["base_train_s"] = 0.0
        if not reuse:
            marker.unlink(missing_ok=True)
            for stage in stages:
                timings["base_train_s"] += train_stage(
                    base_params, stage, base_shards, vae, stats, out / "base"
                )
            marker.write_text(json.dumps(args.pairs))

        # 3. the LoRA fine-tune from the base
        ft_stage = finetune_stage(base_params, base_final, sizing.ft_buckets, args.ft_steps)
        if args.rank:
            scale = ft_stage["lora"]["alpha"] / ft_stage["lora"]["rank"]
            ft_stage["lora"] = {**ft_stage["lora"], "rank": args.rank, "alpha": scale * args.rank}
        if args.lr:
            ft_stage["lr"] = args.lr
        ft_params = write_params(
            out / "ft" / "params.yaml",
            {**sizing.diffusion, "cache_dir": str(out / "cache"), "init_from": str(base_final),
             "stages": {FT_STAGE: ft_stage}},
        )  # fmt: skip
        ft_dir = out / "ft"
        if (ft_dir / "models").exists():  # a fresh adapter each run (another rank or lr resumes nothing)
            import shutil

            shutil.rmtree(ft_dir / "models")
        timings["ft_train_s"] = train_stage(ft_params, FT_STAGE, ft_shards, vae, stats, ft_dir)
        adapter = ft_dir / "models" / FT_STAGE / "final" / "adapter"

        # 4. both arms, the same prompts and seeds
        results, grid = score_arms(
            base_final, adapter, vae, stats, out / "base" / "data" / "raw" / "labels.parquet",
            args.splits, args.seeds, args.prompts, num_steps, evaluate.guidance, evaluate.batch_size,
        )  # fmt: skip
    except StageError as exc:  # bad pairs, paths or data: the stage's message and exit code (2 for input)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)

    # 5. reports
    adapter_meta = json.loads((adapter / "adapter.json").read_text())
    ft_summary = json.loads((ft_dir / "metrics" / f"diffusion_{FT_STAGE}.json").read_text())
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "tiny": args.tiny,
        "pairs": args.pairs,
        "splits": args.splits,
        "seeds": args.seeds,
        "num_prompts": args.prompts,
        "num_steps": num_steps,
        "guidance": evaluate.guidance,
        "base": {"final": str(base_final), "stages": stages, "reused": reuse},
        "finetune": {
            "clips": ft_clips,
            "stage": ft_stage,
            "adapter_parameters": numel(adapter / "adapter.safetensors"),
            "base_parameters": numel(base_final / "ema.safetensors"),
            "summary": ft_summary,
            "adapter_base_sha256": adapter_meta["base"].get("sha256"),
        },
        "results": results,
        "delta": deltas(results, args.splits),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/lora_adherence.py", *(argv or sys.argv[1:])]
        ),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "results.md").write_text(table)
    write_image(out / "grid.png", side_by_side(grid["base"], grid["lora"]))
    print(table, end="")
    d = report["delta"]["val"]
    print(f"held-out delta: overall {d['overall']:+.3f} (colour {d['color']:+.3f}, motion {d['motion']:+.3f}, "
          f"shape {d['shape']:+.3f}) -> {out}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
