"""MLflow tracking: one run per pipeline run, and every stage logs into it.

`start_pipeline_run` creates the run (resolved config as params, library versions as params and tags)
and returns its id; each later stage logs into that same run through an `MlflowClient`, so no stage
can open a second run by accident and nothing relies on MLflow's process-global active run.

Where the data goes: `registry.tracking_uri`, else MLFLOW_TRACKING_URI, else by default a sqlite store
in the project dir's `mlflow/` folder (`mlflow/mlflow.db`, artifacts in `mlflow/artifacts`; the project
dir is $QLORA_PIPELINE_DIR or the working directory, see configs/paths.py, so `make demo` from the repo
root writes the git-ignored `mlflow/` that `make mlflow-ui` serves, and an installed package never
writes into site-packages). For any local sqlite store the experiment's artifacts are kept beside the
database file, in `artifacts/`, never in a stray `./mlruns` of the working directory.

Each run records the process that owns it (tags `host`, `pid`, `pid_namespace`, `process_started`,
and `prefect_flow_run_id` in a flow run). A process killed hard (`kill -9`, OOM killer, power loss of a
container) cannot end its run, so the next pipeline run of the experiment marks such orphans KILLED:
RUNNING runs whose process provably no longer exists (same host and PID namespace, PID gone or reused).
Runs of other machines, whose liveness cannot be checked from here, are left alone.

System metrics (CPU, memory, disk, network, and GPU when `pynvml` is installed) are sampled during
training by MLflow's own `SystemMetricsMonitor` in a background thread every 10 s (psutil; cheap).
They are on unless `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` is set to false; the sampling interval
follows `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from configs.paths import project_dir
from configs.schema import PipelineConfig

logger = logging.getLogger(__name__)

STORE_DIR_NAME = "mlflow"  # under the project dir; mlflow/server.sh serves the same folder
DB_FILE_NAME = "mlflow.db"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "mlflow",
                     "prefect", "great-expectations", "sacrebleu", "rouge-score")

# run id -> tracking URI, filled by start_pipeline_run; lets the stage loggers (called with a run id
# only) reach the right store in this process. Pass tracking_uri= explicitly from elsewhere.
_RUN_URIS: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------
# Where the store is


def default_db() -> Path:
    """The default store's database: `<project dir>/mlflow/mlflow.db` (resolved at call time, so it
    follows the working directory or $QLORA_PIPELINE_DIR, never the package's own location)."""
    return project_dir() / STORE_DIR_NAME / DB_FILE_NAME


def default_tracking_uri() -> str:
    """The default local sqlite store's URI, its artifacts folder beside it created."""
    db = default_db()
    (db.parent / "artifacts").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def resolve_tracking_uri(config: PipelineConfig) -> str:
    """The configured tracking URI, else MLFLOW_TRACKING_URI (how the docker worker is pointed at its
    server), else the default sqlite store `<project dir>/mlflow/mlflow.db` (its folders created)."""
    uri = config.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


class TrackingServerUnreachable(ConnectionError):
    """The MLflow tracking/registry server could not be reached; nothing was registered (retryable)."""


def check_tracking_server(uri: str, attempts: int = 3, timeout_s: float = 5.0) -> None:
    """For an http(s) store, GET its /health (served without auth) a few times, seconds apart.

    A server that is down is then reported in seconds with the fix, instead of after MLflow's own
    retries (about four and a half minutes of backoff) and a stack trace. Local stores pass.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    for attempt in range(attempts):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
            return
        except requests.RequestException as exc:
            if attempt == attempts - 1:
                raise TrackingServerUnreachable(
                    f"cannot reach the MLflow tracking server at {uri} ({type(exc).__name__}). Start it "
                    "(make mlflow-ui, or the docker compose stack) or fix registry.tracking_uri / "
                    "MLFLOW_TRACKING_URI; nothing was run or registered."
                ) from exc
            time.sleep(2 ** attempt)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI; None for anything else (or in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///")
    if not path or path == ":memory:":
        return None
    return Path("/" + path.lstrip("/")) if uri.startswith("sqlite:////") else Path(path).resolve()


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside its database; a server decides for itself."""
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = db.parent / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve().as_uri()


def apply_http_settings(config: PipelineConfig) -> None:
    """How long MLflow's HTTP client retries and waits (process-wide, read by MLflow per request).

    Unset config values leave MLflow's defaults (or the caller's MLFLOW_HTTP_REQUEST_* variables).
    """
    registry = config.registry
    if registry.request_max_retries is not None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(registry.request_max_retries)
    if registry.request_timeout_s is not None:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(registry.request_timeout_s)


