"""One run per output folder, registration of a run's own adapter, and runs killed hard.

Real processes throughout: the holder of a lock and the run killed with SIGKILL are subprocesses (the
`qlora` CLI, or a few lines of Python holding the lock), the flow runs under a real Prefect server and
MLflow is a real sqlite store in tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO_CONFIG, DEMO_SLICE_VALIDATION, REPO_ROOT

MODEL_NAME = "demo-qlora-adapter"
# Short, real pipeline runs on a slice of the demo data (conftest demo_data_slice): a few checkpoints, a
# small evaluation, no input example at registration (MLflow would load the model once to predict it).
QUICK_RUN = [*DEMO_SLICE_VALIDATION, "training.max_steps=20", "training.save_steps=5", "training.logging_steps=5",
             "evaluation.max_rows=8", "evaluation.bootstrap_resamples=100", "registry.log_input_example=false",
             "registry.request_max_retries=0"]
STEPS = 20

HOLD_LOCK = """
import sys, time
from configs.schema import TrainingConfig
from tasks.run_lock import hold_output_dir
with hold_output_dir(TrainingConfig(output_dir=sys.argv[1])):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    print("releasing at", time.time(), flush=True)
"""


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
            "HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false", **extra}


def hold_lock_in_subprocess(output_dir: Path, seconds: float = 60) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output_dir), str(seconds)], cwd=REPO_ROOT,
                              env=child_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def stop(process: subprocess.Popen) -> None:
    """SIGKILL a subprocess this test started (and its own process group, when it has one), and reap it."""
    if process.poll() is None:
        try:
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


# --------------------------------------------------------------------------------------------------
# The lock itself (fast: no model)


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path) -> None:
    from configs.schema import TrainingConfig
    from tasks.run_lock import LOCK_FILE, OutputDirInUse, hold_output_dir

    out = tmp_path / "out"
    holder = hold_lock_in_subprocess(out)
    try:
        started = time.monotonic()
        with pytest.raises(OutputDirInUse) as refused, hold_output_dir(TrainingConfig(output_dir=out)):
            pytest.fail("a second holder got the lock")
        message = str(refused.value)
        assert f"PID {holder.pid} on host" in message and str(out) in message
        assert "another training.output_dir" in message and "output_dir_lock=wait" in message
        assert time.monotonic() - started < 5, "fail mode must not wait"

        waiting = TrainingConfig(output_dir=out, output_dir_lock="wait", lock_timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(OutputDirInUse, match=f"PID {holder.pid}.*after waiting"), hold_output_dir(waiting):
            pytest.fail("the lock was taken from a live holder")
        assert time.monotonic() - started >= 1.0
    finally:
        stop(holder)
    # kill -9 of the holder leaves its file behind, but no lock: the next run takes it at once
    assert (out / LOCK_FILE).exists()
    with hold_output_dir(TrainingConfig(output_dir=out)) as held:
        assert json.loads((held / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists(), "the lock file is removed on release"


def test_a_waiting_run_gets_the_folder_when_the_holder_ends(tmp_path) -> None:
    from configs.schema import TrainingConfig
    from tasks.run_lock import hold_output_dir

    out = tmp_path / "out"
    holder = hold_lock_in_subprocess(out, seconds=2)
    try:
        waiting = TrainingConfig(output_dir=out, output_dir_lock="wait", lock_timeout_s=60)
        with hold_output_dir(waiting):
            granted_at = time.time()
        released_at = float(holder.stdout.readline().split()[-1])
        assert granted_at >= released_at, "the lock was granted while its holder still held it"
    finally:
        stop(holder)


def test_the_lock_is_reentrant_in_one_process_and_a_failed_start_leaves_no_trace(tmp_path) -> None:
    from configs.schema import TrainingConfig
    from tasks.run_lock import LOCK_FILE, hold_output_dir

    out = tmp_path / "new" / "out"
    training = TrainingConfig(output_dir=out)
    with pytest.raises(RuntimeError), hold_output_dir(training):
        with hold_output_dir(training):  # the flow holds it and the train stage takes it again
            assert (out / LOCK_FILE).exists()
        assert (out / LOCK_FILE).exists(), "the inner release must not drop the outer hold"
        raise RuntimeError("a config error before anything was written")
    assert not out.exists(), "a run that wrote nothing leaves no folder behind"


def test_the_nightly_deployment_runs_one_at_a_time() -> None:
    """prefect.yaml passes the schema `prefect deploy` reads it with, and limits the deployment to one run."""
    from prefect.cli.deploy._models import ConcurrencyLimitSpec, PrefectYamlModel
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in PrefectYamlModel.model_validate(spec).deployments if d.name == "finetune-nightly"]
    assert isinstance(deployment.concurrency_limit, ConcurrencyLimitSpec), "no concurrency_limit mapping"
    limit = ConcurrencyLimitConfig.model_validate(deployment.concurrency_limit.model_dump(exclude_none=True))
    assert limit.limit == 1 and limit.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


# --------------------------------------------------------------------------------------------------
# Registration checks its own adapter


@pytest.fixture
def tiny_adapter(make_config, mlflow_uri, tmp_path):
    """A real 2-step QLoRA adapter, trained into tmp_path; (config pointed at the sqlite store, result)."""
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.train import train

    config = make_config("training.max_steps=2", "training.save_steps=2", f"registry.tracking_uri={mlflow_uri}",
                         "registry.request_max_retries=0", "registry.log_input_example=false")
    splits = load_splits(config.data)
    splits.eval = splits.eval[:8]
    _, plan = check_gpu(config)
    return config, train(config, plan, splits)


def test_registration_refuses_an_adapter_changed_after_training(tiny_adapter) -> None:
    from tasks.adapter import SUMMARY_FILE, AdapterChanged, adapter_content_hash
    from tasks.register import register_adapter
    from tasks.tracking import client_for
    from tests.conftest import typed_eval_report

    config, result = tiny_adapter
    recorded = json.loads((result.adapter_dir / SUMMARY_FILE).read_text())["adapter_sha256"]
    assert recorded == result.summary.adapter_sha256 == adapter_content_hash(result.adapter_dir)

    weights = result.adapter_dir / "adapter_model.safetensors"
    original = weights.read_bytes()
    tampered = bytearray(original)
    tampered[-1] ^= 0x01  # one bit of the last weight
    weights.write_bytes(bytes(tampered))
    with pytest.raises(AdapterChanged, match="not the one its training.*wrote.*Nothing was registered"):
        register_adapter(config, result.adapter_dir, typed_eval_report())
    client = client_for(config.registry.tracking_uri)
    assert client.search_model_versions(f"name='{MODEL_NAME}'") == []

    # the flow passes its own training's hash: an adapter that is whole but not this run's is refused too
    weights.write_bytes(original)
    with pytest.raises(AdapterChanged, match="not the one this pipeline run's training wrote"):
        register_adapter(config, result.adapter_dir, typed_eval_report(), expected_sha256="0" * 64)
    assert client.search_model_versions(f"name='{MODEL_NAME}'") == []

    registered = register_adapter(config, result.adapter_dir, typed_eval_report(),
                                  expected_sha256=result.summary.adapter_sha256)
    version = client.get_model_version(MODEL_NAME, registered.version)
    assert version.tags["adapter_sha256"] == recorded


# --------------------------------------------------------------------------------------------------
# Orphaned MLflow runs


def test_only_runs_of_dead_processes_on_this_machine_are_marked_killed(make_config, mlflow_uri) -> None:
    from tasks.orphan_runs import mark_orphans_killed, process_tags
    from tasks.tracking import client_for, ensure_experiment

    config = make_config(f"registry.tracking_uri={mlflow_uri}")
    client = client_for(mlflow_uri)
    experiment_id = ensure_experiment(client, config.registry.experiment_name, mlflow_uri)
    mine = process_tags()
    dead_child = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE)
    dead_pid = dead_child.communicate()[0].strip().decode()

    def run_with(**tags: str) -> str:
        return client.create_run(experiment_id, tags={**mine, **tags}).info.run_id

    dead = run_with(pid=dead_pid)
    alive = run_with()  # this test's own process
    reused = run_with(process_started=repr(float(mine["process_started"]) - 3600))  # this PID, an older process
    elsewhere = run_with(host="another-machine", pid=dead_pid)
    other_namespace = run_with(pid=dead_pid, pid_namespace="another-container")
    finished = run_with(pid=dead_pid)
    client.set_terminated(finished, "FINISHED")

    killed = mark_orphans_killed(client, experiment_id, found_by="sweeper")
    assert sorted(killed) == sorted([dead, reused])
    status = {run_id: client.get_run(run_id).info.status
              for run_id in (dead, alive, reused, elsewhere, other_namespace, finished)}
    assert status == {dead: "KILLED", alive: "RUNNING", reused: "KILLED", elsewhere: "RUNNING",
                      other_namespace: "RUNNING", finished: "FINISHED"}
    assert client.get_run(dead).data.tags["killed_found_by"] == "sweeper"


# --------------------------------------------------------------------------------------------------
# Whole pipeline runs as real processes


@pytest.fixture
def pipeline_overrides(demo_assets, demo_data_slice, mlflow_uri, tmp_path) -> Callable[..., list[str]]:
    """Overrides for a quick pipeline run into tmp_path/out, tracked in the test's sqlite store."""
    def overrides(*extra: str) -> list[str]:
        return [f"data.path={demo_data_slice}", f"model.name_or_path={demo_assets.model_dir.resolve()}",
                f"training.output_dir={tmp_path / 'out'}", f"registry.tracking_uri={mlflow_uri}", *QUICK_RUN, *extra]

    return overrides


