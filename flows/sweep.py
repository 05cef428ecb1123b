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
- New trials are asked from the study only when a slot frees, so the sampler (TPE) sees every
  finished trial; trials a killed sweep left running are run first, under their own numbers.
- The study's summary (trials table, Optuna plots) goes to the parent MLflow run and the table to a
  Prefect table artifact. The best trial's adapter then goes through the nightly flow's evaluation
  (against the champion), promotion gate and registry, tagged with the study and trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from configs.schema import PipelineConfig, load_config
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
    ask_trial,
    best_adapter,
    failed_outcome,
    interrupted_trials,
    log_study,
    open_study,
    record_outcome,
    require_sweep,
    run_trial,
    storage_url,
    study_name,
    trials_to_add,
)
from tasks.tracking import PipelineTracker
from tasks.validate import ValidationResult

FLOW_NAME = "qlora-sweep"
TRIAL_TAG = "qlora-sweep-trial"


@task(name="sweep-trial", task_run_name="trial-{number}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=_not_a_config_problem, tags=[TRIAL_TAG])
def trial_task(config: PipelineConfig, storage: str, number: int, parent: PipelineTracker, plan: TrainingPlan,
               splits: DatasetSplits) -> TrialOutcome:
    outcome = run_trial(config, storage, number, parent, plan, splits)
    get_run_logger().info("trial %d %s: %s", number, outcome.state, outcome.value)
    return outcome


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
        running: dict[Any, int] = {}
        with trial_runner(sweep.parallel) as runner:
            while resumed or new_left or running:
                while len(running) < sweep.parallel and (resumed or new_left):
                    if resumed:
                        number = resumed.pop(0)
                    else:
                        number, new_left = ask_trial(study, sweep), new_left - 1
                    parameters = {"config": config, "storage": storage, "number": number, "parent": tracker,
                                  "plan": plan, "splits": splits}
                    running[runner.submit(trial_task, parameters)] = number
                    ran_now.append(number)
                done = next(as_completed(list(running)))
                number = running.pop(done)
                try:  # a trial that failed after its retries is recorded FAIL; the sweep goes on
                    outcome = done.result()
                except Exception as exc:
                    outcome = failed_outcome(number, f"{type(exc).__name__}: {exc}")
                record_outcome(study, outcome)
        table = summary_task(config, storage, tracker)
        registration = register_best_task(config, storage, plan, splits, validation, tracker) \
            if sweep.register_best else None
    return SweepOutcome(study_name=study_name(config), storage=storage, run_id=tracker.run_id, trials=table,
                        ran_now=ran_now, registration=registration)
