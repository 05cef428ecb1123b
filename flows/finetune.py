"""The nightly fine-tuning flow: validate -> load data -> check GPU -> train -> evaluate -> register.

The flow only wires stages. Each task is a thin wrapper over a plain function in `tasks/`, adding
what Prefect is for: retries where a retry can help, a deliberate cache policy, and artifacts that
tell the run's story in the Prefect UI. The flow creates the run's `PipelineTracker` once (one MLflow
run; it ends FINISHED, or FAILED when any stage fails) and hands it to each stage, and passes typed
values on: the data is read into `DatasetSplits` once, after the contract passed, and training and
evaluation get those splits. Choices, stage by stage:

- validate: the suite run is cached on the content hash of the data files and the settings the checks depend on,
  so an unchanged dataset is not re-validated every night; never retried (bad data stays bad).
- load data: never cached (the splits are passed in memory), never retried.
- check GPU: never cached (free memory changes), never retried.
- train: retried once; `tasks.train.train` resumes from the last checkpoint in the output dir, so a
  retry continues where the crash left off instead of starting again. Config errors are not retried.
- evaluate: not cached, retried once (a transient OOM or I/O error may pass).
- register: retried on connection errors to the tracking server, with backoff; a version is created
  only after all checks and the aliases move last, so a retry never finds a half-registered model.
  It registers only the adapter this run's training wrote (its content hash is passed along).

The whole pipeline run holds `training.output_dir` (`tasks.run_lock.hold_output_dir`): a second run
on the same folder is refused before it touches anything there, or waits (`training.output_dir_lock`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from configs.schema import ConfigError, PipelineConfig, load_config
from tasks.data import DataError, DatasetSplits, is_local_path, load_splits
from tasks.evaluate import EvalReport, evaluate_adapter
from tasks.gpu import TrainingPlan, check_gpu
from tasks.register import RegistrationResult, register_adapter
from tasks.registry import champion_adapter_for
from tasks.run_lock import hold_output_dir
from tasks.tracking import PipelineTracker
from tasks.train import TrainResult, train
from tasks.training_callback import training_callback
from tasks.validate import ValidationResult, require_valid, validate_data

FLOW_NAME = "qlora-finetune"


def _not_a_config_problem(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: a config, data or plan error fails the same way every time."""
    try:
        state.result()
    except (ConfigError, DataError):
        return False
    except Exception:
        return True
    return False


def _tracking_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry registration only when the tracking server could not be reached."""
    from mlflow.exceptions import MlflowException

    try:
        state.result()
    except (ConfigError, DataError):
        return False
    except (ConnectionError, TimeoutError, OSError, MlflowException):
        return True
    except Exception:
        return False
    return False


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validation_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Same data bytes + same checks + same tokenizer = same verdict; hub datasets are never cached."""
    config: PipelineConfig = parameters["config"]
    data = config.data
    paths = [*(s.path for s in data.source_list()), *(str(p) for p in (data.eval_path, data.chat_template) if p)]
    if not all(is_local_path(p) and Path(p).is_file() for p in paths):
        return None
    parts = [_file_digest(p) for p in paths]
    parts.append(config.data.model_dump_json())
    parts.append(config.model.model_dump_json())
    return "validate-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@task(name="data-contract", cache_key_fn=validation_cache_key, cache_expiration=timedelta(days=30), retries=0)
def data_contract_task(config: PipelineConfig) -> ValidationResult:
    """The Great Expectations run itself: the part worth caching."""
    return validate_data(config)


@task(name="validate-data", cache_policy=NO_CACHE, retries=0)
def validate_data_task(config: PipelineConfig, tracker: PipelineTracker) -> ValidationResult:
    result = data_contract_task(config)
    create_markdown_artifact(markdown=result.markdown(), key="validation-summary",
                             description="Great Expectations data contract")
    tracker.log_validation(result)
    return require_valid(result)


@task(name="load-data", cache_policy=NO_CACHE, retries=0)
def load_data_task(config: PipelineConfig) -> DatasetSplits:
    """The one read of the data that training and evaluation use (after the contract passed on it)."""
    return load_splits(config.data)


@task(name="check-gpu", cache_policy=NO_CACHE, retries=0)
def check_gpu_task(config: PipelineConfig, tracker: PipelineTracker | None) -> TrainingPlan:
    """The machine's GPU check and plan, as an artifact and (with a tracker) in the MLflow run. A sweep trial on
    a work pool node passes no tracker: its plan is the node's, not the sweep run's."""
    report, plan = check_gpu(config)
    create_markdown_artifact(markdown=f"## Hardware\n{report.markdown()}\n\n## Training plan\n{plan.markdown()}",
                             key="gpu-plan", description="GPU capability check and training plan")
    if tracker is not None:
        tracker.log_plan(report, plan)
    get_run_logger().info("plan: %s", plan.summary())
    return plan


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=_not_a_config_problem)
def train_task(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits,
               tracker: PipelineTracker) -> TrainResult:
    callback = training_callback(tracker)
    result = train(config, plan, splits, callbacks=[callback], run_id=tracker.run_id,
                   on_replan=replan_recorder(tracker))
    tracker.log_training(result.summary, callback.history)
    return result


