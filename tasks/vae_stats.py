"""Stage ``vae_stats``: exact per-channel latent statistics of the trained VAE, as a torchrun job.

    python -m tasks.vae_stats [--params P] [--set section.key=value ...]

Writes ``models/vae/latent_stats.json`` (mean and std per latent channel, scale, shift,
num_samples, vae_sha256). The diffusion stages read it as a DVC dependency. With
``vae_stats.reuse_from`` (a file or ``models:/NAME@ALIAS``) the statistics are copied instead, so a
fine-tune keeps its base's latent normalisation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config
from opensora_core.distributed.launcher import run_job
from opensora_core.errors import InputError, JobFailed

JOB = "opensora_core.jobs.vae_stats"


def vae_weights_file(vae_dir: Path) -> Path:
    """The weights the statistics belong to: the EMA file of a VAE final/ folder, else its raw one."""
    ema = vae_dir / "ema.safetensors"
    return ema if ema.is_file() else vae_dir / "model.safetensors"


def reuse_stats(cfg: Config, vae_dir: Path, output: Path) -> dict:
    """``vae_stats.reuse_from``: copy a statistics file (or a registered bundle's, whose VAE must
    equal ``vae_dir``'s tensor for tensor) to ``output`` with this VAE's sha256."""
    from safetensors.torch import load_file

    from opensora_core.data.shards import file_sha256

    source = cfg.vae_stats.reuse_from
    if source.startswith("models:/"):
        from opensora_core.inference.sources import fetch_registered_bundle
        from opensora_core.tracking import tracking_uri

        bundle, _ = fetch_registered_bundle(source, cfg.diffusion.cache_dir, tracking_uri(cfg.tracking))
        theirs, ours = load_file(str(bundle / "vae.safetensors")), load_file(str(vae_weights_file(vae_dir)))
        same = theirs.keys() == ours.keys() and all(theirs[k].equal(ours[k]) for k in ours)
        if not same:
            raise InputError(
                f"vae_stats.reuse_from {source}: its VAE differs from {vae_dir}; measure instead"
            )
        stats_file = bundle / "latent_stats.json"
    else:
        stats_file = Path(source)
    if not stats_file.is_file():
        raise InputError(f"vae_stats.reuse_from: {stats_file} not found")
    stats = json.loads(stats_file.read_text())
    if not {"mean", "std"} <= stats.keys():
        raise InputError(f"{stats_file} holds no per-channel mean and std")
    stats = {
        "num_samples": 0,
        **stats,
        "vae_sha256": file_sha256(vae_weights_file(vae_dir)),
        "reused_from": source,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def stage(args: argparse.Namespace, cfg: Config) -> str:
    for path in (Path(args.shards) / "manifest.json", Path(args.vae)):
        if not path.exists():
            raise InputError(f"{path} not found (run the shard and vae_train stages first)")
    if cfg.vae_stats.reuse_from:
        stats = reuse_stats(cfg, Path(args.vae), Path(args.output))
        return f"{len(stats['mean'])} channels reused from {cfg.vae_stats.reuse_from} -> {args.output}"
    job_args = ["--params", args.params]
    for item in args.overrides:
        job_args += ["--set", item]
    job_args += ["--shards", args.shards, "--vae", args.vae, "--output", args.output] + [
        "--quiet"
    ] * args.quiet
    code = run_job(JOB, job_args, cfg.launch)
    if code != 0:
        raise JobFailed(code, f"latent statistics job failed with exit code {code}")
    stats = json.loads(Path(args.output).read_text())
    return f"{stats['num_samples']} clips, {len(stats['mean'])} channels -> {args.output}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("Exact per-channel latent statistics of the VAE (torchrun job).", "vae_stats")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--vae", default="models/vae/final")
    parser.add_argument("--output", default="models/vae/latent_stats.json")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
