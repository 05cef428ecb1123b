"""Hyper-parameter search: an Optuna study whose trials run the real train and evaluate stages.

Optuna does the search (its samplers, its pruners, its RDB storage); this module only connects it to
the pipeline:

- `open_study`: the study, stored by default in `optuna.db` beside a local sqlite MLflow store (or in
  the project dir's `mlflow/` folder; `sweep.storage` names any RDB URL, PostgreSQL in the stack) and
  created with `load_if_exists=True`, so running the same sweep again continues the same study.
  `sweep.n_trials` counts the trials of the study, not of one invocation: a rerun only adds what is
  missing, and a trial left RUNNING by a killed sweep (the sweep holds `training.output_dir`, so no
  live sweep owns it) is run again under its own number, resuming from its checkpoints.
- `run_trial`: one trial = its config (the sampled values applied as overrides, output in
  `<output_dir>/trials/<n>`), a nested MLflow run under the study's run, the real `tasks.train.train`
  with a callback that reports each intermediate eval loss to the trial and stops training at once
  when the pruner says so, then the real `tasks.evaluate.evaluate_adapter`. With `sweep.cv_folds: k`
  the trial trains and evaluates k times on hash-stable folds (`tasks.data.cv_folds`); its value is
  the mean and the spread is recorded.
- `record_outcome`: tells the study the trial's value or state (complete, pruned, failed).
- `study_table` / `log_study`: the trials table, and Optuna's optimisation-history and
  parameter-importance plots, logged to the study's run.
- `best_adapter`: the best trial's adapter for the nightly flow's evaluation and registration.
- `run_remote_trial` and its helpers: a trial as a flow run of `sweep.trial_deployment` on a GPU work
  pool, talking to the sweep through the study only (see "Trials on a work pool" below).

Pruning reports the eval loss when the objective is minimised and its negative when it is maximised
(BLEU, ROUGE-L), so the pruner always compares in the study's direction.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.schema import ConfigError, PipelineConfig, SearchRange, SweepConfig
from tasks.tracking import PipelineTracker, default_db, sqlite_path

if TYPE_CHECKING:
    import optuna

    from tasks.data import DatasetSplits
    from tasks.gpu import TrainingPlan

logger = logging.getLogger(__name__)

STUDY_DB_FILE = "optuna.db"
TRIALS_DIRNAME = "trials"
BEST_DIRNAME = "best"
STATE_COMPLETE, STATE_PRUNED, STATE_FAILED = "complete", "pruned", "failed"
RUN_ID_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"
# A trial run as a flow run of `sweep.trial_deployment` (see "Trials on a work pool" below): what it did, and
# the flow runs launched for it, as trial user attributes in the study (the storage every node shares).
OUTCOME_ATTR = "outcome"
FLOW_RUNS_ATTR = "prefect_flow_run_ids"


# --------------------------------------------------------------------------------------------------
# The study


def require_sweep(config: PipelineConfig) -> SweepConfig:
    """The config's sweep section; a config without one (or with an empty space) cannot be swept."""
    if config.sweep is None or not config.sweep.space:
        raise ConfigError("the config has no sweep: section with a space to search; add one (see "
                          "configs/demo-sweep.yaml), e.g. sweep: {space: {lora.r: [8, 16]}, sampler: grid}")
    return config.sweep


def study_name(config: PipelineConfig) -> str:
    return require_sweep(config).study_name or f"{config.registry.model_name}-sweep"


def storage_url(config: PipelineConfig, tracking_uri: str) -> str:
    """`sweep.storage`, else a sqlite `optuna.db` beside the local sqlite MLflow store, else beside the
    default store's folder (a remote MLflow server: set sweep.storage to the stack's PostgreSQL)."""
    sweep = require_sweep(config)
    if sweep.storage:
        return sweep.storage
    db = sqlite_path(tracking_uri)
    folder = db.parent if db is not None else default_db().parent
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / STUDY_DB_FILE}"


def planned_trials(sweep: SweepConfig) -> int:
    """Trials the study should hold in total: `n_trials`, and for a grid at most its size."""
    if sweep.sampler != "grid":
        return sweep.n_trials
    return min(sweep.n_trials, math.prod(len(choices) for choices in sweep.space.values()))


