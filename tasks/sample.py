"""Inference CLI: ``python -m tasks.sample --prompt "a red circle moves left" --num-samples 2``.

The model (``--model``) is a registered model (``models:/opensora-t2v@champion``, the default),
an MLflow run id, or a folder (an inference bundle, or a diffusion stage's ``final/`` paired with
``--vae`` and ``--latent-stats``). Prompt p's k-th sample is output ``i = p * N + k`` and draws
its noise from a generator seeded ``--seed + i``, so it is the same alone or in any batch.

Each output is ``NNNN_<prompt slug>.mp4`` (``.png`` for one frame) in ``--save-dir`` with a
``.txt`` beside it holding the prompt, the seed and the settings. A missing or unreadable
``--ref`` or a model that does not resolve stops the command before any model loads (exit 2).

``--lora PATH --lora-scale S`` merges a LoRA adapter (an ``adapter/`` folder a LoRA stage wrote)
into any base ``--model`` before sampling; an adapter for a base of other shapes is exit 2.
``--merge OUT`` writes the model as it samples (adapter merged) as a bundle folder, usable as
``--model OUT``; without prompts it only writes.

Several GPUs: ``--nproc N`` relaunches this command under torchrun; rank r makes the outputs
with ``i % N == r``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config
from opensora_core.data.tables import blank_rows, read_csv_table
from opensora_core.diffusion.conditions import CONDITION_TYPES
from opensora_core.errors import ConfigError, InputError, StageError
from opensora_core.outputs import save_output


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values, then the ``text`` (or ``prompt``) column of ``--prompts-csv`` rows [start, end)."""
    prompts = list(args.prompt or [])
    if args.prompts_csv:
        path = Path(args.prompts_csv)
        table = read_csv_table(path, "--prompts-csv", one_of=("text", "prompt"))
        column = next(c for c in ("text", "prompt") if c in table.columns)
        end = args.end_index if args.end_index is not None else len(table)
        rows = table[column].iloc[args.start_index : end]
        if rows.empty:
            raise InputError(
                f"--prompts-csv {path}: no rows in [--start-index {args.start_index}, "
                f"--end-index {end}) of its {len(table)}"
            )
        blank = blank_rows(rows)
        if blank:
            raise InputError(f"--prompts-csv {path}: empty {column!r} in data row {blank[0]}")
        prompts += rows.tolist()
    if not prompts:
        raise ConfigError("no prompts: give --prompt (repeatable) or --prompts-csv")
    return prompts


def plan_outputs(prompts: list[str], num_samples: int, seed: int) -> list[tuple[int, str, int]]:
    """(index, prompt, seed) of every output: prompt p's k-th sample is index p * N + k, seed + index."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    return [
        (p * num_samples + k, prompt, seed + p * num_samples + k)
        for p, prompt in enumerate(prompts)
        for k in range(num_samples)
    ]


def sample_videos(args: argparse.Namespace, cfg: Config) -> str:
    """Check the inputs, load the model, generate this rank's outputs and write them."""
    from opensora_core.diffusion.sampling import SamplingOptions
    from opensora_core.inference import T2VPipeline, VideoSpec, load_reference, resolve_model, video_size
    from opensora_core.tracking import tracking_uri

    # 1. everything that can fail without a model
    merge_only = bool(args.merge) and not (args.prompt or args.prompts_csv)
    prompts = [] if merge_only else read_prompts(args)
    if args.lora:
        from opensora_core.inference.adapters import find_adapter_dir

        find_adapter_dir(args.lora)  # InputError (exit 2) before any model loads
    if args.cond_type != "t2v" and args.t2i2v:
        raise ConfigError("--t2i2v makes its own reference: use it with --cond-type t2v")
    if args.cond_type != "t2v" and not args.ref:
        raise InputError(f"--cond-type {args.cond_type} needs --ref (an image or a video)")
    ref = load_reference(args.ref) if args.ref else None
    source = resolve_model(args.model, tracking_uri(cfg.tracking))
    outputs = plan_outputs(prompts, args.num_samples, args.seed)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    mine = [o for o in outputs if o[0] % world == rank]
    options = SamplingOptions(
        num_steps=args.num_steps,
        guidance=args.guidance,
        guidance_img=args.guidance_img,
        progress=not args.quiet,
    )

    # 2. the model
    device = args.device or None
    if device is None and world > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    pipeline = T2VPipeline.load(
        source,
        vae_dir=args.vae,
        latent_stats=args.latent_stats,
        tracking_uri=tracking_uri(cfg.tracking),
        device=device,
        dtype=args.dtype,
        offload=args.offload,
    )
    if args.lora:
        pipeline.apply_lora(args.lora, args.lora_scale)
    if args.merge:
        pipeline.save_bundle(args.merge)
        if merge_only:
            return f"merged weights -> {args.merge} (a bundle: --model {args.merge})"
    video = pipeline.video
    if args.resolution:
        h, w = video_size(args.resolution, args.aspect_ratio or "1:1", pipeline.spatial_factor)
        video = VideoSpec(video.num_frames, h, w, video.fps)
    video = VideoSpec(
        num_frames=args.num_frames or video.num_frames,
        height=video.height,
        width=video.width,
        fps=args.fps or video.fps,
    )
    pipeline.check_video(video)

    # 3. generate and write
    save_dir = Path(args.save_dir)
    settings = {
        "model": args.model,
        "cond_type": "t2i2v" if args.t2i2v else args.cond_type,
        "ref": args.ref or "",
        "num_steps": args.num_steps,
        "guidance": args.guidance,
        "guidance_img": args.guidance_img,
        "negative_prompt": args.negative_prompt,
        "num_frames": video.num_frames,
        "height": video.height,
        "width": video.width,
        "fps": video.fps,
        "dtype": args.dtype,
    }
    texts, seeds = [o[1] for o in mine], [o[2] for o in mine]
    kwargs = dict(negative_prompt=args.negative_prompt, batch_size=args.batch_size, progress=not args.quiet)
    if args.t2i2v:
        videos = pipeline.generate_t2i2v(texts, seeds, options, video, **kwargs)
    else:
        videos = pipeline.generate(texts, seeds, options, video, cond_type=args.cond_type, ref=ref, **kwargs)
    paths = [save_output(save_dir, i, p, s, v, video.fps, settings) for (i, p, s), v in zip(mine, videos)]
    where = f" (rank {rank} of {world})" if world > 1 else ""
    kind = "stills" if video.num_frames == 1 and not args.t2i2v else "videos"
    return f"{len(paths)} {kind} {video.num_frames}x{video.height}x{video.width} -> {save_dir}{where}"


