"""The registry client: the MLflow model registry as the pipeline reads and writes it.

Registration (`tasks.register`), the champion lookup before evaluation (the flow's evaluate task),
`qlora predict` and the model server to come all go through these functions. Each takes the tracking
URI and client it works with, or the config to resolve them from once (`connect`), so a caller that
already holds them passes them on instead of resolving them again.
- reachability: any transport failure becomes TrackingServerUnreachable, which callers retry on;
- aliases: the version holding the champion alias (or any alias), and the registered model itself;
- a version's pyfunc model: the adapter, a reference to its base, and the code that loads it;
- the adapter to compare a new one against: the champion's (only when it was trained on the config's
  base) or a version named in the config, downloaded once and renamed into place;
- the adapter a training run starts from (`training.init_adapter`), resolved the same way;
- loading a registered version as a pyfunc model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import configs
import tasks
from configs.schema import MODEL_URI, ConfigError, PipelineConfig, RegistryConfig
from tasks.adapter import (
    ADAPTER_CONFIG,
    INIT_OPTION,
    AdapterFilesMissing,
    InitAdapter,
    adapter_content_hash,
    is_adapter_dir,
    read_adapter_config,
    same_base,
)
from tasks.tracking import (
    TrackingServerUnreachable,
    apply_http_settings,
    client_for,
    quiet_artifact_transfers,
    resolve_tracking_uri,
    using_tracking_uri,
)

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "adapter-model"
CHAMPION_DIRNAME = "champion"  # <output_dir>/champion/<name>-v<version>: downloaded versions
EXAMPLE_PROMPT = "Rewrite this in Zorbish.\n\nthe red cat runs"
PIP_PACKAGES = ("mlflow", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers",
                "pydantic", "pyyaml", "pandas")


class ModelNotLoadable(ConfigError):
    """A model URI that does not resolve to a loadable registered model (wrong name, version or alias)."""


# --------------------------------------------------------------------------------------------------
# Reaching the registry, and its aliases


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def check_reachable(client: Any, uri: str, adapter_dir: Path | None = None) -> None:
    """One cheap registry call; any transport failure becomes TrackingServerUnreachable (retryable)."""
    from mlflow.exceptions import MlflowException

    try:
        client.search_registered_models(max_results=1)
    except MlflowException as exc:
        if _error_code(exc) in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise
        kept = f"; the adapter at {adapter_dir} is kept" if adapter_dir else ""
        raise TrackingServerUnreachable(
            f"cannot reach the MLflow tracking server at {uri}: {str(exc).splitlines()[0][:300]}. Nothing was "
            f"registered{kept}. Start the server (make mlflow-ui) or fix registry.tracking_uri, then retry."
        ) from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise TrackingServerUnreachable(f"cannot reach the MLflow tracking server at {uri}: {exc}") from exc


def connect(config: PipelineConfig, uri: str | None = None, client: Any = None) -> tuple[str, Any]:
    """(tracking URI, MlflowClient) of the config's registry, checked reachable.

    A caller that already holds the URI and client (the pipeline run's) passes them and they are used
    as they are; otherwise the URI is resolved from the config here, once.
    """
    apply_http_settings(config)
    uri = uri or resolve_tracking_uri(config)
    client = client if client is not None else client_for(uri)
    check_reachable(client, uri)
    return uri, client


def current_champion(client: Any, registry: RegistryConfig) -> Any | None:
    """The model version holding the champion alias, or None (no registered model or no alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(registry.model_name, registry.champion_alias)
    except MlflowException as exc:
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version of `name` holding `alias`, or None when none does."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name, description="QLoRA adapters from qlora-pipeline. Aliases: `champion` serves, `challenger` is the "
                              "newest registered version. Each version's description is its model card.")
    except MlflowException as exc:  # created by a concurrent registration in between
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise


def await_ready(client: Any, name: str, version: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} did not become READY (status {status})")
        time.sleep(1)


# --------------------------------------------------------------------------------------------------
# A version's base model


def base_label(reference: dict[str, Any]) -> str:
    """One line naming a base reference: `<path>@sha256:<hash>` or `<hub id>@<revision>` (the `base_model` tag)."""
    if reference.get("kind") == "local":
        return f"{reference['path']}@sha256:{reference['sha256']}"
    return f"{reference.get('id')}@{reference.get('revision')}"


def recorded_base_fits(tags: dict[str, str], config: PipelineConfig) -> bool:
    """Was a registered version trained on the config's base? A local base by `tasks.adapter.same_base`
    with the recorded content hash (a copy elsewhere fits), a hub base by id at the recorded revision.
    A version that records no base fits: there is nothing to compare."""
    recorded = tags.get("base_model")
    if not recorded:
        return True
    try:
        reference = json.loads(tags.get("base_model_reference") or "{}")
    except ValueError:
        reference = {}
    if isinstance(reference, dict) and reference.get("kind") == "local" and reference.get("sha256"):
        return same_base(str(reference.get("path")), config.model.name_or_path,
                         recorded_sha256=str(reference["sha256"]))
    from tasks.modeling import base_model_reference

    return base_label(base_model_reference(config)) == recorded


# --------------------------------------------------------------------------------------------------
# Logging a version's model


def pip_requirements() -> list[str]:
    from importlib import metadata

    out = []
    for name in PIP_PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


MODEL_CODE = '''"""MLflow "model from code" entry point of a qlora-pipeline adapter version (written at registration).

The model itself is tasks.pyfunc_model.AdapterModel, shipped with this version in code/tasks.
"""
import mlflow

from tasks.pyfunc_model import AdapterModel

mlflow.models.set_model(AdapterModel())
'''


def model_code_paths() -> list[Path]:
    """The source folders shipped with the pyfunc model: the `tasks` and `configs` packages as imported,
    so a checkout ships its files and an installed worker its site-packages copy (the code that ran)."""
    return [Path(tasks.__file__).resolve().parent, Path(configs.__file__).resolve().parent]


def log_adapter_model(uri: str, run_id: str, adapter_dir: Path, reference: dict[str, Any],
                      config: PipelineConfig) -> Any:
    """Log the pyfunc model into the run: adapter + base reference as artifacts, this project's `tasks`
    and `configs` packages as code. Logged as a model from code (no pickle), so loading it runs only
    shipped source. Returns MLflow's ModelInfo."""
    import mlflow

    from tasks.pyfunc_model import ADAPTER_ARTIFACT, BASE_ARTIFACT, BASE_REFERENCE_FILE, signature

    with tempfile.TemporaryDirectory(prefix="qlora-register-") as tmp:
        reference_file = Path(tmp) / BASE_REFERENCE_FILE
        reference_file.write_text(json.dumps(reference, indent=2, sort_keys=True))
        model_code = Path(tmp) / "adapter_model.py"
        model_code.write_text(MODEL_CODE)
        example = [EXAMPLE_PROMPT] if config.registry.log_input_example else None
        with using_tracking_uri(uri), quiet_artifact_transfers(), mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(model_code),
                artifacts={ADAPTER_ARTIFACT: str(adapter_dir), BASE_ARTIFACT: str(reference_file)},
                code_paths=[str(path) for path in model_code_paths()],
                signature=signature(config.evaluation.max_new_tokens),
                input_example=example,
                pip_requirements=pip_requirements(),
                metadata={"base_model": base_label(reference), "pipeline": "qlora-pipeline"},
                # the load-time options of tasks.pyfunc_model; MLflow lets a loader override only
                # the keys declared here (load_model(uri, model_config={...}))
                model_config={"base_model_path": None, "load_in_4bit": None,
                              "max_new_tokens": config.evaluation.max_new_tokens, "batch_size": 16},
            )