def client_for(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent APIs (log_model, pyfunc.load_model) read process-global URIs: set them, then restore."""
    import mlflow

    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet_artifact_transfers() -> Iterator[None]:
    """No per-file progress bars in logs (Prefect, CLI) while we copy artifacts, unless the caller set
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def uri_for_run(run_id: str, tracking_uri: str | None = None) -> str:
    """The store a run lives in: the explicit URI, else the one start_pipeline_run used in this process,
    else MLflow's configured URI (MLFLOW_TRACKING_URI), else the pipeline's default store
    (`<project dir>/mlflow/mlflow.db`, the one resolve_tracking_uri uses; not MLflow's own default)."""
    if tracking_uri:
        return tracking_uri
    if run_id in _RUN_URIS:
        return _RUN_URIS[run_id]
    import mlflow

    if mlflow.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    return default_tracking_uri()


# --------------------------------------------------------------------------------------------------
# The pipeline run


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The experiment's id, creating it (artifacts beside a local sqlite store) when missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException as exc:  # another process created it in between
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise exc from None
        return experiment.experiment_id


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def process_tags() -> dict[str, str]:
    """Who owns a run: enough for a later run on this machine to tell whether the owner is still alive."""
    from tasks.run_lock import this_process

    me = this_process()
    tags = {"host": me.host, "pid": str(me.pid), "pid_namespace": me.pid_namespace,
            "process_started": repr(me.started)}
    if me.flow_run_id:
        tags["prefect_flow_run_id"] = me.flow_run_id
    return tags


def mark_orphans_killed(client: Any, experiment_id: str, found_by: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose owning process is provably gone; return their ids.

    Only runs that recorded their process (`process_tags`) on this host are candidates, and only those
    whose process `tasks.run_lock.process_is_gone` confirms dead are touched: a live run, or one of
    another machine or PID namespace, is never changed.
    """
    from tasks.run_lock import process_is_gone, this_process

    host = this_process().host.replace("'", "")
    candidates = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                  f"tags.host = '{host}'", max_results=1000)
    killed = []
    for run in candidates:
        tags = run.data.tags
        try:
            pid = int(tags["pid"])
            started = float(tags["process_started"]) if tags.get("process_started") else None
        except (KeyError, ValueError):
            continue
        if run.info.run_id == found_by or not process_is_gone(pid, tags["host"], tags.get("pid_namespace", ""),
                                                              started):
            continue
        reason = f"process {pid} on {tags['host']} ended without finishing the run (killed hard)"
        _set_tags(client, run.info.run_id, {"killed_reason": reason, **({"killed_found_by": found_by}
                                                                       if found_by else {})})
        client.set_terminated(run.info.run_id, status="KILLED")
        logger.warning("MLflow run %s marked KILLED: %s", run.info.run_id, reason)
        killed.append(run.info.run_id)
    return killed


def start_pipeline_run(config: PipelineConfig, run_name: str | None = None, tracking_uri: str | None = None) -> str:
    """Create the pipeline's MLflow run and return its id; the run stays RUNNING for later stages.

    Params: the resolved config flattened (`section.key`) and `lib.<name>` versions; tags: the config
    hash, the library versions and the owning process. No fluent run is left active in the process.
    Runs of the experiment left RUNNING by a process that died are marked KILLED first
    (`mark_orphans_killed`).
    """
    from mlflow.entities import Param

    apply_http_settings(config)
    uri = tracking_uri or resolve_tracking_uri(config)
    check_tracking_server(uri)
    client = client_for(uri)
    experiment_id = ensure_experiment(client, config.registry.experiment_name, uri)
    versions = library_versions()
    tags = {
        "config_hash": config.config_hash(),
        "base_model": config.model.name_or_path,
        "pipeline": "qlora-pipeline",
        **{f"lib.{name}": version for name, version in versions.items()},
        **process_tags(),
    }
    tags["mlflow.note.content"] = _run_note(config)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        mark_orphans_killed(client, experiment_id, found_by=run_id)
    except Exception as exc:  # housekeeping of earlier runs must never stop tonight's
        logger.warning("could not check for runs left RUNNING by dead processes: %s", exc)
    params = [Param(key, value[:6000]) for key, value in config.flat().items()]
    params += [Param(f"lib.{name}", version) for name, version in versions.items()]
    for chunk in _chunks(params, 100):
        client.log_batch(run_id, params=chunk)
    _RUN_URIS[run_id] = uri
    return run_id


def _run_note(config: PipelineConfig) -> str:
    return (f"QLoRA fine-tuning of `{config.model.name_or_path}` on `{config.data.path}`; "
            f"registers into `{config.registry.model_name}`.")


def end_pipeline_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Mark the run FINISHED (registration does this) or FAILED (a flow's failure hook may)."""
    client_for(uri_for_run(run_id, tracking_uri)).set_terminated(run_id, status=status)


# --------------------------------------------------------------------------------------------------
# Stage logging


def safe_key(name: str) -> str:
    """An MLflow metric/param/tag key: alphanumerics, `_ - . : /` and spaces; at most 250 characters."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)[:250]


def _numbers(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    """Finite numbers (bools as 0/1) of a flat-ish dict, nested dicts walked with dots."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = safe_key(f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, bool) or isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(_numbers(name, value))
    return out


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    entries = [Metric(key, value, stamp, step) for key, value in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def _set_tags(client: Any, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    entries = [RunTag(safe_key(key), str(value)[:8000]) for key, value in tags.items()]
    for chunk in _chunks(entries, 100):
        client.log_batch(run_id, tags=chunk)


def log_validation(run_id: str, validation: dict[str, Any], markdown: str, tracking_uri: str | None = None) -> None:
    """The data contract's outcome: a success tag, its numbers as metrics, summary JSON + markdown."""
    client = client_for(uri_for_run(run_id, tracking_uri))
    success = validation.get("success")
    _set_tags(client, run_id, {"validation_success": str(success).lower() if success is not None else "unknown"})
    _log_metrics(client, run_id, _numbers("validation", {k: v for k, v in validation.items()
                                                         if not isinstance(v, (list, tuple))}))
    client.log_dict(run_id, validation, "validation/summary.json")
    client.log_text(run_id, markdown, "validation/summary.md")


def log_plan(run_id: str, report: dict[str, Any], plan: dict[str, Any], tracking_uri: str | None = None) -> None:
    """Hardware report and training plan: tags (mutable, so a retried check may differ), JSON files."""
    client = client_for(uri_for_run(run_id, tracking_uri))
    scalars = {f"plan.{k}": v for k, v in plan.items() if isinstance(v, (str, int, float, bool))}
    devices = report.get("devices") or []
    scalars["plan.devices"] = ", ".join(str(d.get("name")) for d in devices if isinstance(d, dict)) or "cpu"
    _set_tags(client, run_id, scalars)
    memory = {k: v for k, v in plan.items() if k.endswith("_bytes")}
    memory.update({f"breakdown.{k}": v for k, v in (plan.get("memory_breakdown") or {}).items()})
    _log_metrics(client, run_id, _numbers("plan", memory))
    client.log_dict(run_id, report, "gpu/device_report.json")
    client.log_dict(run_id, plan, "gpu/plan.json")


def loss_curve_figure(history: list[dict[str, Any]]) -> Any:
    """Training (and eval, when logged) loss against the step, drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.subplots()
    for key, style in (("loss", "-o"), ("eval_loss", "--s")):
        points = [(h["step"], h[key]) for h in history if key in h and h.get("step") is not None]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, style, markersize=3, label=key)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("training loss")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.tight_layout()
    return figure


def log_training(run_id: str, summary: dict[str, Any], loss_history: list[dict[str, Any]],
                 tracking_uri: str | None = None) -> None:
    """The training summary as metrics (`train.*`) and JSON, and the loss curve as a PNG.

    Tags: the adapter's content hash, and for a resumed training the run that wrote the checkpoint it
    continued (`resumed_from_run`, `resumed_from_step`).
    """
    client = client_for(uri_for_run(run_id, tracking_uri))
    scalars = {k: v for k, v in summary.items() if k != "plan"}
    _log_metrics(client, run_id, _numbers("train", scalars), step=int(summary.get("global_step") or 0))
    tags = {"adapter_sha256": summary.get("adapter_sha256")}
    if summary.get("resumed_from_step"):
        tags.update(resumed_from_run=summary.get("resumed_from_run") or "unknown",
                    resumed_from_step=summary["resumed_from_step"])
    _set_tags(client, run_id, {key: value for key, value in tags.items() if value})
    client.log_dict(run_id, summary, "training/train_summary.json")
    client.log_dict(run_id, {"history": loss_history}, "training/loss_history.json")
    client.log_figure(run_id, loss_curve_figure(loss_history), "training/loss_curve.png")


def log_evaluation(run_id: str, report: dict[str, Any], tracking_uri: str | None = None) -> None:
    """Scores per system (`eval.<system>.<metric>`), comparisons (`eval.<a_vs_b>.<metric>.delta`, ...),
    the full report as JSON, and the prompt/reference/outputs samples as an MLflow table."""
    import pandas as pd

    client = client_for(uri_for_run(run_id, tracking_uri))
    metrics = _numbers("eval", report.get("systems") or {})
    metrics.update(_numbers("eval", report.get("comparisons") or {}))
    for key in ("n_samples", "wall_time_s"):
        if isinstance(report.get(key), (int, float)):
            metrics[f"eval.{key}"] = float(report[key])
    _log_metrics(client, run_id, metrics)
    _set_tags(client, run_id, {"eval.bleu_signature": report.get("bleu_signature", ""),
                               "eval.generation": json.dumps(report.get("generation", ""), default=str)})
    client.log_dict(run_id, report, "evaluation/report.json")
    samples = report.get("samples") or []
    if samples:
        # log_table appends to an existing file; a retried evaluation gets a file of its own
        existing = {f.path for f in client.list_artifacts(run_id, "evaluation")}
        name, attempt = "evaluation/samples.json", 1
        while name in existing:
            attempt += 1
            name = f"evaluation/samples-{attempt}.json"
        client.log_table(run_id, data=pd.DataFrame(samples), artifact_file=name)


# --------------------------------------------------------------------------------------------------
# Training callback


def system_metrics_wanted() -> bool:
    value = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    return value is None or value.strip().lower() not in ("false", "0", "no", "off")


def _memory_bytes() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {"memory_allocated_bytes": float(torch.cuda.memory_allocated()),
                "memory_peak_bytes": float(torch.cuda.max_memory_allocated())}
    import psutil

    return {"memory_rss_bytes": float(psutil.Process().memory_info().rss)}


class _MlflowTrainingCallbackMixin:
    """Logs each Trainer logging step into the pipeline run, with the step number.

    Metrics: loss, learning_rate, grad_norm, tokens_per_second (non-padding tokens since the previous
    log), memory (CUDA allocated/peak, or process RSS on the CPU), eval_loss when evaluated, and the
    Trainer's final train_* summary. Written with `MlflowClient.log_batch` into the given run (the
    transformers MLflow integration is not used: it would open a run of its own). A tracking hiccup
    never stops training: failed batches are kept and sent with the next one. `history` keeps every
    logged row for the loss curve. System metrics run in MLflow's monitor thread during training.
    """

    def __init__(self, run_id: str, tracking_uri: str, system_metrics: bool | None = None,
                 system_metrics_interval_s: float = 10.0) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.history: list[dict[str, Any]] = []
        self.pending: list[Any] = []
        self.system_metrics = system_metrics_wanted() if system_metrics is None else system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self._monitor: Any = None
        self._last_tokens: tuple[float, int] | None = None
        self._client: Any = None
        self._warned = False

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_tokens = (time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0))
        if self.system_metrics and state.is_world_process_zero and self._monitor is None:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.system_metrics_interval_s,
                                                     resume_logging=True, tracking_uri=self.tracking_uri)
                self._monitor.start()
            except Exception as exc:  # psutil missing or the monitor API changed: training goes on
                logger.warning("system metrics are not logged: %s", exc)
                self._monitor = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        step = int(state.global_step)
        row: dict[str, Any] = {"step": step}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                row[key] = float(value)
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        now = time.perf_counter()
        if "loss" in row and self._last_tokens is not None and tokens > self._last_tokens[1]:
            elapsed = now - self._last_tokens[0]
            if elapsed > 0:
                row["tokens_per_second"] = (tokens - self._last_tokens[1]) / elapsed
            self._last_tokens = (now, tokens)
        if "loss" in row:
            row.update(_memory_bytes())
        self.history.append(row)
        self._send(row, step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.flush()
        self.stop_system_metrics()

    def stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def _send(self, row: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending.extend(Metric(safe_key(k), v, stamp, step) for k, v in row.items() if k != "step")
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            for chunk in _chunks(self.pending, 1000):
                self.client.log_batch(self.run_id, metrics=chunk)
            self.pending = []
        except Exception as exc:
            if not self._warned:
                logger.warning("MLflow logging failed (%s); training continues, metrics are kept and retried", exc)
                self._warned = True

    def __del__(self) -> None:  # a crashed run must not leave the monitor thread behind
        with contextlib.suppress(Exception):
            self.stop_system_metrics()


def _build_callback_class() -> type:
    from transformers import TrainerCallback

    cls = type("MlflowTrainingCallback", (_MlflowTrainingCallbackMixin, TrainerCallback),
               {"__module__": __name__, "__doc__": _MlflowTrainingCallbackMixin.__doc__})
    return cls


def __getattr__(name: str) -> Any:
    """`MlflowTrainingCallback` is a real `transformers.TrainerCallback`, built on first use, so that
    importing this module (registration, the CLI) does not import transformers (~15 s on a small CPU)."""
    if name == "MlflowTrainingCallback":
        cls = _build_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