def replan_recorder(tracker: PipelineTracker) -> Callable[[dict[str, Any], TrainingPlan], None]:
    """Records an out-of-memory re-plan as training makes it: in the MLflow run, and as the new
    `gpu-plan` artifact (the plan the rest of the run uses)."""
    def record(change: dict[str, Any], new_plan: TrainingPlan) -> None:
        tracker.log_replan(change, new_plan)
        create_markdown_artifact(
            markdown=(f"## Training plan, re-planned at step {change['at_step']} after running out of memory\n"
                      f"Resumed from step {change['resumed_from_step']}: `{change['before']}` → `{change['after']}`"
                      f"\n\n{new_plan.markdown()}"),
            key="gpu-plan", description="training plan after an out-of-memory re-plan")
    return record


@task(name="evaluate", cache_policy=NO_CACHE, retries=1, retry_condition_fn=_not_a_config_problem)
def evaluate_task(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits, trained: TrainResult,
                  tracker: PipelineTracker) -> EvalReport:
    champion = champion_adapter_for(config)
    report = evaluate_adapter(config, plan, splits, trained.adapter_dir, champion_adapter=champion)
    report.save(Path(config.training.output_dir) / "evaluation")
    create_markdown_artifact(markdown=report.markdown(), key="evaluation-report",
                             description="BLEU/ROUGE of the adapter against base (and champion)")
    if report.samples:
        create_table_artifact(table=report.samples, key="sample-predictions", description="prompt, reference, outputs")
    tracker.log_evaluation(report)
    return report


@task(name="register", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 30, 120],
      retry_condition_fn=_tracking_unreachable)
def register_task(config: PipelineConfig, trained: TrainResult, report: EvalReport,
                  validation: ValidationResult, plan: TrainingPlan, tracker: PipelineTracker) -> RegistrationResult:
    result = register_adapter(config, trained.adapter_dir, report, validation=validation, plan=plan, tracker=tracker,
                              expected_sha256=trained.summary.adapter_sha256)
    create_markdown_artifact(markdown=registration_markdown(result, tracker.uri), key="registration",
                             description="MLflow model registry outcome")
    return result


def registration_markdown(result: RegistrationResult, uri: str) -> str:
    link = f"{uri.rstrip('/')}/#/models/{result.name}/versions/{result.version}" if uri.startswith("http") else uri
    verdict = "promoted to **champion**" if result.promoted else "kept as **challenger** (not promoted)"
    reasons = "\n".join(f"- {r}" for r in result.decision.get("reasons", []))
    return (
        f"## Registered `{result.name}` version {result.version}\n\n{verdict}; aliases: "
        f"{', '.join(result.aliases) or 'none'}\n\n{reasons}\n\n- MLflow run: `{result.run_id}`\n"
        f"- model URI: `{result.model_uri}`\n- registry: {link}"
    )


@dataclass
class PipelineOutcome:
    run_id: str
    registered_model: str
    version: str
    aliases: list[str]
    promoted: bool
    primary_metric: str
    metrics: dict[str, dict[str, float]]
    adapter_dir: str

    def gain_over_base(self, metric: str) -> float:
        return self.metrics["adapter"][metric] - self.metrics["base"][metric]


# log_prints stays off: the stages log through `logging`. With it on, Prefect's patched print() also
# catches what libraries print into a swapped sys.stdout, e.g. the bytecode dill disassembles while
# `datasets` fingerprints a table, and pours it into the run log.
@flow(name=FLOW_NAME, log_prints=False)
def finetune_flow(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineOutcome:
    """Fine-tune an adapter with QLoRA and deliver it into the MLflow model registry."""
    config = load_config(config_path, overrides or [])
    # one run per output folder, from training through registration; one MLflow run, ended FAILED on any error
    with hold_output_dir(config.training), PipelineTracker.start(config) as tracker:
        validation = validate_data_task(config, tracker)
        splits = load_data_task(config)
        plan = check_gpu_task(config, tracker)
        trained = train_task(config, plan, splits, tracker)
        plan = trained.plan or plan  # an out-of-memory re-plan in training holds for the rest of the run
        report = evaluate_task(config, plan, splits, trained, tracker)
        registration = register_task(config, trained, report, validation, plan, tracker)
    return PipelineOutcome(
        run_id=tracker.run_id,
        registered_model=registration.name,
        version=str(registration.version),
        aliases=list(registration.aliases),
        promoted=registration.promoted,
        primary_metric=config.registry.primary_metric,
        metrics={name: dict(values) for name, values in report.systems.items()},
        adapter_dir=str(trained.adapter_dir),
    )
