"""Benchmark: the hyper-parameter sweep's overhead per trial (flow and tracking, against the trial's compute).

Runs the demo sweep (`flows.sweep.sweep_flow`, configs/demo-sweep.yaml: a grid of trials) under a
temporary Prefect server (started before timing) with its own MLflow store and Optuna study, and
times, in the flow module's and the stages' namespaces:

- compute: each trial's `train` and `evaluate_adapter` calls (the work a hand-written loop would do too);
- the trial phase: from the study's opening of the trial loop (`trials_to_add`) to the summary task.

    overhead per trial = (trial phase - sum of compute) / trials

That is everything the sweep adds per trial: the Prefect task run, Optuna's ask/report/tell in its
sqlite storage, the trial's nested MLflow run (params, loss curve, evaluation) and the trial config.
Target (issue 15): at most 5 % of a trial's compute. Not a timed test; run it by hand:

    python -m bench.sweep [--steps 60] [--out bench/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT
from bench.orchestration import _timed


def sweep_overhead(steps: int, work: Path) -> dict[str, Any]:
    from prefect.testing.utilities import prefect_test_harness

    import flows.sweep as sweep_module
    import tasks.evaluate
    import tasks.train
    from tasks.demo_assets import build_demo_assets

    assets = build_demo_assets(REPO_ROOT / ".cache" / "demo")
    totals: dict[str, float] = defaultdict(float)
    stamps: dict[str, float] = {}
    tasks.train.train = _timed(tasks.train.train, "compute.train", totals)
    tasks.evaluate.evaluate_adapter = _timed(tasks.evaluate.evaluate_adapter, "compute.evaluate", totals)
    original_trials_to_add, original_summary = sweep_module.trials_to_add, sweep_module.summary_task

    def trials_to_add(*args: Any, **kwargs: Any) -> int:
        stamps["loop_start"] = time.perf_counter()
        return original_trials_to_add(*args, **kwargs)

    def summary_task(*args: Any, **kwargs: Any) -> Any:
        stamps["loop_end"] = time.perf_counter()
        return original_summary(*args, **kwargs)

    sweep_module.trials_to_add, sweep_module.summary_task = trials_to_add, summary_task
    overrides = [f"data.path={assets.data_path.resolve()}", f"model.name_or_path={assets.model_dir.resolve()}",
                 f"training.output_dir={work / 'out'}", f"registry.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                 f"training.max_steps={steps}", "sweep.register_best=false", "sweep.pruner=none"]
    with prefect_test_harness(server_startup_timeout=180):
        started = time.perf_counter()
        outcome = sweep_module.sweep_flow(config_path=str(REPO_ROOT / "configs" / "demo-sweep.yaml"),
                                          overrides=overrides)
        flow_s = time.perf_counter() - started
    trials = len(outcome.ran_now)
    compute = totals["compute.train"] + totals["compute.evaluate"]
    phase = stamps["loop_end"] - stamps["loop_start"]
    per_trial = (phase - compute) / trials
    return {
        "trials": trials, "steps_per_trial": steps, "flow_wall_s": flow_s, "trial_phase_s": phase,
        "compute_s": compute, "compute_per_trial_s": compute / trials, "overhead_per_trial_s": per_trial,
        "overhead_share": per_trial / (compute / trials), "target_share": 0.05,
        "loadavg": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as work:
        result = sweep_overhead(args.steps, Path(work))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
