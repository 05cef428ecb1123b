"""MLflow tracking: one run per pipeline run, held by one `PipelineTracker` that every stage logs through.

`PipelineTracker.start(config)` resolves the store once, creates the run (resolved config as params,
library versions as params and tags, the owning process as tags), sweeps the experiment for runs
orphaned by dead processes (`tasks.orphan_runs`) and returns the tracker: run id, URI and an
`MlflowClient`. The flow creates it once and passes it to each stage, which logs through its methods
(`log_validation`, `log_plan`, `log_training`, `log_evaluation`); nothing resolves the URI again and
nothing relies on MLflow's process-global active run. Whoever starts the tracker ends the run:
`finish()` / `fail()`, or `with tracker:` (FINISHED on success, FAILED on any exception), the way
torchtune's recipes create their metric logger once and close it in `cleanup()`. A tracker pickles as
its run id and URI (Prefect may hand task arguments to another process); `PipelineTracker(run_id, uri)`
reopens an existing run. The Trainer callback is `tasks.training_callback`.

Where the data goes: `registry.tracking_uri`, else MLFLOW_TRACKING_URI, else by default a sqlite store
in the project dir's `mlflow/` folder (`mlflow/mlflow.db`, artifacts in `mlflow/artifacts`; the project
dir is $QLORA_PIPELINE_DIR or the working directory, see configs/paths.py, so `make demo` from the repo
root writes the git-ignored `mlflow/` that `make mlflow-ui` serves, and an installed package never
writes into site-packages). For any local sqlite store the experiment's artifacts are kept beside the
database file, in `artifacts/`, never in a stray `./mlruns` of the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import TYPE_CHECKING, Any

from configs.paths import project_dir
from configs.schema import PipelineConfig
from tasks.orphan_runs import mark_orphans_killed, process_tags

if TYPE_CHECKING:
    from tasks.evaluate import EvalReport
    from tasks.gpu import DeviceReport, TrainingPlan
    from tasks.train import TrainSummary
    from tasks.validate_result import ValidationResult

logger = logging.getLogger(__name__)

STORE_DIR_NAME = "mlflow"  # under the project dir; mlflow/server.sh serves the same folder
DB_FILE_NAME = "mlflow.db"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "mlflow",
                     "prefect", "great-expectations", "sacrebleu", "rouge-score")

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


# --------------------------------------------------------------------------------------------------
# Helpers for the run


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


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """`items` in lists of at most `size` (MLflow's log_batch caps params, tags and metrics per call)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


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


def _run_note(config: PipelineConfig) -> str:
    return (f"QLoRA fine-tuning of `{config.model.name_or_path}` on `{config.data.describe()}`; "
            f"registers into `{config.registry.model_name}`.")


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


# --------------------------------------------------------------------------------------------------
# The pipeline run


class PipelineTracker:
    """The pipeline run's MLflow run: its id, its store's URI and a client, for every stage to log into.

    Create one per pipeline run with `start`; reopen an existing run with `PipelineTracker(run_id, uri)`.
    It pickles as `(run_id, uri)`, never its client, so it can be a Prefect task argument wherever the
    task runs. Used as a context manager it ends the run when the block ends: FINISHED, or FAILED when
    the block raised (best effort: the original error is the one worth reporting).
    """

    def __init__(self, run_id: str, uri: str) -> None:
        self.run_id = run_id
        self.uri = uri
        self._client: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id, self.uri))

    def __repr__(self) -> str:
        return f"PipelineTracker(run_id={self.run_id!r}, uri={self.uri!r})"

    @property
    def client(self) -> Any:
        """The `MlflowClient` of the store (made on first use, after unpickling too)."""
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    @classmethod
    def start(cls, config: PipelineConfig, run_name: str | None = None,
              tracking_uri: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> PipelineTracker:
        """Create the pipeline's MLflow run (it stays RUNNING for the later stages) and its tracker.

        Params: the resolved config flattened (`section.key`) and `lib.<name>` versions; tags: the config
        hash, the library versions and the owning process. No fluent run is left active in the process.
        Runs of the experiment left RUNNING by a process that died are then marked KILLED. With
        `parent_run_id` the run is nested under that one (a sweep trial under its study's run).
        """
        from mlflow.entities import Param

        apply_http_settings(config)
        uri = tracking_uri or resolve_tracking_uri(config)
        check_tracking_server(uri)
        tracker = cls("", uri)
        experiment_id = ensure_experiment(tracker.client, config.registry.experiment_name, uri)
        versions = library_versions()
        extra = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        tags = {
            "config_hash": config.config_hash(),
            "base_model": config.model.name_or_path,
            "pipeline": "qlora-pipeline",
            **{f"lib.{name}": version for name, version in versions.items()},
            **process_tags(),
            "mlflow.note.content": _run_note(config),
            **extra,
        }
        tracker.run_id = tracker.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        try:
            mark_orphans_killed(tracker.client, experiment_id, found_by=tracker.run_id)
        except Exception as exc:  # housekeeping of earlier runs must never stop tonight's
            logger.warning("could not check for runs left RUNNING by dead processes: %s", exc)
        params = [Param(key, value[:6000]) for key, value in config.flat().items()]
        params += [Param(f"lib.{name}", version) for name, version in versions.items()]
        for chunk in chunks(params, 100):
            tracker.client.log_batch(tracker.run_id, params=chunk)
        return tracker

    # ---- the run's end: whoever started the tracker ends it

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, status="FAILED")

    def __enter__(self) -> PipelineTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        status = "FINISHED" if exc_type is None else "FAILED"  # a crashed night must not stay RUNNING
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as error:
            logger.warning("could not mark MLflow run %s %s: %s", self.run_id, status, error)

    # ---- plain logging

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        entries = [Metric(key, value, stamp, step) for key, value in metrics.items()]
        for chunk in chunks(entries, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(safe_key(key), str(value)[:8000]) for key, value in tags.items()]
        for chunk in chunks(entries, 100):
            self.client.log_batch(self.run_id, tags=chunk)

    # ---- one method per stage

    def log_validation(self, result: ValidationResult) -> None:
        """The data contract's outcome: a success tag, its numbers as metrics, summary JSON + markdown."""
        summary = result.to_dict()
        self.set_tags({"validation_success": str(bool(result.success)).lower()})
        self.log_metrics(_numbers("validation", {k: v for k, v in summary.items() if not isinstance(v, (list, tuple))}))
        for number, section in enumerate(result.sections):  # data.sources: each source's verdict and counts
            self.log_metrics(_numbers(f"validation.source_{number}", {"success": section.success,
                                                                      "row_counts": section.row_counts}))
        self.client.log_dict(self.run_id, summary, "validation/summary.json")
        self.client.log_text(self.run_id, result.markdown(), "validation/summary.md")

    def log_plan(self, report: DeviceReport, plan: TrainingPlan) -> None:
        """Hardware report and training plan: tags (mutable, so a retried check may differ), JSON files."""
        plan_dict = plan.to_dict()
        scalars = {f"plan.{k}": v for k, v in plan_dict.items() if isinstance(v, (str, int, float, bool))}
        scalars["plan.devices"] = ", ".join(str(d.name) for d in report.devices) or "cpu"
        self.set_tags(scalars)
        memory = {k: v for k, v in plan_dict.items() if k.endswith("_bytes")}
        memory.update({f"breakdown.{k}": v for k, v in plan.memory_breakdown.items()})
        self.log_metrics(_numbers("plan", memory))
        self.client.log_dict(self.run_id, report.to_dict(), "gpu/device_report.json")
        self.client.log_dict(self.run_id, plan_dict, "gpu/plan.json")

    def log_replan(self, change: dict[str, Any], plan: TrainingPlan) -> None:
        """An out-of-memory re-plan during training (tasks.oom), recorded as it happens: the `plan.*` tags
        move to the new plan (tags are mutable for this), the change is a tag `replan.step_<n>` and a JSON
        file, and `gpu/plan.json` is replaced by the plan training continues under."""
        plan_dict = plan.to_dict()
        tags: dict[str, Any] = {f"plan.{k}": v for k, v in plan_dict.items() if isinstance(v, (str, int, float, bool))}
        tags[f"replan.step_{change['at_step']}"] = json.dumps(change, sort_keys=True)
        self.set_tags(tags)
        self.client.log_dict(self.run_id, change, f"training/replan-step-{change['at_step']}.json")
        self.client.log_dict(self.run_id, plan_dict, "gpu/plan.json")

    def log_training(self, summary: TrainSummary, loss_history: list[dict[str, Any]]) -> None:
        """The training summary as metrics (`train.*`) and JSON, and the loss curve as a PNG.

        Tags: the adapter's content hash, and for a resumed training the run that wrote the checkpoint it
        continued (`resumed_from_run`, `resumed_from_step`).
        """
        values = dataclasses.asdict(summary)
        scalars = {k: v for k, v in values.items() if k != "plan"}
        self.log_metrics(_numbers("train", scalars), step=int(summary.global_step or 0))
        tags: dict[str, Any] = {"adapter_sha256": summary.adapter_sha256, "training.stop_reason": summary.stop_reason,
                                "training.stopped_early": str(summary.stopped_early).lower()}
        if summary.best_step is not None:
            tags.update({"training.best_step": summary.best_step, "training.best_metric": summary.best_metric,
                         "training.adapter_step": summary.adapter_step})
        if summary.replans:
            tags["training.replans"] = json.dumps(summary.replans, sort_keys=True)
        if summary.resumed_from_step:
            tags.update(resumed_from_run=summary.resumed_from_run or "unknown",
                        resumed_from_step=summary.resumed_from_step)
        self.set_tags({key: value for key, value in tags.items() if value})
        self.client.log_dict(self.run_id, values, "training/train_summary.json")
        self.client.log_dict(self.run_id, {"history": loss_history}, "training/loss_history.json")
        self.client.log_figure(self.run_id, loss_curve_figure(loss_history), "training/loss_curve.png")

    def log_evaluation(self, report: EvalReport) -> None:
        """Scores per system (`eval.<system>.<metric>`), comparisons (`eval.<a_vs_b>.<metric>.delta`, ...),
        the full report as JSON, and the prompt/reference/outputs samples as an MLflow table."""
        import pandas as pd

        metrics = _numbers("eval", report.systems)
        metrics.update(_numbers("eval", report.comparisons))
        metrics.update({"eval.n_samples": float(report.n_samples), "eval.wall_time_s": float(report.wall_time_s)})
        self.log_metrics(metrics)
        self.set_tags({"eval.bleu_signature": report.bleu_signature,
                       "eval.generation": json.dumps(report.generation, default=str)})
        self.client.log_dict(self.run_id, report.to_dict(), "evaluation/report.json")
        if report.samples:
            # log_table appends to an existing file; a retried evaluation gets a file of its own
            existing = {f.path for f in self.client.list_artifacts(self.run_id, "evaluation")}
            name, attempt = "evaluation/samples.json", 1
            while name in existing:
                attempt += 1
                name = f"evaluation/samples-{attempt}.json"
            self.client.log_table(self.run_id, data=pd.DataFrame(report.samples), artifact_file=name)
