"""The hyper-parameter search flow `qlora-sweep` on the demo: real Optuna studies in sqlite, real tiny
QLoRA trials, real MLflow stores, a real Prefect server (prefect_test_harness), a real kill -9.

Trials are tiny (12 steps, 8 evaluation rows; the study tests on the 400-row demo slice) so the file
stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DEMO_SLICE_VALIDATION, REPO_ROOT, demo_overrides

SWEEP_CONFIG = REPO_ROOT / "configs" / "demo-sweep.yaml"
TINY_TRIALS = ["training.max_steps=12", "training.eval_steps=6", "training.save_steps=6",
               "training.logging_steps=6", "evaluation.max_rows=8", "evaluation.max_new_tokens=8",
               "evaluation.bootstrap_resamples=100", "registry.log_input_example=false"]
GRID_2X2 = "sweep.space={lora.r: [4, 8], training.learning_rate: [1.0e-3, 3.0e-3]}"


def sweep_overrides(demo_assets, tmp_path: Path, *extra: str, data: Path | None = None) -> list[str]:
    """The tiny-trial demo sweep in tmp_path, on `data` (the conftest demo_data_slice) when given: these
    tests are about the study, not the data. Its MLflow store, tmp_path/mlflow.db, is the one the
    `mlflow_uri` fixture copies there already migrated: a test that runs a sweep asks for that fixture, so
    that no sweep pays for MLflow's schema migrations."""
    sliced = [f"data.path={data}", *DEMO_SLICE_VALIDATION] if data else []
    return demo_overrides(demo_assets, tmp_path, *TINY_TRIALS, *sliced, *extra)


STUDY = "demo-qlora-adapter-sweep"


def load_study(tmp_path: Path, name: str = STUDY):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def study_trials(tmp_path: Path) -> list:
    """The study's trials (FrozenTrial), or [] while the sweep has not created it yet.

    Read-only until the study's row is there: Optuna opening a storage creates missing tables and stamps
    the schema version, so opening it while the sweep creates it races the sweep (one of the two fails
    with "table ... already exists" or a UNIQUE constraint on alembic_version).
    """
    import sqlite3
    from contextlib import closing

    db = tmp_path / "optuna.db"
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            created = connection.execute("SELECT 1 FROM studies WHERE study_name = ?", (STUDY,)).fetchone()
    except sqlite3.OperationalError:  # no tables yet
        return []
    return load_study(tmp_path).get_trials() if created else []


def trials_in(tmp_path: Path, state) -> list:
    """The study's trials in `state` (none while there is no study yet)."""
    return [t for t in study_trials(tmp_path) if t.state == state]


def completed(tmp_path: Path) -> dict[int, object]:
    """Trial number -> completion time of the study's COMPLETE trials."""
    from optuna.trial import TrialState

    return {t.number: t.datetime_complete for t in trials_in(tmp_path, TrialState.COMPLETE)}


def training(tmp_path: Path) -> dict[int, str]:
    """Trial number -> MLflow run id of the RUNNING trials whose run exists already."""
    from optuna.trial import TrialState

    return {t.number: t.user_attrs["mlflow_run_id"] for t in trials_in(tmp_path, TrialState.RUNNING)
            if "mlflow_run_id" in t.user_attrs}


def test_grid_killed_after_two_trials_resumes_runs_only_the_rest_and_registers_the_best(
        prefect_server, demo_assets, demo_data_slice, tmp_path, mlflow_uri):
    """A 2x2 grid sweep is killed (-9) after 2 finished trials, while the third trains; the rerun continues
    the same study, runs only the 2 missing grid points (the interrupted one in its own MLflow run, reopened
    and owned by the rerun), logs 4 child runs and registers the best trial with the study tags."""
    from mlflow import MlflowClient

    from flows.sweep import sweep_flow

    overrides = sweep_overrides(demo_assets, tmp_path, GRID_2X2, "sweep.pruner=none", data=demo_data_slice)
    command = [sys.executable, "-m", "flows.cli", "sweep", "--config", str(SWEEP_CONFIG)]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": prefect_server,
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    log = (tmp_path / "killed-sweep.log").open("w")
    sweep = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(completed(tmp_path)) < 2 or not training(tmp_path):
            ended = sweep.poll() is not None
            assert not ended, f"the sweep ended before the kill: {(tmp_path / 'killed-sweep.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "2 trials did not finish in time"
            time.sleep(0.5)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    before, interrupted = completed(tmp_path), training(tmp_path)
    assert len(before) == 2 and len(interrupted) == 1

    outcome = sweep_flow(config_path=str(SWEEP_CONFIG), overrides=overrides)

    after = completed(tmp_path)
    assert sorted(after) == [0, 1, 2, 3], "the study holds 4 trials in all: n_trials counts the study, not a run"
    assert len(outcome.ran_now) == 2 and not set(outcome.ran_now) & set(before), "finished trials were redone"
    assert all(after[number] == when for number, when in before.items()), "a finished trial was run again"
    points = {(row["lora.r"], row["training.learning_rate"]) for row in outcome.trials}
    assert points == {(4, 1e-3), (4, 3e-3), (8, 1e-3), (8, 3e-3)}, "the grid was not covered exactly once"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qlora-demo").experiment_id
    children = client.search_runs([experiment], filter_string="tags.`sweep.trial` != ''")
    assert sorted(int(run.data.tags["sweep.trial"]) for run in children) == [0, 1, 2, 3]
    ((number, run_id),) = interrupted.items()
    (resumed,) = [run for run in children if run.data.tags["sweep.trial"] == str(number)]
    assert resumed.info.run_id == run_id, "the interrupted trial's MLflow run was not reopened"
    for run in children:
        assert run.data.tags.get("mlflow.parentRunId"), "a trial's run is not nested under a study run"
        if int(run.data.tags["sweep.trial"]) in outcome.ran_now:  # a reopened run names its new owner
            assert run.data.tags["pid"] == str(os.getpid())
        assert run.info.status == "FINISHED" and run.data.tags["sweep.trial_state"] == "complete"
        assert "training.learning_rate" in run.data.params and "sweep.objective" in run.data.metrics
    parent = client.get_run(outcome.run_id)
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "sweep")}
    assert {"sweep/trials.json", "sweep/optimization_history.png", "sweep/param_importances.png"} <= artifacts
    assert parent.data.metrics["sweep.trials_complete"] == 4

    study = load_study(tmp_path)
    registration = outcome.registration
    version = client.get_model_version(registration.name, registration.version)
    assert version.tags["sweep.study"] == study.study_name
    assert version.tags["sweep.trial"] == str(study.best_trial.number)
    assert version.tags["adapter_sha256"] == study.best_trial.user_attrs["adapter_sha256"]


