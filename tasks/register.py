"""Stage ``register``: log the evaluated model as an MLflow pyfunc, register it, move the aliases.

1. builds the inference bundle (VAE with its latent statistics, MMDiT EMA weights, text-encoder
   reference, resolved config) from the evaluated stage's ``final/`` folder;
2. logs the pyfunc model in this stage's MLflow run and registers it as ``register.model_name``,
   tagged with the git commit, the params hash, the data manifest hash and the eval metrics;
3. sets the alias ``candidate`` and moves ``champion`` when the promotion rule says so
   (:mod:`opensora_core.registry`);
4. writes ``models/registry.json``: model name, version, aliases, run id, gate result.

A LoRA fine-tune (``final/adapter/`` present) is registered as the adapter plus a reference to
its base: tags ``lora``, ``lora.rank``, ``base.sha256`` and, for a registered base,
``base.model_name`` / ``base.version``, whose bundle then holds the adapter instead of the MMDiT
weights (loading it fetches the base; :mod:`opensora_core.inference.adapters`). A base that is
only a file keeps the merged weights in the bundle.

Data without ground truth (a folder or CSV source) has null ``adherence_*`` in
``metrics/eval.json``: the champion comparison then uses ``register.fallback_metric`` (``fvd_vae``,
lower is better by ``register.lower_is_better``), and a gate bound on a metric that evaluate left
null is a configuration error (exit 2) naming the key, before anything is registered.

With ``register.fail_on_gate`` a failed gate ends the stage with exit code 3, after the version
is registered and ``models/registry.json`` written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config, config_hash
from opensora_core.errors import ConfigError, GateFailed, InputError
from opensora_core.tracking import git_commit, start_stage_run, tracking_uri
from tasks.evaluate import model_dir_of


def data_manifest_hash(manifest_path: Path) -> str:
    """The shard manifest's ``content_hash`` (empty when there is no manifest)."""
    if not manifest_path.is_file():
        return ""
    return str(json.loads(manifest_path.read_text()).get("content_hash", ""))


def base_tags(adapter_meta: dict[str, Any]) -> dict[str, str]:
    """The registry tags of a LoRA fine-tune: what it adapts (``base.model_name``, ``base.version``
    when the base is registered, ``base.sha256`` of its weights) and its rank."""
    base = adapter_meta.get("base", {})
    tags = {"lora": "true", "lora.rank": str(adapter_meta.get("rank", ""))}
    tags |= {f"base.{k}": str(base[k]) for k in ("model_name", "version", "sha256", "uri") if base.get(k)}
    return tags


def check_gate_metrics(metrics: dict[str, Any], gate: dict[str, float], gate_max: dict[str, float]) -> None:
    """ConfigError naming ``register.gate.<metric>`` (or ``gate_max``) for a bound on a metric that
    ``metrics/eval.json`` holds as null: evaluate did not measure it (adherence without labels)."""
    for key, bounds in (("gate", gate), ("gate_max", gate_max)):
        for name in bounds:
            if name in metrics and metrics[name] is None:
                raise ConfigError(
                    f"register.{key}.{name}: metrics/eval.json has no value for {name} (the evaluated "
                    "data has no ground-truth labels, so evaluate did not measure it); gate on a "
                    "label-free metric instead (val_loss, vae_psnr, vae_ssim, fvd_vae)"
                )


