"""The hyper-parameter search flow `qlora-sweep`: validate -> load data -> check GPU -> trials -> best -> register.

The flow only wires; the search logic is `tasks.sweep` (Optuna), the stages are the nightly flow's.
- The data contract, the data load and the GPU check are the nightly flow's own tasks, run once.
- Each trial is a Prefect task (`trial-<n>` in the UI), retried once after a crash: training resumes
  from the trial's checkpoints and its MLflow child run is reopened. `sweep.parallel` trials run at a
  time (`trial_runner`, a window of that many futures): one runs in the flow's own process; several
  run each in a process of their own (Prefect's ProcessPoolTaskRunner), because two trainings in one
  process share torch's process-global random generator and would each change the other's result.
  Each trial carries the tag `qlora-sweep-trial`, so a tag concurrency limit (`prefect
  concurrency-limit create qlora-sweep-trial N`) caps them across flow runs.
- With `sweep.trial_deployment` set, each trial is instead a flow run of that deployment (the
  `qlora-sweep-trial` flow below, `sweep-trial` in prefect.yaml), run by whichever worker of its work
  pool picks it up: with one worker `--limit 1` per GPU machine (or a Kubernetes pool whose jobs ask
  for one GPU), one trial per GPU node. `sweep.parallel` still caps how many are in flight. The flow
  runs are the sweep's subflows; a trial flow run checks its node's GPU, loads the data (refusing
  other data than the sweep's), runs the trial and leaves its outcome in the study, where the sweep
  reads it once the flow run is final (`RemoteTrials`). Storage, MLflow, data and output folder must
  be reachable from every node. A sweep killed meanwhile leaves its trial flow runs running on their
  nodes (they tell the study themselves); its rerun waits for a trial whose flow run still runs
  rather than launching it again. Cancelling the sweep's flow run cancels them as well (Prefect
  cancels the subflows of a cancelled flow run); the rerun launches those trials again.
- New trials are asked from the study only when a slot frees, so the sampler (TPE) sees every
  finished trial; trials a killed sweep left running are run first, under their own numbers.
- The study's summary (trials table, Optuna plots) goes to the parent MLflow run and the table to a
  Prefect table artifact. The best trial's adapter then goes through the nightly flow's evaluation
  (against the champion), promotion gate and registry, tagged with the study and trial.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from configs.schema import ConfigError, PipelineConfig, load_config
from flows.finetune import (
    _not_a_config_problem,
    _tracking_unreachable,
    check_gpu_task,
    load_data_task,
    registration_markdown,
    validate_data_task,
)
from tasks.data import DatasetSplits
from tasks.distributed import die_with_parent
from tasks.evaluate import EvalReport, evaluate_adapter
from tasks.gpu import TrainingPlan
from tasks.register import RegistrationResult, register_adapter
from tasks.registry import champion_adapter_for
from tasks.run_lock import hold_output_dir
from tasks.sweep import (
    TrialOutcome,
    add_trial_flow_run,
    ask_trial,
    best_adapter,
    failed_outcome,
    interrupted_trials,
    launch_key,
    log_study,
    open_study,
    record_outcome,
    remote_outcome,
    require_same_data,
    require_sweep,
    run_remote_trial,
    run_trial,
    storage_url,
    study_name,
    trial_flow_runs,
    trial_parameters,
    trials_to_add,
)
from tasks.tracking import PipelineTracker
from tasks.validate import ValidationResult

FLOW_NAME = "qlora-sweep"
TRIAL_FLOW_NAME = "qlora-sweep-trial"
TRIAL_TAG = "qlora-sweep-trial"
# How often the sweep asks the Prefect API for the states of its trials' flow runs (sweep.trial_deployment).
FLOW_RUN_POLL_S = 2.0


@task(name="sweep-trial", task_run_name="trial-{number}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=_not_a_config_problem, tags=[TRIAL_TAG])
def trial_task(config: PipelineConfig, storage: str, number: int, parent: PipelineTracker, plan: TrainingPlan,
               splits: DatasetSplits, remote: bool = False) -> TrialOutcome:
    """One trial; `remote` (in a trial flow run on a work pool node): the outcome is also left in the study."""
    outcome = (run_remote_trial if remote else run_trial)(config, storage, number, parent, plan, splits)
    get_run_logger().info("trial %d %s: %s", number, outcome.state, outcome.value)
    return outcome


@flow(name=TRIAL_FLOW_NAME, flow_run_name="trial-{number}", log_prints=False)
def sweep_trial_flow(config: dict[str, Any], storage: str, number: int, parent_run_id: str, tracking_uri: str,
                     data_fingerprint: str) -> dict[str, Any]:
    """One trial of a sweep, on the node that picked up this flow run (`sweep.trial_deployment`).

    The parameters are `tasks.sweep.trial_parameters` (JSON: the flow run is created through the API). The
    node checks its own GPU, loads the data and refuses data other than the sweep's; the trial task then
    trains and evaluates (retried once, resuming from its checkpoints, as on the sweep's own machine) and
    leaves its outcome in the study, which is how the sweep learns it."""
    resolved = PipelineConfig.model_validate(config)
    splits = load_data_task(resolved)
    require_same_data(splits, data_fingerprint)
    plan = check_gpu_task(resolved, None)
    outcome = trial_task(resolved, storage, number, PipelineTracker(parent_run_id, tracking_uri), plan, splits,
                         remote=True)
    return outcome.to_dict()


def trial_runner(parallel: int) -> TaskRunner:
    """Where the trials run: one at a time in the flow's own process, or `parallel` at a time each in a
    process of its own. Not in threads: torch's random generator (LoRA initialisation, the order of the
    training batches) is one per process, so two trials training in threads of one process would draw
    from each other's stream, and the same values would give another result on every run.

    The trial processes die with the flow's (`die_with_parent`): a sweep killed with -9 must not leave
    trials training on, holding their folders and the GPU, while its rerun resumes them. (The kernel
    watches the thread that started a process: Prefect starts its workers from the runner's resolver
    threads, which live as long as the runner; tests/test_sweep.py kills a parallel sweep to check.)"""
    if parallel == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    return ProcessPoolTaskRunner(max_workers=parallel, initializer=die_with_parent)


def live_trial_flow_run(study: Any, number: int) -> Any:
    """The flow run a trial was last launched as on a work pool (`sweep.trial_deployment`) when it has not
    ended yet (a killed sweep's trial, still training on its node), else None."""
    from prefect.client.orchestration import get_client

    launched = trial_flow_runs(study, number)
    if not launched:
        return None
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(launched[-1]))
    return run if run.state is not None and not run.state.is_final() else None


