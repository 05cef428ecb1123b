"""The Trainer callback that logs training into the pipeline's MLflow run: `training_callback(tracker)`.

Its own module, kept out of `tasks.tracking`, because it subclasses `transformers.TrainerCallback`:
importing tracking (registration, the CLI) must not import transformers (~15 s on a small CPU). Only
the train stage's caller imports this module. The transformers MLflow integration is not used: it
would open a run of its own instead of logging into the one the tracker holds.

System metrics (CPU, memory, disk, network, and GPU when `pynvml` is installed) are sampled during
training by MLflow's own `SystemMetricsMonitor` in a background thread every 10 s (psutil; cheap).
They are on unless `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` is set to false; the sampling interval
follows `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any

from transformers import TrainerCallback

from tasks.tracking import PipelineTracker, chunks, safe_key

logger = logging.getLogger(__name__)


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


class MlflowTrainingCallback(TrainerCallback):
    """Logs each Trainer logging step into the tracker's run, with the step number.

    Metrics: loss, learning_rate, grad_norm, tokens_per_second (non-padding tokens since the previous
    log), memory (CUDA allocated/peak, or process RSS on the CPU), eval_loss when evaluated, and the
    Trainer's final train_* summary. Written with `MlflowClient.log_batch` into the tracker's run. A
    tracking hiccup never stops training: failed batches are kept and sent with the next one. `history`
    keeps every logged row for the loss curve. System metrics run in MLflow's monitor thread.
    """

    def __init__(self, tracker: PipelineTracker, system_metrics: bool | None = None,
                 system_metrics_interval_s: float = 10.0) -> None:
        self.tracker = tracker
        self.history: list[dict[str, Any]] = []
        self.pending: list[Any] = []
        self.system_metrics = system_metrics_wanted() if system_metrics is None else system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self._monitor: Any = None
        self._last_tokens: tuple[float, int] | None = None
        self._warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_tokens = (time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0))
        if self.system_metrics and state.is_world_process_zero and self._monitor is None:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.tracker.run_id,
                                                     sampling_interval=self.system_metrics_interval_s,
                                                     resume_logging=True, tracking_uri=self.tracker.uri)
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
            for chunk in chunks(self.pending, 1000):
                self.tracker.client.log_batch(self.tracker.run_id, metrics=chunk)
            self.pending = []
        except Exception as exc:
            if not self._warned:
                logger.warning("MLflow logging failed (%s); training continues, metrics are kept and retried", exc)
                self._warned = True

    def __del__(self) -> None:  # a crashed run must not leave the monitor thread behind
        with contextlib.suppress(Exception):
            self.stop_system_metrics()


def training_callback(tracker: PipelineTracker, system_metrics: bool | None = None,
                      system_metrics_interval_s: float = 10.0) -> MlflowTrainingCallback:
    """The callback to hand `tasks.train.train` so that training logs into `tracker`'s run; after
    training, its `history` is what `tracker.log_training` draws the loss curve from."""
    return MlflowTrainingCallback(tracker, system_metrics=system_metrics,
                                  system_metrics_interval_s=system_metrics_interval_s)
