"""`sweep.trial_deployment`: trials as flow runs of the `qlora-sweep-trial` deployment on a work pool.

Real components throughout: the shared temporary Prefect server, a process work pool created through the
client, the trial deployment created from this checkout (`from_source` + `deploy`, as `prefect deploy` makes
`sweep-trial` from prefect.yaml), two real workers `prefect worker start --limit 1` (one per "GPU node"),
real Optuna sqlite studies, real sqlite MLflow stores and the tiny demo trials of tests/test_sweep.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import REPO_ROOT
from tests.test_sweep import SWEEP_CONFIG, load_study, sweep_overrides

WORKERS = 2


async def _create_process_pool(pool: str) -> None:
    """A process work pool with Prefect's default process job template (what `prefect work-pool create --type
    process` makes)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(
            name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))


def _flow_runs(ids: list[str]) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(i) for i in ids])))


def _deployment_runs(deployment_id: uuid.UUID) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


@pytest.fixture(scope="module")
def trial_deployment(prefect_server, tmp_path_factory) -> Iterator[tuple[str, uuid.UUID]]:
    """('qlora-sweep-trial/<name>', deployment id) on a fresh process pool served by WORKERS workers, each
    `--limit 1` as on a GPU node; the workers (and the flow runs they started) are killed afterwards."""
    from flows.sweep import sweep_trial_flow

    pool = f"test-gpu-pool-{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_process_pool(pool))
    name = f"sweep-trial-{pool}"
    deployment_id = sweep_trial_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/sweep.py:sweep_trial_flow") \
        .deploy(name=name, work_pool_name=pool, print_next_steps=False)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": prefect_server,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    logs = tmp_path_factory.mktemp("workers")
    workers = [subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "1",
         "--name", f"node-{index}"],
        cwd=REPO_ROOT, env=env, stdout=(logs / f"node-{index}.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True) for index in range(WORKERS)]
    try:
        yield f"qlora-sweep-trial/{name}", deployment_id
    finally:
        for worker in workers:  # the worker's session holds the flow-run processes it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def _sweep_command(overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "flows.cli", "sweep", "--config", str(SWEEP_CONFIG)]
    for item in overrides:
        command += ["--set", item]
    return command


def test_trials_run_as_flow_runs_on_the_pool_and_a_killed_sweep_waits_for_them(
        prefect_server, trial_deployment, demo_assets, demo_data_slice, tmp_path, mlflow_uri):
    """A 2-trial sweep with parallel 2 launches both trials as flow runs of the deployment, which the two
    workers run at once; the sweep is killed (-9) while they train. They finish on their nodes regardless, and
    the rerun waits for the same two flow runs instead of launching the trials again: each trial has exactly
    one flow run, Completed, linked to the sweep as a subflow; both trials are COMPLETE with values, both
    MLflow child runs are nested under the study run and ran in other processes; the best is registered."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    from flows.sweep import sweep_flow
    from tasks.sweep import FLOW_RUNS_ATTR

    name, deployment_id = trial_deployment
    overrides = sweep_overrides(demo_assets, tmp_path, "sweep.space={training.learning_rate: [1.0e-3, 3.0e-3]}",
                                "sweep.sampler=grid", "sweep.n_trials=2", "sweep.parallel=2", "sweep.pruner=none",
                                f"sweep.trial_deployment={name}", data=demo_data_slice)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": prefect_server}
    log = tmp_path / "killed-sweep.log"
    sweep = subprocess.Popen(_sweep_command(overrides), cwd=REPO_ROOT, env=env, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while sum(run.state.is_running() for run in _deployment_runs(deployment_id)
                  if run.name in ("trial-0", "trial-1")) < 2:
            assert sweep.poll() is None, f"the sweep ended before the kill: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the two trial flow runs did not both start in time"
            time.sleep(0.5)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    killed_at = time.time()
    launched = {t.number: t.user_attrs[FLOW_RUNS_ATTR] for t in load_study(tmp_path).get_trials()}
    assert sorted(launched) == [0, 1] and all(len(ids) == 1 for ids in launched.values())

    state = sweep_flow(config_path=str(SWEEP_CONFIG), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()

    trials = load_study(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert all(t.value is not None for t in trials)
    assert {t.number: t.user_attrs[FLOW_RUNS_ATTR] for t in trials} == launched, "a trial was launched again"
    runs = _flow_runs([ids[0] for ids in launched.values()])
    assert len(runs) == 2 and all(run.deployment_id == deployment_id for run in runs)
    assert all(run.state.is_completed() for run in runs), [run.state for run in runs]
    assert sorted(outcome.ran_now) == [0, 1], "the rerun did not take over the interrupted trials"
    assert max(run.end_time.timestamp() for run in runs) > killed_at, "the trials had ended before the rerun"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # each flow run hangs under a task run of a sweep flow run
        parents = {client.read_task_run(run.parent_task_run_id).flow_run_id for run in runs}
        assert {client.read_flow_run(parent).flow_id for parent in parents} == \
            {client.read_flow_run(state.state_details.flow_run_id).flow_id}

    client = MlflowClient(tracking_uri=mlflow_uri)
    children = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    assert all(run.info.status == "FINISHED" and run.data.tags.get("mlflow.parentRunId") for run in children)
    assert all(run.data.tags["sweep.trial_state"] == "complete" for run in children)
    pids = {run.data.tags["pid"] for run in children}
    assert len(pids) == 2 and str(os.getpid()) not in pids, "the trials did not run in the workers' flow runs"

    best = load_study(tmp_path).best_trial
    version = client.get_model_version(outcome.registration.name, outcome.registration.version)
    assert version.tags["sweep.trial"] == str(best.number)
    assert version.tags["adapter_sha256"] == best.user_attrs["adapter_sha256"]


def test_a_trial_whose_flow_run_fails_on_its_node_is_recorded_failed_and_the_sweep_goes_on(
        prefect_server, trial_deployment, demo_assets, demo_data_slice, tmp_path, mlflow_uri):
    """A trial whose model cannot be loaded on the node: its flow run ends Failed without an outcome, the
    sweep records the trial FAIL with the flow run's reason and goes on to the next trial and its summary."""
    from optuna.trial import TrialState

    from flows.sweep import sweep_flow
    from tasks.sweep import FLOW_RUNS_ATTR

    name, deployment_id = trial_deployment
    missing = tmp_path / "no-such-model"
    overrides = sweep_overrides(demo_assets, tmp_path, f"sweep.space={{model.name_or_path: [{missing}]}}",
                                "sweep.sampler=random", "sweep.n_trials=2", "sweep.parallel=1", "sweep.pruner=none",
                                "sweep.register_best=false", f"sweep.trial_deployment={name}", data=demo_data_slice)
    outcome = sweep_flow(config_path=str(SWEEP_CONFIG), overrides=overrides)

    trials = load_study(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL], "the sweep stopped at the failure"
    assert [row["state"] for row in outcome.trials] == ["fail", "fail"]
    runs = _flow_runs([t.user_attrs[FLOW_RUNS_ATTR][0] for t in trials])
    assert len(runs) == 2 and all(run.state.is_failed() and run.deployment_id == deployment_id for run in runs)
    for trial in trials:
        assert trial.user_attrs["error"].startswith(f"flow run trial-{trial.number} ("), trial.user_attrs["error"]
        assert "Failed" in trial.user_attrs["error"] and str(missing) in trial.user_attrs["error"]
    assert outcome.trials[0]["error"] == trials[0].user_attrs["error"]


def test_a_node_with_other_data_than_the_sweep_refuses_the_trial(prefect_server, demo_assets, demo_data_slice,
                                                                   tmp_path) -> None:
    """The data file changed after the sweep loaded it (as a node with a stale copy would see it): the trial
    flow compares what it loads with the sweep's fingerprint and refuses before any GPU check or training."""
    from configs.schema import load_config
    from flows.sweep import sweep_trial_flow
    from tasks.data import DataError, load_splits
    from tasks.sweep import trial_parameters
    from tasks.tracking import PipelineTracker

    data = tmp_path / "data.jsonl"
    rows = demo_data_slice.read_text().splitlines()
    data.write_text("\n".join(rows) + "\n")
    config = load_config(SWEEP_CONFIG, sweep_overrides(demo_assets, tmp_path, data=data))
    parameters = trial_parameters(config, f"sqlite:///{tmp_path / 'optuna.db'}", 0,
                                  PipelineTracker("unused", f"sqlite:///{tmp_path / 'mlflow.db'}"),
                                  load_splits(config.data).fingerprint)
    data.write_text("\n".join(rows[1:]) + "\n")  # one row fewer
    with pytest.raises(DataError, match=r"is not the sweep's .*same data\.path"):
        sweep_trial_flow(**parameters)
    assert not (tmp_path / "out").exists() and not (tmp_path / "optuna.db").exists()


def test_a_sweep_without_the_trial_deployment_refuses_to_resume_a_trial_still_running_on_a_node(
        prefect_server, demo_assets, demo_data_slice, tmp_path, mlflow_uri) -> None:
    """A killed sweep's trial still runs as a flow run on the work pool; the sweep is run again without
    `sweep.trial_deployment`: it must not train that trial a second time on its own machine, and says what to do."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from configs.schema import ConfigError, load_config
    from flows.sweep import sweep_flow
    from tasks.sweep import add_trial_flow_run, ask_trial, open_study, require_sweep, trial_dir

    @flow(name="stand-in-for-a-trial-on-a-node")
    def on_a_node() -> None:
        """Never run: its flow run is only put in state Running, as a trial training on a node is."""

    overrides = sweep_overrides(demo_assets, tmp_path, "sweep.space={training.learning_rate: [1.0e-3, 3.0e-3]}",
                                "sweep.sampler=grid", "sweep.n_trials=2", "sweep.pruner=none", data=demo_data_slice)
    config = load_config(SWEEP_CONFIG, overrides)
    study = open_study(config, f"sqlite:///{tmp_path / 'optuna.db'}")
    number = ask_trial(study, require_sweep(config))  # RUNNING, as a killed sweep leaves it
    with get_client(sync_client=True) as client:
        live = client.create_flow_run(on_a_node, name=f"trial-{number}", state=Running())
    add_trial_flow_run(study, number, str(live.id))

    with pytest.raises(ConfigError, match=rf"trial {number} of study .* still runs as flow run trial-{number} "
                                          rf"\({live.id}, Running\).*sweep.trial_deployment"):
        sweep_flow(config_path=str(SWEEP_CONFIG), overrides=overrides)
    assert not trial_dir(config, number).exists(), "the trial was trained here as well"


def test_the_sweep_trial_deployment_is_the_trial_flow_on_the_gpu_pool_unscheduled() -> None:
    """prefect.yaml's `sweep-trial` passes the schema `prefect deploy` reads, loads the trial flow, has no
    schedule (the sweep starts its runs) and is what a sweep names in sweep.trial_deployment."""
    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    from configs.schema import load_config

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in PrefectYamlModel.model_validate(spec).deployments if d.name == "sweep-trial"]
    flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment.entrypoint))
    (raw,) = [d for d in spec["deployments"] if d["name"] == "sweep-trial"]
    assert raw["work_pool"]["name"] == "qlora-gpu-pool" and not raw.get("schedules")
    name = f"{flow.name}/{deployment.name}"
    assert load_config(SWEEP_CONFIG, [f"sweep.trial_deployment={name}"]).sweep.trial_deployment == name