# --------------------------------------------------------------------------------------------------
# Adapters of registered versions


def download_adapter(config: PipelineConfig, name: str, version: str, uri: str | None = None) -> Path:
    """A registered version's adapter folder, fetched once to `<output_dir>/champion/<name>-v<version>`.

    Downloaded into a staging folder and renamed into place, so an interrupted download never
    leaves a half folder that a later run would take for the adapter.
    """
    import mlflow

    uri = uri or resolve_tracking_uri(config)
    target = Path(config.training.output_dir) / CHAMPION_DIRNAME / f"{name}-v{version}"
    if is_adapter_dir(target):
        return target
    staging = target.with_name(f".{target.name}.download-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with using_tracking_uri(uri), quiet_artifact_transfers():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                             dst_path=str(staging)))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        from tasks.pyfunc_model import ADAPTER_ARTIFACT

        subpath = mlmodel["flavors"]["python_function"]["artifacts"][ADAPTER_ARTIFACT]["path"]
        shutil.rmtree(target, ignore_errors=True)
        (local / subpath).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_champion_adapter(config: PipelineConfig, uri: str | None = None, client: Any = None) -> Path | None:
    """The champion's adapter folder, downloaded once to `<output_dir>/champion/<name>-v<version>`.

    None when there is no champion, or when the champion was trained on a different base model than
    the config's (`recorded_base_fits`: it cannot be put on this base; the new version then cannot be
    promoted automatically: move the alias by hand after looking at the numbers).
    """
    registry = config.registry
    uri, client = connect(config, uri, client)
    champion = current_champion(client, registry)
    if champion is None:
        return None
    if not recorded_base_fits(champion.tags, config):
        logger.warning("champion %s v%s was trained on %s, the config's base is %s: not comparing",
                       registry.model_name, champion.version, champion.tags.get("base_model"),
                       config.model.name_or_path)
        return None
    return download_adapter(config, registry.model_name, str(champion.version), uri=uri)


def champion_adapter_for(config: PipelineConfig, uri: str | None = None, client: Any = None) -> Path | None:
    """What the new adapter is compared against: `evaluation.champion_adapter` when set (a folder, or a
    `models:/<name>/<version>` / `models:/<name>@<alias>` URI, downloaded), else the registry's champion."""
    source = config.evaluation.champion_adapter
    if not source:
        return resolve_champion_adapter(config, uri, client)
    return resolve_adapter_source(config, source, "evaluation.champion_adapter", uri, client)[0]


def resolve_adapter_source(config: PipelineConfig, source: str, key: str, uri: str | None = None,
                           client: Any = None) -> tuple[Path, Any]:
    """(local adapter folder, registry version or None) of an adapter named by config key `key`: a peft
    adapter folder as it is, or a `models:/<name>/<version>` / `models:/<name>@<alias>` URI resolved in
    the config's registry and downloaded once (`download_adapter`)."""
    if not source.startswith("models:/"):
        path = Path(source)
        if not is_adapter_dir(path):
            raise AdapterFilesMissing(f"{key}={source}: no {ADAPTER_CONFIG} there; point it at a peft adapter "
                                      "folder or a models:/<name>/<version> URI")
        return path, None
    match = MODEL_URI.fullmatch(source)
    if not match:
        raise ConfigError(f"{key}={source}: expected models:/<name>/<version> or models:/<name>@<alias>")
    name, version, alias = match.groups()
    uri, client = connect(config, uri, client)
    if alias:
        version = alias_version(client, name, alias)
        if version is None:
            raise ConfigError(f"{key}={source}: no version of {name} holds alias '{alias}' in {uri}")
    from mlflow.exceptions import MlflowException

    try:
        entity = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ConfigError(f"{key}={source}: {name} has no version {version} in {uri}") from exc
    return download_adapter(config, name, version, uri=uri), entity


def resolve_init_adapter(config: PipelineConfig) -> InitAdapter | None:
    """`training.init_adapter` resolved to a local folder with its content hash and recorded base, or None.

    The base is judged by the one rule: a folder's `adapter_config.json` base by `same_base`, a
    registered version's recorded base reference by `recorded_base_fits` (its content hash).
    """
    source = config.training.init_adapter
    if not source:
        return None
    path, version = resolve_adapter_source(config, source, INIT_OPTION)
    if version is not None:
        base, fits = version.tags.get("base_model", ""), recorded_base_fits(version.tags, config)
    else:
        base = str(read_adapter_config(path, INIT_OPTION).get("base_model_name_or_path") or "")
        fits = not base or same_base(base, config.model.name_or_path)
    return InitAdapter(source=source, path=path.resolve(), version=None if version is None else str(version.version),
                       adapter_sha256=adapter_content_hash(path), base=base, same_base=fits)


def load_registered_model(config: PipelineConfig, model_uri: str | None = None,
                          base_model_path: str | Path | None = None, uri: str | None = None) -> Any:
    """The pyfunc model at `model_uri` (default `models:/<model_name>@<champion_alias>`) from the config's
    tracking server; `base_model_path` points a version at a local base that moved (hash still checked)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    registry = config.registry
    model_uri = model_uri or f"models:/{registry.model_name}@{registry.champion_alias}"
    options = {"base_model_path": str(Path(base_model_path).resolve())} if base_model_path else None
    apply_http_settings(config)
    try:
        with using_tracking_uri(uri or resolve_tracking_uri(config)), quiet_artifact_transfers():
            return mlflow.pyfunc.load_model(model_uri, model_config=options)
    except MlflowException as exc:
        raise ModelNotLoadable(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from exc