def refuse_trials_live_elsewhere(study: Any, resumed: list[int]) -> None:
    """Before a sweep without `sweep.trial_deployment` resumes trials locally: a trial still running as a flow
    run on a work pool would be trained twice, by both, into the same folder and MLflow run."""
    for number in resumed:
        run = live_trial_flow_run(study, number)
        if run is not None:
            raise ConfigError(
                f"trial {number} of study {study.study_name} still runs as flow run {run.name} ({run.id}, "
                f"{run.state.name}) of a trial deployment, and sweep.trial_deployment is not set: resuming it "
                "here would train it twice. Run the sweep with sweep.trial_deployment as before (it waits for "
                "that flow run), or let the flow run end (or cancel it) first")


class LocalTrials:
    """Trials as Prefect tasks on the sweep's own machine (`trial_runner`): `start` submits one, `next_done`
    waits for the first to end; a trial that failed after its retry becomes a FAIL outcome."""

    def __init__(self, parallel: int, parameters: Callable[[int], dict[str, Any]]) -> None:
        self.runner, self.parameters = trial_runner(parallel), parameters
        self.running: dict[Any, int] = {}

    def __enter__(self) -> LocalTrials:
        self.runner.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.runner.__exit__(*exc_info)

    def __len__(self) -> int:
        return len(self.running)

    def start(self, number: int) -> None:
        self.running[self.runner.submit(trial_task, self.parameters(number))] = number

    def next_done(self) -> TrialOutcome:
        done = next(as_completed(list(self.running)))
        number = self.running.pop(done)
        try:
            return done.result()
        except Exception as exc:
            return failed_outcome(number, f"{type(exc).__name__}: {exc}")


class RemoteTrials:
    """Trials as flow runs of `sweep.trial_deployment` (`run_deployment`, linked as the sweep's subflows).

    `start` launches one and records the flow run on the trial, unless the trial already has an outcome
    (it ended while no sweep watched) or a flow run that still runs (a killed sweep's): that one is waited
    for, not launched twice. `next_done` polls the flow runs until one is final and returns the outcome
    its trial stored, or, when it stored none (failed, crashed, cancelled), a FAIL with the state's message.
    Leaving the block leaves flow runs in flight to their nodes."""

    def __init__(self, deployment: str, study: Any, parameters: Callable[[int], dict[str, Any]]) -> None:
        self.deployment, self.study, self.parameters = deployment, study, parameters
        self.running: dict[UUID, int] = {}
        self.ended: list[TrialOutcome] = []

    def __enter__(self) -> RemoteTrials:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def __len__(self) -> int:
        return len(self.running) + len(self.ended)

    def start(self, number: int) -> None:
        from prefect.deployments import run_deployment

        logger = get_run_logger()
        stored = remote_outcome(self.study, number)
        if stored is not None:
            self.ended.append(stored)
            return
        previous = live_trial_flow_run(self.study, number)
        if previous is not None:
            logger.info("trial %d: its flow run %s is still %s; waiting for it", number, previous.name,
                        previous.state.name)
            self.running[previous.id] = number
            return
        flow_run = run_deployment(self.deployment, parameters=self.parameters(number), timeout=0,
                                  flow_run_name=f"trial-{number}", tags=[TRIAL_TAG],
                                  idempotency_key=launch_key(self.study, number))
        add_trial_flow_run(self.study, number, str(flow_run.id))
        logger.info("trial %d: flow run %s of %s", number, flow_run.id, self.deployment)
        self.running[flow_run.id] = number

    def next_done(self) -> TrialOutcome:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        if self.ended:
            return self.ended.pop(0)
        with get_client(sync_client=True) as client:
            while True:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(self.running))))
                final = [run for run in runs if run.state is not None and run.state.is_final()]
                if final:
                    break
                time.sleep(FLOW_RUN_POLL_S)
        run = final[0]
        number = self.running.pop(run.id)
        return remote_outcome(self.study, number) or failed_outcome(
            number, f"flow run {run.name} ({run.id}) ended {run.state.name}: {run.state.message}")


