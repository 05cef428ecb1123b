"""A/B testing for the model server: sticky weighted routing, outcomes per arm, and the report.

Requests that name no model are routed by `serving.ab` weights (`{champion: 0.9, challenger: 0.1}`).
The arm is chosen from a hash of the request's `user` field, so one user always lands in the same arm
while the weights stay the same (requests without a user are spread by their request id). Each
answer and each `POST /v1/feedback` score is counted per arm and answering version, in prometheus
metrics (`/metrics`) and in `ArmStats`, whose summaries go to an MLflow run periodically; `qlora
ab-report` reads that run back and compares the arms' feedback with Welch's t-test.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from configs.schema import ConfigError, PipelineConfig, ServingConfig

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
NO_ARM = "none"  # requests that named their model


def arm_models(serving: ServingConfig) -> dict[str, str]:
    """arm -> served model name: an arm is a served name, or the alias of one served `models:/name@alias`."""
    names = {model.served_name(): model for model in serving.models}
    resolved = {}
    for arm in serving.ab:
        if arm in names:
            resolved[arm] = arm
            continue
        matches = [name for name, model in names.items() if model.source.endswith(f"@{arm}")]
        if len(matches) != 1:
            found = "no served model" if not matches else f"several served models ({matches})"
            raise ConfigError(f"serving.ab: arm '{arm}' matches {found}; name a served model "
                              f"({sorted(names)}) or the alias of exactly one served models:/<name>@<alias>")
        resolved[arm] = matches[0]
    return resolved


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) for a string (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def choose_arm(weights: dict[str, float], key: str) -> str:
    """The arm whose share of [0, 1) holds `key`'s hash, shares in proportion to the weights."""
    total = sum(weights.values())
    point = unit_hash(key) * total
    upto = 0.0
    for arm, weight in weights.items():
        upto += weight
        if point < upto:
            return arm
    return next(arm for arm, weight in reversed(weights.items()) if weight > 0)


@dataclass
class _Outcomes:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latency_s: float = 0.0
    feedback_n: int = 0
    feedback_sum: float = 0.0
    feedback_sumsq: float = 0.0


@dataclass
class ArmStats:
    """Outcomes per (arm, version) in this process; summaries for MLflow and the report."""

    window: int = 100_000
    by_arm: dict[tuple[str, str], _Outcomes] = field(default_factory=lambda: collections.defaultdict(_Outcomes))
    requests: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, request_id: str, arm: str, version: str, tokens: int, latency_s: float) -> None:
        with self.lock:
            outcome = self.by_arm[(arm, version)]
            outcome.requests += 1
            outcome.tokens += tokens
            outcome.latency_s += latency_s
            self.requests[request_id] = (arm, version)
            while len(self.requests) > self.window:
                self.requests.popitem(last=False)

    def failed(self, arm: str, version: str) -> None:
        with self.lock:
            self.by_arm[(arm, version)].errors += 1

    def feedback(self, request_id: str, score: float) -> tuple[str, str] | None:
        """Record a score for an answered request; None when the id is unknown (or fell out of the window)."""
        with self.lock:
            found = self.requests.get(request_id)
            if found is None:
                return None
            outcome = self.by_arm[found]
            outcome.feedback_n += 1
            outcome.feedback_sum += score
            outcome.feedback_sumsq += score * score
            return found

    def summary(self) -> dict[str, float]:
        """Flat metrics `arm.<arm>.<version>.<what>` (MLflow metric keys)."""
        out = {}
        with self.lock:
            for (arm, version), o in self.by_arm.items():
                prefix = f"arm.{arm}.{version.replace('/', '.v')}"
                out.update({f"{prefix}.requests": o.requests, f"{prefix}.errors": o.errors,
                            f"{prefix}.tokens": o.tokens, f"{prefix}.latency_s_sum": o.latency_s,
                            f"{prefix}.feedback_n": o.feedback_n, f"{prefix}.feedback_sum": o.feedback_sum,
                            f"{prefix}.feedback_sumsq": o.feedback_sumsq})
        return out


