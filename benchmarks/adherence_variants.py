"""Which text conditioning lets the tiny MMDiT follow held-out prompts: variants side by side.

Each variant retrains the three diffusion stages exactly as the pipeline does (the stage CLIs,
params.yaml plus the variant's ``--set`` overrides, one process, one thread) on the VAE, latent
statistics and shards already built by ``make run``, into ``benchmarks/_work/adherence/``; then the
evaluate stage scores the final stage on ``--prompts`` prompts of the held-out (``val``)
combinations and, as a control, of combinations seen in training (``train``). Nothing under
``models/``, ``metrics/`` or MLflow changes.

    .venv/bin/python benchmarks/adherence_variants.py                          # after `make run`
    .venv/bin/python benchmarks/adherence_variants.py --variants default,sentence --seeds 42,7

About 6 minutes per variant and seed on one core. Variants (:data:`VARIANTS`): ``default`` is
params.yaml; ``last_layer`` takes MiniLM's last-layer states as the text tokens; ``sentence`` also
gives the model the pooled sentence vector (with the sqrt(0.1) dropouts of the GPU profile);
``sentence_embed`` gives the sentence vector with the embedding-layer tokens. The training knobs
around the default: ``weight_decay`` (AdamW 0.05), ``ema_998`` (EMA decay 0.998),
``stage3_text_only`` (no image-to-video samples in stage 3), ``logit_mean_05`` / ``logit_mean_1``
(training times drawn nearer the noise), ``stage2_double`` (2800 stage-2 steps, twice the default);
``small`` trains the 9.2M-parameter MMDiT size instead of tiny, ``small_half_steps`` with half the
stage-2 and stage-3 steps.
``--splits val`` skips the seen-combination control (half the evaluation time).
Prints one line per run and, with ``--write``, a Markdown table for benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SENTENCE = [
    "diffusion.text_encoder.use_pooled=true",
    "diffusion.text_encoder.token_dropout=0.31622777",
    "diffusion.text_encoder.pooled_dropout=0.31622777",
]
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "last_layer": ["diffusion.text_encoder.token_layer=-1"],
    "sentence": ["diffusion.text_encoder.token_layer=-1", *SENTENCE],
    "sentence_embed": SENTENCE,
    # training knobs around the default (the motion section of benchmarks/BENCHMARKS.md)
    "weight_decay": ["diffusion.weight_decay=0.05"],
    "ema_998": ["diffusion.ema_decay=0.998"],
    "stage3_text_only": [
        f"diffusion.stages.stage3.conditions.weights.{c}=0" for c in ("i2v_head", "i2v_tail", "i2v_loop")
    ],
    "logit_mean_05": ["diffusion.flow.logit_mean=0.5"],
    "logit_mean_1": ["diffusion.flow.logit_mean=1.0"],
    "stage2_double": ["diffusion.stages.stage2.steps=2800"],
    # model capacity: the `small` MMDiT (twice tiny's width), with the default steps and with half
    "small": ["diffusion.model=small"],
    "small_half_steps": [
        "diffusion.model=small",
        "diffusion.stages.stage2.steps=700",
        "diffusion.stages.stage3.steps=250",
    ],
}
ATTRS = ("color", "motion", "shape")
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str], log: Path) -> float:
    """Run a stage CLI with its output in ``log``; its wall seconds. Exits on failure."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ | ENV).returncode
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return time.perf_counter() - start


def run_variant(
    name: str,
    seed: int,
    prompts: int,
    root: Path,
    stages: list[str],
    splits: tuple[str, ...] = ("val", "train"),
) -> dict[str, object]:
    """Train the stages and evaluate both splits; the figures of one run."""
    out = root / f"{name}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    sets = [*VARIANTS[name], f"diffusion.seed={seed}", "tracking.enabled=false"]
    flags = [arg for item in sets for arg in ("--set", item)]
    train_s = 0.0
    for stage in stages:
        train_s += run(
            [sys.executable, "-m", "tasks.diffusion_train", "--stage", stage, *flags, "--quiet",
             "--models-dir", str(out / "models"), "--metrics-dir", str(out / "metrics")],
            out / f"{stage}.log",
        )  # fmt: skip
    result: dict[str, object] = {"name": name, "seed": seed, "train_s": train_s}
    for split in splits:
        run(
            [sys.executable, "-m", "tasks.evaluate", "--model", str(out / "models" / stages[-1] / "final"),
             *flags, "--set", f"evaluate.num_prompts={prompts}", "--set", f"evaluate.adherence_split={split}",
             "--metrics", str(out / f"eval_{split}.json"), "--report-dir", str(out / f"report_{split}")],
            out / f"evaluate_{split}.log",
        )  # fmt: skip
        metrics = json.loads((out / f"eval_{split}.json").read_text())
        result[split] = {a: metrics[f"adherence_{a}"] for a in ATTRS}
        result["val_loss"] = metrics["val_loss"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="42", help="diffusion.seed values, comma-separated")
    parser.add_argument(
        "--prompts", type=int, default=48, help="samples per split (8 per held-out combination)"
    )
    parser.add_argument(
        "--splits", default="val,train", help="adherence splits to evaluate: val (held out), train (seen)"
    )
    parser.add_argument("--out", default="benchmarks/_work/adherence")
    parser.add_argument("--write", action="store_true", help="print a Markdown table at the end")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:  # a typo fails before an hour of training
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    splits = tuple(args.splits.split(","))
    if not splits or set(splits) - {"val", "train"}:
        sys.exit(f"--splits takes val and/or train, got {args.splits!r}")
    import yaml

    stages = list(yaml.safe_load(Path("params.yaml").read_text())["diffusion"]["stages"])
    rows = []
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_variant(name, seed, args.prompts, Path(args.out), stages, splits)
            print(
                f"{name} seed {seed}: held-out {r.get('val', '-')}, seen {r.get('train', '-')}, "
                f"val_loss {r['val_loss']:.3f}, training {r['train_s']:.0f} s",
                flush=True,
            )
            rows.append(r)
    if args.write:
        print(f"\n{platform.node()}, {args.prompts} prompts per split, seeds {args.seeds}\n")
        print(
            "| variant | seed | held-out colour / motion / shape | seen colour / motion / shape | val_loss |"
        )
        print("|---|---|---|---|---|")
        for r in rows:
            held, seen = (
                " / ".join(f"{r[split][a]:.2f}" for a in ATTRS) if split in r else "-"  # type: ignore[index]
                for split in ("val", "train")
            )
            print(f"| {r['name']} | {r['seed']} | {held} | {seen} | {r['val_loss']:.3f} |")


if __name__ == "__main__":
    main()