@task(name="sweep-summary", cache_policy=NO_CACHE, retries=0)
def summary_task(config: PipelineConfig, storage: str, tracker: PipelineTracker) -> list[dict[str, Any]]:
    table = log_study(tracker, open_study(config, storage))
    create_table_artifact(table=table, key="sweep-trials", description=f"trials of study {study_name(config)}")
    return table


@task(name="register-best", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 30, 120],
      retry_condition_fn=_tracking_unreachable)
def register_best_task(config: PipelineConfig, storage: str, plan: TrainingPlan, splits: DatasetSplits,
                       validation: ValidationResult, tracker: PipelineTracker) -> RegistrationResult:
    study = open_study(config, storage)
    number, best_config, adapter_dir, sha256 = best_adapter(config, study, plan, splits)
    report: EvalReport = evaluate_adapter(best_config, plan, splits, adapter_dir,
                                          champion_adapter=champion_adapter_for(best_config))
    create_markdown_artifact(markdown=report.markdown(), key="best-trial-evaluation",
                             description=f"evaluation of trial {number}, the study's best")
    tracker.log_evaluation(report)
    result = register_adapter(best_config, adapter_dir, report, validation=validation, plan=plan, tracker=tracker,
                              expected_sha256=sha256 or None,
                              extra_tags={"sweep.study": study.study_name, "sweep.trial": str(number),
                                          "sweep.objective": f"{require_sweep(config).objective}="
                                                             f"{study.best_value:.6g}"})
    create_markdown_artifact(markdown=registration_markdown(result, tracker.uri), key="registration",
                             description="MLflow model registry outcome of the best trial")
    return result


@dataclass
class SweepOutcome:
    study_name: str
    storage: str
    run_id: str
    trials: list[dict[str, Any]]
    ran_now: list[int]
    registration: RegistrationResult | None


@flow(name=FLOW_NAME, log_prints=False)
def sweep_flow(config_path: str = "configs/demo-sweep.yaml", overrides: list[str] | None = None) -> SweepOutcome:
    """Search hyper-parameters with Optuna, each trial a real train + evaluate; register the best."""
    config = load_config(config_path, overrides or [])
    sweep = require_sweep(config)
    with hold_output_dir(config.training), PipelineTracker.start(
            config, run_name=f"sweep-{study_name(config)}", tags={"sweep.study": study_name(config)}) as tracker:
        validation = validate_data_task(config, tracker)
        splits = load_data_task(config)
        plan = check_gpu_task(config, tracker)
        storage = storage_url(config, tracker.uri)
        study = open_study(config, storage)
        tracker.set_tags({"sweep.storage": storage, "sweep.sampler": sweep.sampler, "sweep.pruner": sweep.pruner})
        resumed, new_left, ran_now = interrupted_trials(study), trials_to_add(study, sweep), []
        trials: LocalTrials | RemoteTrials
        if sweep.trial_deployment:
            trials = RemoteTrials(sweep.trial_deployment, study, lambda number: trial_parameters(
                config, storage, number, tracker, splits.fingerprint))
        else:
            refuse_trials_live_elsewhere(study, resumed)
            trials = LocalTrials(sweep.parallel, lambda number: {
                "config": config, "storage": storage, "number": number, "parent": tracker, "plan": plan,
                "splits": splits})
        with trials:
            while resumed or new_left or len(trials):
                while len(trials) < sweep.parallel and (resumed or new_left):
                    if resumed:
                        number = resumed.pop(0)
                    else:
                        number, new_left = ask_trial(study, sweep), new_left - 1
                    trials.start(number)
                    ran_now.append(number)
                # a trial that failed (after its retry) is recorded FAIL; the sweep goes on
                record_outcome(study, trials.next_done())
        table = summary_task(config, storage, tracker)
        registration = register_best_task(config, storage, plan, splits, validation, tracker) \
            if sweep.register_best else None
    return SweepOutcome(study_name=study_name(config), storage=storage, run_id=tracker.run_id, trials=table,
                        ran_now=ran_now, registration=registration)
