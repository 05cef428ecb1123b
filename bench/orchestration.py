"""Benchmark 5: orchestration overhead of the demo flow.

The flow (`flows.finetune.finetune_flow`) runs in a fresh process with its own Prefect home and MLflow
store. The plain stage functions the flow's tasks call (validate_data, check_gpu, load_splits, train,
evaluate_adapter, resolve_champion_adapter, register_adapter) are wrapped with timers in the flow
module's namespace, and so are the MLflow logging methods of its `PipelineTracker` and its Prefect
artifact calls. Then

    overhead = flow wall time - sum of stage compute time

split into MLflow logging, Prefect artifacts and the rest (task runs, state changes, result
persistence, cache keys, log shipping). The temporary Prefect server that `prefect` starts when no
PREFECT_API_URL is set is started explicitly before the flow and timed apart: that is the cost a
running server (`prefect server start`, or `make ui`) avoids. Likewise the creation of the new MLflow
store's schema (a one-off per store) is timed apart.

Run as a child: `python -m bench.orchestration --out FILE [--set section.key=value ...]`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import REPO_ROOT, run_child

STAGE_FUNCTIONS = ("validate_data", "check_gpu", "load_splits", "train", "evaluate_adapter",
                   "resolve_champion_adapter", "register_adapter")
MLFLOW_FUNCTIONS = ("start", "log_validation", "log_plan", "log_training", "log_evaluation")  # PipelineTracker's
ARTIFACT_FUNCTIONS = ("create_markdown_artifact", "create_table_artifact")


def _timed(function: Callable[..., Any], name: str, totals: dict[str, float]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - started

    return wrapper


def instrument(owner: ModuleType | type, names: tuple[str, ...], totals: dict[str, float]) -> list[str]:
    """Replace each of `names` that `owner` (a module or a class) has by a timed wrapper; returns the
    names found. A classmethod stays a classmethod."""
    found = [name for name in names if callable(getattr(owner, name, None))]
    for name in found:
        declared = inspect.getattr_static(owner, name)
        if isinstance(declared, classmethod):
            setattr(owner, name, classmethod(_timed(declared.__func__, name, totals)))
        else:
            setattr(owner, name, _timed(getattr(owner, name), name, totals))
    return found


def run_flow(overrides: list[str]) -> dict[str, Any]:
    """Child: time the demo flow and its parts."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    import flows.finetune as flow_module

    import_s = time.perf_counter() - started
    stages: dict[str, float] = defaultdict(float)
    mlflow: dict[str, float] = defaultdict(float)
    artifacts: dict[str, float] = defaultdict(float)
    found = {
        "stages": instrument(flow_module, STAGE_FUNCTIONS, stages),
        "mlflow": instrument(flow_module.PipelineTracker, MLFLOW_FUNCTIONS, mlflow),
        "artifacts": instrument(flow_module, ARTIFACT_FUNCTIONS, artifacts),
    }
    store_s = 0.0
    uri = next((o.split("=", 1)[1] for o in overrides if o.startswith("registry.tracking_uri=")), None)
    if uri:  # a new store creates its schema on first use: a one-off per store, timed apart like the server
        from mlflow import MlflowClient

        started = time.perf_counter()
        MlflowClient(uri).search_experiments(max_results=1)
        store_s = time.perf_counter() - started
    server_s = 0.0
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
        from prefect.server.api.server import SubprocessASGIServer

        started = time.perf_counter()
        SubprocessASGIServer().start()  # the flow's client reuses this singleton
        server_s = time.perf_counter() - started
    started = time.perf_counter()
    outcome = flow_module.finetune_flow(str(REPO_ROOT / "configs" / "demo.yaml"), overrides)
    flow_s = time.perf_counter() - started
    stage_s = sum(stages.values())
    mlflow_s = sum(mlflow.values())
    artifacts_s = sum(artifacts.values())
    overhead_s = flow_s - stage_s
    return {
        "prefect_server": api_url or "temporary (started by the benchmark, timed apart)",
        "import_s": import_s,
        "server_start_s": server_s,
        "mlflow_store_init_s": store_s,
        "flow_wall_s": flow_s,
        "stage_compute_s": stage_s,
        "stages_s": dict(stages),
        "overhead_s": overhead_s,
        "overhead_share": overhead_s / stage_s,
        "overhead_share_cold": (overhead_s + server_s + store_s) / stage_s,
        "overhead_parts_s": {"mlflow_logging": mlflow_s, "prefect_artifacts": artifacts_s,
                             "prefect_bookkeeping": overhead_s - mlflow_s - artifacts_s},
        "mlflow_s": dict(mlflow),
        "artifacts_s": dict(artifacts),
        "instrumented": found,
        "outcome": {"version": getattr(outcome, "version", None), "promoted": getattr(outcome, "promoted", None),
                    "metrics": getattr(outcome, "metrics", None)},
    }


def orchestration_benchmark(data_path: Path, model_dir: Path, work: Path, extra: list[str], threads: int,
                            timeout: float = 900) -> dict[str, Any]:
    """Parent: run the flow child with the demo config, its outputs and stores under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.path={data_path.resolve()}",
        f"model.name_or_path={model_dir.resolve()}",
        f"training.output_dir={work / 'out'}",
        f"registry.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "training.resume=false",
        *extra,
    ]
    env = {"PREFECT_HOME": str(work / "prefect-home"), "OMP_NUM_THREADS": str(threads),
           "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    args = ["--out", str(work / "flow.json")]
    for item in overrides:
        args += ["--set", item]
    result = run_child("bench.orchestration", args, timeout=timeout, env=env)
    result["overrides"] = extra
    result["target"] = 0.10
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-flow.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    result = run_flow(args.overrides)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