def start_qlora_run(overrides: list[str], log: Path) -> subprocess.Popen:
    """`qlora run` in its own process (and process group), reporting to this module's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    args = [sys.executable, "-m", "flows.cli", "run", "--config", str(DEMO_CONFIG)]
    for item in overrides:
        args += ["--set", item]
    with log.open("w") as sink:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=child_env(PREFECT_API_URL=PREFECT_API_URL.value()),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run exited ({process.returncode}) before the condition held:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached in {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def saved_steps(checkpoint_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in checkpoint_dir.glob("checkpoint-*/trainer_state.json"))


async def task_run_count(flow_run_id) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return len(runs)


async def flow_run_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).state.type.value


def test_two_runs_on_one_output_folder_the_second_is_refused_the_first_registers_its_own_adapter(
        prefect_server, pipeline_overrides, mlflow_uri, tmp_path) -> None:
    import mlflow

    from flows.finetune import finetune_flow
    from tasks.adapter import CONFIG_FILE, SUMMARY_FILE, adapter_content_hash
    from tasks.checkpoints import CHECKPOINT_DIRNAME, RUN_FILE
    from tasks.run_lock import LOCK_FILE, OutputDirInUse, read_holder

    out, log = tmp_path / "out", tmp_path / "run1.log"
    first = start_qlora_run(pipeline_overrides("training.learning_rate=3e-3"), log)
    try:
        wait_for(lambda: bool(saved_steps(out / CHECKPOINT_DIRNAME)), first, log)
        holder = read_holder(out / LOCK_FILE)
        assert holder is not None and holder.pid == first.pid and holder.flow_run_id

        second = finetune_flow(config_path=str(DEMO_CONFIG), return_state=True,
                               overrides=pipeline_overrides("training.learning_rate=1e-3"))
        assert second.is_failed()
        refusal = second.result(raise_on_failure=False)
        assert isinstance(refusal, OutputDirInUse)
        assert f"PID {first.pid}" in str(refusal) and f"Prefect flow run {holder.flow_run_id}" in str(refusal)
        assert asyncio.run(flow_run_state(holder.flow_run_id)) == "RUNNING"
        # refused at once: no stage ran, and nothing of the holder's was moved aside or taken over
        assert asyncio.run(task_run_count(second.state_details.flow_run_id)) == 0
        assert not list(out.glob(f"{CHECKPOINT_DIRNAME}.stale-*"))
        chain = json.loads((out / CHECKPOINT_DIRNAME / RUN_FILE).read_text())["runs"]
        assert [entry["pid"] for entry in chain] == [first.pid]

        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        stop(first)

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    (version,) = client.search_model_versions(f"name='{MODEL_NAME}'")
    adapter = out / "adapter"
    assert version.tags["adapter_sha256"] == adapter_content_hash(adapter)
    assert version.tags["adapter_sha256"] == json.loads((adapter / SUMMARY_FILE).read_text())["adapter_sha256"]
    assert yaml.safe_load((adapter / CONFIG_FILE).read_text())["training"]["learning_rate"] == 3e-3
    (run,) = client.search_runs([client.get_experiment_by_name("qlora-demo").experiment_id])
    assert run.info.run_id == version.run_id and run.data.tags["pid"] == str(first.pid)
    assert run.data.tags["adapter_sha256"] == version.tags["adapter_sha256"]


def test_a_run_killed_hard_is_marked_killed_and_the_next_run_resumes_naming_it(
        prefect_server, pipeline_overrides, mlflow_uri, tmp_path) -> None:
    import mlflow

    from flows.finetune import finetune_flow
    from tasks.checkpoints import CHECKPOINT_DIRNAME

    out, log = tmp_path / "out", tmp_path / "killed.log"
    overrides = pipeline_overrides()
    victim = start_qlora_run(overrides, log)
    try:
        wait_for(lambda: bool(saved_steps(out / CHECKPOINT_DIRNAME)), victim, log)
    finally:
        stop(victim)  # SIGKILL: no handler, no finally, no chance to end its MLflow run
    assert victim.returncode == -signal.SIGKILL
    resume_step = saved_steps(out / CHECKPOINT_DIRNAME)[-1]

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = client.get_experiment_by_name("qlora-demo").experiment_id
    (orphan,) = client.search_runs([experiment_id])
    assert orphan.info.status == "RUNNING" and orphan.data.tags["pid"] == str(victim.pid)

    state = finetune_flow(config_path=str(DEMO_CONFIG), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()

    killed = client.get_run(orphan.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["killed_found_by"] == outcome.run_id
    resumed = client.get_run(outcome.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from_run"] == orphan.info.run_id
    assert resumed.data.tags["resumed_from_step"] == str(resume_step)
    assert resumed.data.metrics["train.global_step"] == STEPS