def register(
    cfg: Config,
    model_dir: Path,
    vae_dir: Path,
    latent_stats: Path,
    eval_path: Path,
    manifest_path: Path,
    out_path: Path,
    *,
    root: Path = Path("."),
) -> dict[str, Any]:
    """Log, register and promote the model of ``model_dir``; writes and returns the registry record."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from opensora_core.inference import T2VPipeline
    from opensora_core.registry import aliases_of, apply_promotion, log_pyfunc_model, metric_tags

    if not eval_path.is_file():
        raise InputError(f"eval metrics not found: {eval_path} (run the evaluate stage first)")
    metrics = json.loads(eval_path.read_text())
    rcfg = cfg.register
    check_gate_metrics(metrics, rcfg.gate, rcfg.gate_max)
    tags = {
        "git_commit": git_commit(root) or "",
        "params_hash": config_hash(cfg, exclude=("tracking", "flow")),
        "data_manifest_hash": data_manifest_hash(manifest_path),
        "model_dir": str(model_dir),
        **metric_tags(metrics),
    }
    cfg_tracking = cfg.tracking if cfg.tracking.enabled else None
    if cfg_tracking is None:
        raise InputError("the register stage needs MLflow: set tracking.enabled=true")

    adapter = model_dir / "adapter" if (model_dir / "adapter" / "adapter.json").is_file() else None
    if adapter is not None:
        tags |= base_tags(json.loads((adapter / "adapter.json").read_text()))
    pipeline = T2VPipeline.from_training(model_dir, vae_dir, latent_stats, device="cpu", fps=cfg.evaluate.fps)
    params = {"register": vars(rcfg), "model": str(model_dir)}
    # log_model and register_model use MLflow's global URIs: point them at the configured store.
    mlflow.set_tracking_uri(tracking_uri(cfg.tracking))
    mlflow.set_registry_uri(tracking_uri(cfg.tracking))
    with start_stage_run("register", cfg.tracking, params=params, tags=tags, root=root) as run:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        with tempfile.TemporaryDirectory(prefix="opensora-bundle-") as tmp:
            bundle = pipeline.save_bundle(
                Path(tmp) / "bundle", adapter=adapter if tags.get("base.model_name") else None
            )
            with mlflow.start_run(run_id=run.run_id):
                info = log_pyfunc_model(bundle, metadata_={k: tags[k] for k in ("git_commit", "params_hash")})
        client = MlflowClient(tracking_uri(cfg.tracking))
        version = mlflow.register_model(info.model_uri, rcfg.model_name, tags=tags)
        decision = apply_promotion(
            client,
            rcfg.model_name,
            version.version,
            metrics,
            rcfg.gate,
            rcfg.compare_metric,
            rcfg.gate_max,
            fallback_metric=rcfg.fallback_metric,
            lower_is_better=rcfg.lower_is_better,
        )
        record = {
            "model_name": rcfg.model_name,
            "version": str(version.version),
            "aliases": aliases_of(client, rcfg.model_name, version.version),
            "run_id": run.run_id,
            "model_uri": f"models:/{rcfg.model_name}/{version.version}",
            "logged_model_uri": info.model_uri,
            "promoted": decision.promote,
            "gate": {
                "passed": decision.gate_passed,
                "failures": decision.gate_failures,
                "min": dict(rcfg.gate),
                "max": dict(rcfg.gate_max),
            },
            "compare_metric": decision.compare_metric,
            "compare_metric_configured": rcfg.compare_metric,
            "candidate_value": decision.candidate_value,
            "champion_version_before": decision.champion_version,
            "champion_value_before": decision.champion_value,
            "reason": decision.reason,
            "tags": {k: v for k, v in tags.items() if not k.startswith("metric.")},
        }
        run.log_dict(record, "registry.json")
        run.set_tags({"registered_version": record["version"], "promoted": str(decision.promote).lower()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    if rcfg.fail_on_gate and not decision.gate_passed:
        raise GateFailed(f"{rcfg.model_name} v{record['version']}: {decision.reason}")
    return record


def stage(args: argparse.Namespace, cfg: Config) -> str:
    model_dir = model_dir_of(args, cfg)
    record = register(
        cfg,
        model_dir,
        Path(args.vae),
        Path(args.latent_stats),
        Path(args.eval),
        Path(args.manifest),
        Path(args.output),
    )
    aliases = ", ".join(f"@{a}" for a in record["aliases"])
    return f"{record['model_name']} v{record['version']} [{aliases}]: {record['reason']}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "Register the evaluated model in MLflow as a pyfunc and promote it to @champion when it earns it.",
        prog="register",
    )
    parser.add_argument(
        "--stage", default="", help="diffusion stage to register (default: the evaluated one)"
    )
    parser.add_argument("--model", default="", help="a diffusion final/ folder (overrides --stage)")
    parser.add_argument("--vae", default="models/vae/final", help="the VAE's final/ folder")
    parser.add_argument("--latent-stats", default="models/vae/latent_stats.json")
    parser.add_argument("--eval", default="metrics/eval.json", help="the evaluate stage's metrics")
    parser.add_argument("--manifest", default="data/shards/manifest.json", help="shard manifest (data hash)")
    parser.add_argument("--output", default="models/registry.json")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