def relaunch(argv: list[str], nproc: int, cfg: Config) -> int:
    """Run this command under torchrun with ``nproc`` processes (``--nproc`` removed)."""
    import dataclasses

    from opensora_core.distributed.launcher import run_job

    launch = dataclasses.replace(cfg.launch, nproc_per_node=nproc)
    return run_job("tasks.sample", argv, launch)


def build_sample_parser() -> argparse.ArgumentParser:
    parser = build_parser("Generate videos from text with a trained Open-Sora model.", prog="sample")
    add = parser.add_argument
    add("--prompt", action="append", help="a prompt (repeatable)")
    add("--prompts-csv", default="", help="CSV with a 'text' (or 'prompt') column")
    add("--start-index", type=int, default=0, help="first CSV row used")
    add("--end-index", type=int, default=None, help="CSV row after the last one used")
    add("--seed", type=int, default=1024, help="output i draws its noise from seed + i")
    add("--num-samples", type=int, default=1, help="samples per prompt")
    add("--num-steps", type=int, default=30, help="sampling steps")
    add("--guidance", type=float, default=7.5, help="text guidance scale")
    add("--guidance-img", type=float, default=3.0, help="image guidance scale (conditioned types)")
    add("--negative-prompt", default="", help="prompt the unconditional passes use instead of the empty one")
    add("--batch-size", type=int, default=4, help="samples per sampler call")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="MMDiT dtype")
    add("--resolution", default="", help="resolution name (64px, 256px, 480p, ...); default: the model's")
    add("--aspect-ratio", default="", help="height:width (9:16) or height/width (0.56); with --resolution")
    add("--num-frames", type=int, default=0, help="frames (1 or 4k+1); default: the model's")
    add("--fps", type=float, default=0.0, help="frames per second of the mp4; default: the model's")
    add("--cond-type", default="t2v", choices=CONDITION_TYPES, help="visual condition")
    add("--ref", default="", help="reference image or video for i2v / v2v condition types")
    add("--t2i2v", action="store_true", help="first a still from the same model, then i2v_head from it")
    add("--offload", action="store_true", help="keep models not in use on the CPU")
    add("--model", default="models:/opensora-t2v@champion", help="models:/NAME@ALIAS, a run id or a folder")
    add("--lora", default="", help="a LoRA adapter folder (or a final/ with adapter/) merged into --model")
    add("--lora-scale", type=float, default=1.0, help="strength of --lora (0 = the base alone)")
    add("--merge", default="", help="write the model (with --lora merged) as a bundle folder here")
    add("--vae", default="models/vae/final", help="VAE folder, for a diffusion final/ --model")
    add("--latent-stats", default="models/vae/latent_stats.json", help="latent stats, for a final/ --model")
    add("--device", default="", help="cpu, cuda, cuda:1 (default: cuda if available)")
    add("--save-dir", default="samples", help="output folder")
    add("--nproc", type=int, default=0, help="processes (GPUs) to spread the outputs over, via torchrun")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_sample_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv)
    if args.nproc > 1 and "RANK" not in os.environ:
        rest = _without_nproc(argv)
        return run_cli(parser, argv, lambda a, cfg: _relaunched(rest, a.nproc, cfg))
    return run_cli(parser, argv, sample_videos)


def _relaunched(argv: list[str], nproc: int, cfg: Config) -> str:
    code = relaunch(argv, nproc, cfg)
    if code != 0:
        raise _ExitCode(code)
    return f"{nproc} processes done"


class _ExitCode(StageError):
    """The torchrun job's own exit code, passed on."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the torchrun job failed with exit code {code}")
        self.exit_code = code


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
