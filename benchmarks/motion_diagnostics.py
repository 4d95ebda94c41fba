"""Where held-out motion adherence is lost: the VAE round trip or the diffusion model.

Two measurements on the outputs of ``make run`` (nothing is written outside ``--out``):

1. **VAE round trip.** Every MovingShapes clip of ``data/raw`` is encoded and decoded by the
   trained VAE (``models/vae/final``); the adherence measurer (``measure_clip``) reads colour and
   motion from the original and from the reconstruction. Agreement near 1 means the latents
   carry the motion and the decoder shows it.
2. **Training captions.** The last diffusion stage samples the exact captions of ``--prompts``
   training clips (seeds from ``evaluate.seed`` as the evaluate stage draws them) and the
   measurer scores them against the clips' labels. Set beside the held-out figures of
   metrics/eval.json, it separates fitting from composing: a model that reproduces what it saw
   but not new combinations of the same words is limited by composition, not by the sampler.

    .venv/bin/python benchmarks/motion_diagnostics.py              # after `make run`

About a minute on one core for the 150 default clips and 48 prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora_core.config import EvaluateConfig, load_config
from opensora_core.evaluation.adherence import AdherencePrompt, measure_clip, score_adherence
from opensora_core.evaluation.reconstruction import iter_clips, reconstruct, to_uint8

ATTRS = ("color", "motion")


def vae_round_trip(raw_dir: Path, vae_dir: Path) -> dict[str, float]:
    """Share of clips whose measured colour / motion survive encode + decode; and the clip count."""
    from opensora_core.inference import load_vae_dir

    labels = pd.read_parquet(raw_dir / "labels.parquet")
    by_path = {row["path"]: row for row in labels.to_dict("records")}
    vae = load_vae_dir(vae_dir).eval()
    same = {a: 0 for a in ATTRS}
    truth = {a: 0 for a in ATTRS}
    n = 0
    # label paths are relative to the repository that holds data/raw
    for path, x in iter_clips(
        by_path.values(), vae.spatial_factor, vae.temporal_factor, root=raw_dir.parent.parent
    ):
        before = measure_clip(to_uint8(x[0]))  # x: (1, 3, T, H, W) in [-1, 1]
        after = measure_clip(to_uint8(reconstruct(vae, x)[0]))
        for attr in ATTRS:
            same[attr] += getattr(before, attr) == getattr(after, attr)
            truth[attr] += getattr(after, attr) == by_path[path][attr]
        n += 1
    out = {f"roundtrip_same_{a}": same[a] / n for a in ATTRS}
    out.update({f"roundtrip_label_{a}": truth[a] / n for a in ATTRS})
    out["roundtrip_clips"] = n
    return out


def training_captions(
    raw_dir: Path, model_dir: Path, vae_dir: Path, stats: Path, prompts: int, evaluate: EvaluateConfig
) -> dict[str, float]:
    """Adherence of samples of the exact captions of the first ``prompts`` training clips,
    sampled as the evaluate stage samples (its steps, guidance, seeds and batches)."""
    from opensora_core.inference import T2VPipeline
    from opensora_core.jobs.evaluate import generate_samples

    labels = pd.read_parquet(raw_dir / "labels.parquet")
    rows = labels[(labels["kind"] == "clip") & (labels["split"] == "train")].head(prompts)
    asked = [AdherencePrompt(r.text, r.shape, r.color, r.motion, r.background) for r in rows.itertuples()]
    pipeline = T2VPipeline.from_training(model_dir, vae_dir, stats, device="cpu")
    texts = [p.text for p in asked]
    videos = generate_samples(pipeline, texts, [evaluate.seed + i for i in range(len(texts))], evaluate)
    scores = score_adherence(asked, [measure_clip(v) for v in videos])
    out = {f"train_captions_{a}": scores[f"adherence_{a}"] for a in ATTRS}
    out["train_captions_prompts"] = len(texts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--raw", type=Path, default=Path("data/raw"), help="MovingShapes folder (labels.parquet)"
    )
    parser.add_argument("--vae", type=Path, default=Path("models/vae/final"))
    parser.add_argument("--latent-stats", type=Path, default=Path("models/vae/latent_stats.json"))
    parser.add_argument("--model", type=Path, default=None, help="diffusion final/ (default: the last stage)")
    parser.add_argument("--prompts", type=int, default=48, help="training captions to sample")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/_work/motion_diagnostics.json"))
    args = parser.parse_args()
    if not (args.raw / "labels.parquet").is_file():
        sys.exit(f"{args.raw / 'labels.parquet'} not found: run `make run` first")
    config = load_config("params.yaml")  # with its profile
    model = args.model
    if model is None:
        model = Path("models/diffusion") / list(config.diffusion.stages)[-1] / "final"
    # every input checked before a minute of work
    for path in (args.vae, args.latent_stats, model / "mmdit_config.json"):
        if not path.exists():
            sys.exit(f"{path} not found: run `make run` first, or pass --vae / --latent-stats / --model")
    start = time.perf_counter()
    result: dict[str, object] = vae_round_trip(args.raw, args.vae)
    result.update(
        training_captions(args.raw, model, args.vae, args.latent_stats, args.prompts, config.evaluate)
    )
    result["model"] = str(model)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    held_out = Path("metrics/eval.json")
    if held_out.is_file():
        metrics = json.loads(held_out.read_text())
        print(
            "held-out (metrics/eval.json): "
            + ", ".join(f"{a} {metrics[f'adherence_{a}']:.3f}" for a in ATTRS)
        )


if __name__ == "__main__":
    main()