def test_median_pruner_stops_a_trial_with_a_hopeless_learning_rate(prefect_server, demo_assets, demo_data_slice,
                                                                   tmp_path, mlflow_uri):
    from flows.sweep import sweep_flow

    overrides = sweep_overrides(demo_assets, tmp_path, "sweep.space={training.learning_rate: [3.0e-3, 1.0e-7]}",
                                # seed 1: Optuna's grid order runs 3e-3 first, the one startup trial
                                "sweep.n_trials=2", "sweep.seed=1", "sweep.pruner=median",
                                "sweep.pruner_startup_trials=1",
                                "sweep.register_best=false", data=demo_data_slice)
    outcome = sweep_flow(config_path=str(SWEEP_CONFIG), overrides=overrides)
    states = {row["training.learning_rate"]: row["state"] for row in outcome.trials}
    assert states == {3e-3: "complete", 1e-7: "pruned"}
    (pruned,) = [row for row in outcome.trials if row["state"] == "pruned"]
    summary = (tmp_path / "out" / "trials" / str(pruned["trial"]) / "adapter" / "train_summary.json").read_text()
    assert json.loads(summary)["global_step"] < 12, "a pruned trial must stop training at once"


def test_cv_folds_report_the_mean_and_the_spread(prefect_server, demo_assets, demo_data_slice, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from flows.sweep import sweep_flow

    overrides = sweep_overrides(demo_assets, tmp_path, "sweep.space={training.learning_rate: [3.0e-3]}",
                                "sweep.n_trials=1", "sweep.cv_folds=2", "sweep.pruner=none",
                                "sweep.register_best=false", data=demo_data_slice)
    outcome = sweep_flow(config_path=str(SWEEP_CONFIG), overrides=overrides)
    (trial,) = load_study(tmp_path).trials
    folds = trial.user_attrs["fold_values"]
    assert len(folds) == 2 and folds[0] != folds[1]
    assert trial.value == pytest.approx(statistics.fmean(folds))
    assert trial.user_attrs["spread"] == pytest.approx(statistics.pstdev(folds)) and trial.user_attrs["spread"] > 0
    assert outcome.trials[0]["spread"] == trial.user_attrs["spread"]
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.metrics["sweep.objective"] == pytest.approx(trial.value)
    assert run.data.metrics["sweep.objective_spread"] == pytest.approx(trial.user_attrs["spread"])
    assert {p.name for p in (tmp_path / "out" / "trials" / "0").iterdir()} >= {"fold-0", "fold-1"}


def test_cv_folds_are_hash_stable_and_disjoint(demo_assets, make_config):
    from tasks.data import cv_folds, load_splits

    splits = load_splits(make_config().data)
    first, again = cv_folds(splits, 3), cv_folds(splits, 3)
    assert [f.fingerprint for f in first] == [f.fingerprint for f in again]
    held_out = [{e.prompt_key for e in fold.eval} for fold in first]
    assert sum(len(keys) for keys in held_out) == len({e.prompt_key for e in splits.train + splits.eval})
    for fold in first:
        assert not {e.prompt_key for e in fold.train} & {e.prompt_key for e in fold.eval}


@pytest.mark.parametrize(("space", "named"), [
    ("{lora.rank: [8, 16]}", "sweep.space.lora.rank"),
    ("{lora.r: []}", "sweep.space.lora.r"),
    ("{training.learning_rate: {low: 1.0e-2, high: 1.0e-4}}", "sweep.space.training.learning_rate"),
    ("{lora.r: [8, -4]}", "sweep.space.lora.r"),
    ("{lora.alpha_policy: [standard, huge]}", "sweep.space.lora.alpha_policy"),
])
def test_a_bad_space_is_refused_before_any_training_naming_the_key(demo_assets, tmp_path, space, named):
    from typer.testing import CliRunner

    from configs.schema import ConfigError, load_config
    from flows.cli import app

    overrides = sweep_overrides(demo_assets, tmp_path, f"sweep.space={space}")
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(SWEEP_CONFIG, overrides)
    args = ["sweep", "--config", str(SWEEP_CONFIG)] + [arg for item in overrides for arg in ("--set", item)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and named in " ".join(result.output.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "optuna.db").exists()


def test_the_sweep_deployment_is_weekly_paused_and_loads_the_sweep_flow() -> None:
    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in PrefectYamlModel.model_validate(spec).deployments if d.name == "sweep-weekly"]
    assert load_flow_from_entrypoint(str(REPO_ROOT / deployment.entrypoint)).name == "qlora-sweep"
    assert (REPO_ROOT / deployment.parameters["config_path"]).exists()
    (schedule,) = [s for s in spec["deployments"] if s["name"] == "sweep-weekly"][0]["schedules"]
    assert schedule["active"] is False, "the sweep deployment must be paused by default"
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert len(cron.cron.split()) == 5 and cron.cron.split()[2:4] == ["*", "*"], "not a weekly schedule"


def test_a_config_without_a_sweep_section_is_refused(demo_assets, tmp_path) -> None:
    from configs.schema import ConfigError, load_config
    from tasks.sweep import require_sweep

    config = load_config(REPO_ROOT / "configs" / "demo.yaml", sweep_overrides(demo_assets, tmp_path))
    with pytest.raises(ConfigError, match="no sweep: section"):
        require_sweep(config)


async def task_runs_of(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def overlap(intervals: list[tuple]) -> bool:
    """Do all the (start, end) intervals share a moment: the last start before the first end?"""
    return max(start for start, _ in intervals) < min(end for _, end in intervals)


def test_parallel_trials_run_at_the_same_time(prefect_server, demo_assets, demo_data_slice, tmp_path, mlflow_uri):
    """sweep.parallel: 2 runs both trials at once (their MLflow runs and Prefect task runs overlap), the study
    holds both, and running at once changes neither: two trials of the same values reach the same value."""
    import asyncio

    from mlflow import MlflowClient
    from optuna.trial import TrialState

    from flows.sweep import sweep_flow

    # one choice, two trials: both train the same config, each beside the other
    overrides = sweep_overrides(demo_assets, tmp_path, "sweep.space={training.learning_rate: [3.0e-3]}",
                                "sweep.sampler=random", "sweep.n_trials=2", "sweep.parallel=2", "sweep.pruner=none",
                                "sweep.register_best=false", data=demo_data_slice)
    state = sweep_flow(config_path=str(SWEEP_CONFIG), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert sorted(outcome.ran_now) == [0, 1]

    trials = load_study(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].params == trials[1].params
    assert trials[0].value == trials[1].value, "a trial's result depended on the trial running beside it"

    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert overlap([(run.info.start_time, run.info.end_time) for run in runs]), \
        "the trials' MLflow runs ran one after the other"
    pids = {run.data.tags["pid"] for run in runs}
    assert len(pids) == 2 and str(os.getpid()) not in pids, "the trials did not each run in a process of their own"

    tasks = [t for t in asyncio.run(task_runs_of(state.state_details.flow_run_id)) if t.name.startswith("trial-")]
    assert sorted(t.name for t in tasks) == ["trial-0", "trial-1"]
    assert overlap([(t.start_time, t.end_time) for t in tasks]), "the trials' Prefect task runs ran one after the other"


HOLD_A_TRIAL_SLOT = """
import os, sys, time
from prefect import task
from flows.sweep import trial_runner

@task
def hold(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    with trial_runner(2) as runner:
        runner.submit(hold, {"path": sys.argv[1]}).result()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_parallel_trial_processes_die_with_the_sweep(prefect_server, tmp_path):
    """A sweep killed with -9 (its process alone, as the out-of-memory killer does) takes its parallel trial
    processes with it: left alive they would train on into folders the rerun resumes. The slot here holds a
    sleeping task instead of a trial, to keep the test cheap; the runner is the sweep's own."""
    import psutil

    pid_file = tmp_path / "trial.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": prefect_server}
    sweep = subprocess.Popen([sys.executable, "-c", HOLD_A_TRIAL_SLOT, str(pid_file)], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "sweep.log").open("w"),
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not pid_file.exists() or not pid_file.read_text():
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trial process did not start in time"
            time.sleep(0.2)
        trial = psutil.Process(int(pid_file.read_text()))
        assert trial.pid != sweep.pid and trial.ppid() == sweep.pid, "the trial did not run in a process of its own"
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
        _, alive = psutil.wait_procs([trial], timeout=30)
        assert not alive, "the trial process outlived the killed sweep"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