class ServingMetrics:
    """The prometheus metrics of one server (its own registry, so several servers can share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ("arm", "model", "version")
        self.requests = Counter("qlora_requests", "answered requests", labels, registry=self.registry)
        self.errors = Counter("qlora_request_errors", "requests that failed, by HTTP status",
                              ("arm", "model", "version", "status"), registry=self.registry)
        self.latency = Histogram("qlora_request_latency_seconds", "time from accepted to answered", labels,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("qlora_generated_tokens", "generated tokens", labels, registry=self.registry)
        self.tokens_per_s = Gauge("qlora_tokens_per_second", "tokens/s of the last answered request", labels,
                                  registry=self.registry)
        self.feedback = Histogram("qlora_feedback_score", "feedback scores", ("arm", "version"),
                                  buckets=(0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0, 5.0), registry=self.registry)
        self.batch_size = Histogram("qlora_batch_size", "requests per generate", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=self.registry)
        self.switches = Counter("qlora_adapter_switches", "alias switches", ("model",), registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SummaryLogger:
    """Logs `ArmStats.summary()` to one MLflow run every `interval_s` (and once at stop)."""

    def __init__(self, config: PipelineConfig, stats: ArmStats) -> None:
        self.config, self.stats = config, stats
        self.stop_event = threading.Event()
        self.run_id: str | None = None
        self.thread: threading.Thread | None = None
        self.step = 0

    def experiment_name(self) -> str:
        return serving_experiment(self.config)

    def start(self) -> None:
        interval = self.config.serving.summary_interval_s
        if interval <= 0:
            return
        from tasks.tracking import client_for, ensure_experiment, resolve_tracking_uri

        uri = resolve_tracking_uri(self.config)
        self.client = client_for(uri)
        experiment_id = ensure_experiment(self.client, self.experiment_name(), uri)
        run = self.client.create_run(experiment_id, run_name=f"serving-{time.strftime('%Y%m%d-%H%M%S')}",
                                     tags={"qlora.serving": "true", "ab": repr(self.config.serving.ab)})
        self.run_id = run.info.run_id

        def loop() -> None:
            while not self.stop_event.wait(interval):
                self.flush()

        self.thread = threading.Thread(target=loop, name="qlora-ab-summary", daemon=True)
        self.thread.start()

    def flush(self) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, self.step) for key, value in self.stats.summary().items()]
        self.step += 1
        try:
            for start in range(0, len(metrics), 500):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + 500])
        except Exception as exc:  # the tracking server being away must not stop serving
            logger.warning("could not log A/B summaries to MLflow: %s", exc)

    def stop(self) -> None:
        self.stop_event.set()
        if self.run_id is not None:
            self.flush()
            try:
                self.client.set_terminated(self.run_id, "FINISHED")
            except Exception as exc:
                logger.warning("could not end the serving run %s: %s", self.run_id, exc)


def serving_experiment(config: PipelineConfig) -> str:
    return config.serving.experiment_name or f"{config.registry.experiment_name}-serving"


# ----------------------------------------------------------------------------------------------
# The report


@dataclass
class ArmSummary:
    arm: str
    requests: int
    errors: int
    tokens: int
    mean_latency_s: float | None
    feedback_n: int
    feedback_mean: float | None
    feedback_std: float | None


def arm_summaries(metrics: dict[str, float]) -> list[ArmSummary]:
    """Per-arm totals (all versions of an arm together) from `ArmStats.summary()`-shaped metrics."""
    totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for key, value in metrics.items():
        if not key.startswith("arm."):
            continue
        arm, what = key.split(".")[1], key.rsplit(".", 1)[1]
        totals[arm][what] += value
    out = []
    for arm, t in totals.items():
        n = int(t["feedback_n"])
        mean = t["feedback_sum"] / n if n else None
        variance = (t["feedback_sumsq"] - n * mean * mean) / (n - 1) if n > 1 else None
        out.append(ArmSummary(arm=arm, requests=int(t["requests"]), errors=int(t["errors"]), tokens=int(t["tokens"]),
                              mean_latency_s=t["latency_s_sum"] / t["requests"] if t["requests"] else None,
                              feedback_n=n, feedback_mean=mean,
                              feedback_std=math.sqrt(max(variance, 0.0)) if variance is not None else None))
    return sorted(out, key=lambda s: -s.requests)


def welch_test(a: ArmSummary, b: ArmSummary) -> float | None:
    """Two-sided p-value of Welch's t-test on the arms' feedback means; None without two scores each."""
    if a.feedback_n < 2 or b.feedback_n < 2:
        return None
    from scipy.stats import ttest_ind_from_stats

    if (a.feedback_std or 0) == 0 and (b.feedback_std or 0) == 0:
        return 1.0 if a.feedback_mean == b.feedback_mean else 0.0
    result = ttest_ind_from_stats(a.feedback_mean, a.feedback_std, a.feedback_n, b.feedback_mean, b.feedback_std,
                                  b.feedback_n, equal_var=False)
    return float(result.pvalue)


def ab_report(config: PipelineConfig, run_id: str | None = None) -> tuple[list[ArmSummary], dict[str, Any]]:
    """(per-arm summaries, {run_id, p_values: {"a vs b": p}}) from the latest (or given) serving run."""
    from tasks.tracking import client_for, resolve_tracking_uri

    client = client_for(resolve_tracking_uri(config))
    if run_id is None:
        experiment = client.get_experiment_by_name(serving_experiment(config))
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=1) if experiment else []
        if not runs:
            raise ConfigError(f"no serving run in experiment '{serving_experiment(config)}': run `qlora serve-model` "
                              "with serving.ab and serving.summary_interval_s > 0 first, or pass --run-id")
        run = runs[0]
    else:
        run = client.get_run(run_id)
    arms = arm_summaries(run.data.metrics)
    p_values = {}
    for other in arms[1:]:
        p_values[f"{arms[0].arm} vs {other.arm}"] = welch_test(arms[0], other)
    return arms, {"run_id": run.info.run_id, "p_values": p_values}


def format_report(arms: list[ArmSummary], extra: dict[str, Any], level: float = 0.05) -> str:
    """The arms side by side as a markdown table, then each comparison's p-value and verdict."""
    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [f"A/B report of serving run {extra['run_id']}", "",
             "| arm | requests | errors | tokens | mean latency s | feedback n | feedback mean | feedback std |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in arms:
        lines.append(f"| {s.arm} | {s.requests} | {s.errors} | {s.tokens} | {cell(s.mean_latency_s, '.3f')} | "
                     f"{s.feedback_n} | {cell(s.feedback_mean, '.3f')} | {cell(s.feedback_std, '.3f')} |")
    lines.append("")
    for pair, p in extra["p_values"].items():
        if p is None:
            lines.append(f"{pair}: not enough feedback for a test (two scores per arm at least)")
        else:
            verdict = "significant" if p < level else "not significant"
            lines.append(f"{pair}: Welch t-test p = {p:.3g} ({verdict} at {level})")
    return "\n".join(lines)
