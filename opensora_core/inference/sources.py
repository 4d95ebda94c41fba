"""Where a ``--model`` comes from, resolved before anything is loaded: a registry URI, an MLflow run
id, or a folder (a bundle or a diffusion stage's ``final/``); and downloading a registered bundle."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensora_core.errors import InputError
from opensora_core.models.final import registry_cache_dir

BUNDLE_FORMAT = "opensora-t2v-bundle/1"
BUNDLE_FILE = "bundle.json"
DEFAULT_MODEL = "models:/opensora-t2v@champion"
_RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--model``: ``kind`` is ``registry``, ``run``, ``bundle`` or ``training``."""

    kind: str
    ref: str
    """The models:/ URI, the run id or the folder."""
    model_uri: str = ""
    """registry and run: the URI MLflow downloads the pyfunc model from."""


def resolve_model(spec: str, tracking_uri: str | None = None) -> ModelSource:
    """Say where ``spec`` points without loading anything; InputError (exit 2) naming it if nowhere."""
    spec = spec.strip()
    if not spec:
        raise InputError("no model given (use models:/NAME@ALIAS, a run id or a folder)")
    if spec.startswith("models:/"):
        return ModelSource("registry", spec, _check_registry_uri(spec, tracking_uri))
    path = Path(spec)
    if path.is_dir():
        if (path / BUNDLE_FILE).is_file():
            return ModelSource("bundle", str(path))
        if (path / "mmdit_config.json").is_file():
            return ModelSource("training", str(path))
        raise InputError(f"model folder {path} holds neither {BUNDLE_FILE} nor mmdit_config.json")
    if _RUN_ID_RE.match(spec):
        return ModelSource("run", spec, _model_uri_of_run(spec, tracking_uri))
    raise InputError(f"model {spec!r} is not a models:/ URI, an MLflow run id or an existing folder")


def _client(tracking_uri: str | None) -> Any:
    """A client on ``tracking_uri`` for both runs and the registry; the global URIs follow it, so
    a later ``mlflow.pyfunc.load_model("models:/...")`` reads the same store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=tracking_uri or mlflow.get_registry_uri())


def _check_registry_uri(uri: str, tracking_uri: str | None) -> str:
    """The URI itself, once the name and alias (or version) are known to the registry."""
    body = uri[len("models:/") :]
    name, sep, alias = body.partition("@")
    version = ""
    if not sep:
        name, _, version = body.partition("/")
    if not name or not (alias or version):
        raise InputError(f"model URI {uri!r} must be models:/NAME@ALIAS or models:/NAME/VERSION")
    client = _client(tracking_uri)
    try:
        client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as exc:  # MlflowException: unknown name, alias or version
        raise InputError(f"model {uri!r} does not resolve in the MLflow registry: {exc}") from exc
    return uri


def _model_uri_of_run(run_id: str, tracking_uri: str | None) -> str:
    """``models:/<model id>`` of the pyfunc model run ``run_id`` logged."""
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise InputError(f"run {run_id} not found in the MLflow store: {exc}") from exc
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    if not models:
        raise InputError(f"run {run_id} logged no model (the register stage's run does)")
    return f"models:/{models[0].model_id}"


def download_bundle(model_uri: str, dest: str | Path | None = None) -> Path:
    """Download a logged pyfunc model and return the bundle folder inside it."""
    import mlflow

    root = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest) if dest else None)
    )
    found = sorted(root.rglob(BUNDLE_FILE))
    if not found:
        raise InputError(f"{model_uri}: the downloaded model has no {BUNDLE_FILE}")
    return found[0].parent


def fetch_registered_bundle(
    uri: str, cache_root: str | Path, tracking_uri: str | None = None
) -> tuple[Path, dict]:
    """The bundle of ``models:/NAME@ALIAS`` (or ``/VERSION``), downloaded into
    :func:`registry_cache_dir` unless that folder already holds the version the URI names now;
    returns (the bundle folder, its source: ``uri``, ``model_name``, ``version``, ``run_id``).

    InputError (exit 2) when the URI does not resolve in the registry at ``tracking_uri``.
    """
    import json
    import shutil

    _check_registry_uri(uri, tracking_uri)
    client = _client(tracking_uri)
    name, _, alias = uri[len("models:/") :].partition("@")
    if alias:
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    source = {"uri": uri, "model_name": name, "version": str(version.version), "run_id": version.run_id}
    dest = registry_cache_dir(cache_root, uri)
    known = dest / "source.json"
    fresh = known.is_file() and (dest / "bundle" / BUNDLE_FILE).is_file()
    if fresh and {k: json.loads(known.read_text()).get(k) for k in source} == source:
        return dest / "bundle", source
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    bundle = download_bundle(f"models:/{name}/{version.version}", tmp / "download")
    shutil.move(str(bundle), str(tmp / "bundle"))
    shutil.rmtree(tmp / "download", ignore_errors=True)
    (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return dest / "bundle", source