def _grid_sampler(search_space: dict[str, list[Any]], seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """Optuna's GridSampler minus `after_trial`, which calls `study.stop()` once the grid is
        exhausted; that is only allowed inside `study.optimize`, and this sweep asks and tells (its
        trials are Prefect tasks). The sweep stops by `planned_trials` instead."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return AskTellGridSampler(search_space, seed=seed)


def make_sampler(sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    import optuna

    if sweep.sampler == "grid":
        return _grid_sampler({key: list(choices) for key, choices in sweep.space.items()}, sweep.seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed)


def make_pruner(config: PipelineConfig) -> optuna.pruners.BasePruner:
    import optuna

    sweep = require_sweep(config)
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                           n_warmup_steps=sweep.pruner_warmup_steps)
    if sweep.pruner == "hyperband":
        max_steps = config.training.max_steps if config.training.max_steps > 0 else "auto"
        return optuna.pruners.HyperbandPruner(min_resource=config.training.eval_steps or 1, max_resource=max_steps)
    return optuna.pruners.NopPruner()


def open_study(config: PipelineConfig, storage: str) -> optuna.Study:
    """Create the study, or load it when it exists (a rerun continues it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = require_sweep(config)
    return optuna.create_study(study_name=study_name(config), storage=storage, sampler=make_sampler(sweep),
                               pruner=make_pruner(config), direction=sweep.resolved_direction(),
                               load_if_exists=True)


def interrupted_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a sweep that died (the caller holds the output dir, so no local trial is live;
    a trial on a work pool may be: the sweep checks its flow run before launching it again)."""
    from optuna.trial import TrialState

    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def trials_to_add(study: optuna.Study, sweep: SweepConfig) -> int:
    return max(0, planned_trials(sweep) - len(study.get_trials(deepcopy=False)))


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """Sample every key of the space through the trial (Optuna records the values)."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, SearchRange):
            if isinstance(spec.low, int) and isinstance(spec.high, int):
                values[key] = trial.suggest_int(key, spec.low, spec.high, log=spec.log)
            else:
                values[key] = trial.suggest_float(key, float(spec.low), float(spec.high), log=spec.log)
        else:
            values[key] = trial.suggest_categorical(key, list(spec))
    return values


def ask_trial(study: optuna.Study, sweep: SweepConfig) -> int:
    """A new trial with its values sampled now (so the sampler sees every finished trial); its number."""
    trial = study.ask()
    suggest(trial, sweep.space)
    return trial.number


def trial_dir(config: PipelineConfig, number: int) -> Path:
    return Path(config.training.output_dir) / TRIALS_DIRNAME / str(number)


def trial_config(config: PipelineConfig, params: dict[str, Any], output_dir: Path) -> PipelineConfig:
    """The trial's config: the sampled values as overrides, its own output folder, no sweep section."""
    trial = config.with_overrides({**params, "training.output_dir": str(output_dir)})
    trial.sweep = None
    return trial


# --------------------------------------------------------------------------------------------------
# One trial


@dataclass
class TrialOutcome:
    """What one trial did; `record_outcome` tells the study."""

    number: int
    state: str
    value: float | None = None
    fold_values: list[float] = field(default_factory=list)
    spread: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    adapter_dir: str | None = None
    adapter_sha256: str = ""
    run_id: str = ""
    wall_time_s: float = 0.0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialOutcome:
        return cls(**values)


def pruning_callback(trial: optuna.Trial, maximize: bool, step_offset: int = 0) -> Any:
    """A TrainerCallback that reports each eval loss to the trial and, when the pruner says so, stops
    training at once (`control.should_training_stop`); `pruned` tells the caller afterwards."""
    from transformers import TrainerCallback

    class PruneOnEvalLoss(TrainerCallback):
        def __init__(self) -> None:
            self.pruned_at: int | None = None
            self.reported: set[int] = set()

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kwargs: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is None or state.global_step == 0:  # the train stage's eval before step 1
                return
            step = step_offset + int(state.global_step)
            if step in self.reported:  # the final evaluation repeats the last eval_steps one
                return
            self.reported.add(step)
            trial.report(-loss if maximize else loss, step)
            if trial.should_prune():
                self.pruned_at = step
                control.should_training_stop = True

    return PruneOnEvalLoss()


def objective_value(report: Any, objective: str) -> float:
    value = report.systems["adapter"].get(objective)
    if value is None or not math.isfinite(float(value)):
        raise ValueError(f"evaluation gave no finite {objective} for the adapter")
    return float(value)


def trial_tracker(config: PipelineConfig, trial: optuna.Trial, parent: PipelineTracker, name: str,
                  params: dict[str, Any]) -> PipelineTracker:
    """The trial's nested MLflow run: reopened when a retry or a resumed sweep runs the trial again.

    A reopened run is re-tagged with the process that now owns it (`tasks.orphan_runs.process_tags`):
    still naming the dead one, it would be marked KILLED by the next run that starts beside it (a
    parallel trial) while it trains."""
    from tasks.orphan_runs import process_tags

    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        tracker = PipelineTracker(run_id, parent.uri)
        tracker.set_tags(process_tags())
        tracker.client.update_run(run_id, status="RUNNING")
        return tracker
    tracker = PipelineTracker.start(config, run_name=f"trial-{trial.number}", tracking_uri=parent.uri,
                                    parent_run_id=parent.run_id,
                                    tags={"sweep.study": name, "sweep.trial": str(trial.number)})
    trial.set_user_attr(RUN_ID_ATTR, tracker.run_id)
    tracker.set_tags({f"sweep.param.{key}": value for key, value in params.items()})
    return tracker


def load_trial_study(config: PipelineConfig, storage: str) -> optuna.Study:
    """The study as a trial process sees it: with the sweep's pruner (`trial.should_prune`) and sampler."""
    import optuna

    return optuna.load_study(study_name=study_name(config), storage=storage, pruner=make_pruner(config),
                             sampler=make_sampler(require_sweep(config)))


def reopen_trial(study: optuna.Study, number: int) -> tuple[optuna.trial.FrozenTrial, optuna.Trial]:
    """Trial `number` as stored, and a handle on it to report to (Optuna has no public getter by number)."""
    import optuna

    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    return frozen, optuna.trial.Trial(study, frozen._trial_id)


def run_trial(config: PipelineConfig, storage: str, number: int, parent: PipelineTracker, plan: TrainingPlan,
              splits: DatasetSplits) -> TrialOutcome:
    """Train and evaluate trial `number` (k times with cv_folds); see the module docstring.

    Raises on a crash, after marking the trial's run FAILED; a retry resumes from the trial's checkpoints.
    """
    from tasks.data import cv_folds
    from tasks.evaluate import evaluate_adapter
    from tasks.train import planned_steps, train
    from tasks.training_callback import training_callback

    sweep = require_sweep(config)
    started = time.perf_counter()
    study = load_trial_study(config, storage)
    frozen, trial = reopen_trial(study, number)
    params = dict(frozen.params)
    folder = trial_dir(config, number)
    config_of_trial = trial_config(config, params, folder)
    tracker = trial_tracker(config_of_trial, trial, parent, study.study_name, params)
    maximize = sweep.resolved_direction() == "maximize"
    folds = cv_folds(splits, sweep.cv_folds) if sweep.cv_folds > 1 else [splits]
    outcome = TrialOutcome(number=number, state=STATE_COMPLETE, params=params, run_id=tracker.run_id)
    try:
        for index, fold_splits in enumerate(folds):
            fold_config = config_of_trial if len(folds) == 1 else trial_config(config, params, folder / f"fold-{index}")
            steps = planned_steps(fold_config, plan, len(fold_splits.train))
            logger_callback = training_callback(tracker)
            pruner_callback = pruning_callback(trial, maximize, step_offset=index * steps)
            trained = train(fold_config, plan, fold_splits, callbacks=[logger_callback, pruner_callback],
                            run_id=tracker.run_id)
            tracker.log_training(trained.summary, logger_callback.history)
            if pruner_callback.pruned_at is not None:
                outcome.state = STATE_PRUNED
                tracker.set_tags({"sweep.pruned_at_step": pruner_callback.pruned_at})
                break
            report = evaluate_adapter(fold_config, plan, fold_splits, trained.adapter_dir)
            tracker.log_evaluation(report)
            value = objective_value(report, sweep.objective)
            outcome.fold_values.append(value)
            tracker.log_metrics({f"sweep.{sweep.objective}": value}, step=index)
            outcome.adapter_dir, outcome.adapter_sha256 = str(trained.adapter_dir), trained.summary.adapter_sha256
        if outcome.state == STATE_COMPLETE:
            outcome.value = statistics.fmean(outcome.fold_values)
            outcome.spread = statistics.pstdev(outcome.fold_values) if len(outcome.fold_values) > 1 else 0.0
            tracker.log_metrics({"sweep.objective": outcome.value, "sweep.objective_spread": outcome.spread})
        outcome.wall_time_s = time.perf_counter() - started
        for key in ("spread", "fold_values", "adapter_dir", "adapter_sha256", "wall_time_s"):
            value = getattr(outcome, key)
            if value not in (None, "", []):
                trial.set_user_attr(key, value)  # for the table and the best trial's adapter
        tracker.set_tags({"sweep.trial_state": outcome.state})
        tracker.finish()
        return outcome
    except BaseException:
        tracker.set_tags({"sweep.trial_state": STATE_FAILED})
        tracker.fail()
        raise


def record_outcome(study: optuna.Study, outcome: TrialOutcome) -> None:
    """Tell the study how the trial ended (the trial kept its spread, folds and adapter as attributes); a
    failed trial keeps why as its `error` attribute (the trials table's `error` column).

    A trial the study knows as finished already is left as it is: a trial on a work pool tells the study
    itself (`run_remote_trial`), so that it counts even when the sweep that launched it is gone."""
    from optuna.trial import TrialState

    frozen, trial = reopen_trial(study, outcome.number)
    if frozen.state != TrialState.RUNNING:
        return
    if outcome.state == STATE_COMPLETE:
        study.tell(outcome.number, outcome.value)
    elif outcome.state == STATE_PRUNED:
        study.tell(outcome.number, state=TrialState.PRUNED)
    else:
        if outcome.error:
            trial.set_user_attr(ERROR_ATTR, outcome.error)
        study.tell(outcome.number, state=TrialState.FAIL)


def failed_outcome(number: int, error: str) -> TrialOutcome:
    return TrialOutcome(number=number, state=STATE_FAILED, error=error[:2000])


# --------------------------------------------------------------------------------------------------
# Trials on a work pool (`sweep.trial_deployment`)
#
# Each trial is a flow run of the trial deployment (flows/sweep.py `sweep_trial_flow`), on whichever node
# of its work pool picks it up. Nothing passes between the sweep and the node but the flow run's JSON
# parameters (`trial_parameters`) and the study: the node checks its own GPU, loads the data and refuses
# other data than the sweep's (`require_same_data`), runs `run_trial`, and leaves the outcome in the study
# (`run_remote_trial`), where the sweep reads it when the flow run is final (`remote_outcome`) and where it
# stays when the sweep was killed meanwhile. The flow runs launched for a trial are listed on it
# (`FLOW_RUNS_ATTR`), so a resumed sweep waits for a trial's live flow run instead of launching a second.


def trial_parameters(config: PipelineConfig, storage: str, number: int, parent: PipelineTracker,
                     data_fingerprint: str) -> dict[str, Any]:
    """The trial flow's parameters: JSON only (the resolved config as a dict), since the flow run is created
    through the Prefect API and may run on another machine. `sweep_trial_flow` takes exactly these.

    The config goes as written (`exclude_unset`), as `PipelineConfig.with_overrides` reads it: dumped with
    every default, `lora.alpha` would come back as set and no longer follow a sampled `lora.r`."""
    return {"config": config.model_dump(mode="json", exclude_unset=True), "storage": storage, "number": number,
            "parent_run_id": parent.run_id, "tracking_uri": parent.uri, "data_fingerprint": data_fingerprint}


def require_same_data(splits: DatasetSplits, data_fingerprint: str) -> None:
    """A node must train on the very rows the sweep validated: another copy of the data (a stale mount, a
    file changed since) would make its trial incomparable with the others."""
    from tasks.data import DataError

    if splits.fingerprint != data_fingerprint:
        raise DataError(f"this node's data (fingerprint {splits.fingerprint[:12]}, from {', '.join(splits.sources)}) "
                        f"is not the sweep's ({data_fingerprint[:12]}): every node of the trial deployment's "
                        "work pool must see the same data.path at the same path (a shared volume)")


def run_remote_trial(config: PipelineConfig, storage: str, number: int, parent: PipelineTracker,
                     plan: TrainingPlan, splits: DatasetSplits) -> TrialOutcome:
    """`run_trial` on a node, then its outcome stored on the trial and told to the study: the sweep reads it
    from there (no Prefect result storage shared between machines needed), and a trial that ends after its
    sweep was killed still counts."""
    outcome = run_trial(config, storage, number, parent, plan, splits)
    study = load_trial_study(config, storage)
    _, trial = reopen_trial(study, number)
    trial.set_user_attr(OUTCOME_ATTR, outcome.to_dict())
    record_outcome(study, outcome)
    return outcome


def remote_outcome(study: optuna.Study, number: int) -> TrialOutcome | None:
    """The outcome a trial's flow run stored, or None (it has not finished, or it failed before storing it)."""
    frozen, _ = reopen_trial(study, number)
    stored = frozen.user_attrs.get(OUTCOME_ATTR)
    return TrialOutcome.from_dict(stored) if stored else None


def trial_flow_runs(study: optuna.Study, number: int) -> list[str]:
    """Ids of the flow runs launched for the trial, oldest first."""
    frozen, _ = reopen_trial(study, number)
    return list(frozen.user_attrs.get(FLOW_RUNS_ATTR, []))


def add_trial_flow_run(study: optuna.Study, number: int, flow_run_id: str) -> None:
    _, trial = reopen_trial(study, number)
    trial.set_user_attr(FLOW_RUNS_ATTR, [*trial_flow_runs(study, number), flow_run_id])


def launch_key(study: optuna.Study, number: int) -> str:
    """The idempotency key of the trial's next flow run: the same until a launch is recorded on the trial, so
    a sweep killed between creating a flow run and recording it gets that same flow run back on resume
    instead of a second copy; the trial's start time tells apart two studies of the same name."""
    frozen, _ = reopen_trial(study, number)
    launches = len(frozen.user_attrs.get(FLOW_RUNS_ATTR, []))
    started = frozen.datetime_start.isoformat() if frozen.datetime_start else ""
    return f"{study.study_name}/{started}/trial-{number}/launch-{launches}"


# --------------------------------------------------------------------------------------------------
# The study's summary and its best trial


def study_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, spread, each searched value, duration, its MLflow run, and
    for a failed one why."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                               "spread": t.user_attrs.get("spread")}
        row.update({key: value for key, value in t.params.items()})
        row["wall_time_s"] = t.user_attrs.get("wall_time_s")
        row["mlflow_run_id"] = t.user_attrs.get(RUN_ID_ATTR)
        row["error"] = t.user_attrs.get(ERROR_ATTR)
        rows.append(row)
    return rows


def log_study(tracker: PipelineTracker, study: optuna.Study) -> list[dict[str, Any]]:
    """Trials table, counts, best value and Optuna's plots into the study's run; returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    table = study_table(study)
    tracker.client.log_table(tracker.run_id, data=pd.DataFrame(table), artifact_file="sweep/trials.json")
    counts = {state: sum(1 for row in table if row["state"] == state) for state in ("complete", "pruned", "fail")}
    metrics = {f"sweep.trials_{state}": float(n) for state, n in counts.items()}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        metrics["sweep.best_value"] = float(study.best_value)
        tracker.set_tags({"sweep.best_trial": study.best_trial.number})
    tracker.log_metrics(metrics)
    plots = {"sweep/optimization_history.png": optuna_plots.plot_optimization_history}
    if len(complete) >= 2:
        plots["sweep/param_importances.png"] = optuna_plots.plot_param_importances
    for name, plot in plots.items():
        try:
            axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
            tracker.client.log_figure(tracker.run_id, figure, name)
            matplotlib.pyplot.close(figure)
        except Exception as exc:  # e.g. importances of a parameter that never varied: the table still stands
            logger.warning("could not draw %s: %s", name, exc)
    return table


def best_trial_config(config: PipelineConfig, study: optuna.Study) -> tuple[int, PipelineConfig]:
    """The best complete trial's number and config (its own output folder)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError(f"study {study.study_name} has no complete trial to register: every trial was pruned or "
                          "failed; widen sweep.space or set sweep.pruner: none")
    best = study.best_trial
    return best.number, trial_config(config, dict(best.params), trial_dir(config, best.number))


def best_adapter(config: PipelineConfig, study: optuna.Study, plan: TrainingPlan,
                 splits: DatasetSplits) -> tuple[int, PipelineConfig, Path, str]:
    """(trial number, its config, adapter folder, content hash) of the study's best trial.

    Without cross-validation that is the trial's own adapter. With it, the trial trained only on folds,
    so its values are retrained once on the configured train split (`<output_dir>/best`), and evaluation
    then scores it on the eval split it never saw.
    """
    from tasks.train import train

    number, best_config = best_trial_config(config, study)
    best = study.best_trial
    if require_sweep(config).cv_folds > 1:
        best_config = trial_config(config, dict(best.params), Path(config.training.output_dir) / BEST_DIRNAME)
        trained = train(best_config, plan, splits)
        return number, best_config, trained.adapter_dir, trained.summary.adapter_sha256
    return number, best_config, Path(best.user_attrs["adapter_dir"]), str(best.user_attrs.get("adapter_sha256", ""))
