"""QLoRA training: transformers Trainer over a 4-bit base with a peft LoRA adapter.

Checkpoints go to `<output_dir>/checkpoints` and a rerun with the same output dir resumes from the
last one. The finished adapter is written to a temporary folder and swapped into
`<output_dir>/adapter` in one rename (`tasks.adapter.write_adapter`), so a crash never leaves a
half-written adapter in place of a good one. Its content hash goes into `train_summary.json`, so
registration can prove it uploads the adapter this training wrote. The run holds the output dir
(`tasks.run_lock`) while it works in it.

With `training.eval_steps`, transformers' own best-model machinery keeps the best evaluated step and
`EarlyStoppingCallback` stops training when it stops improving (`best_step_selection` reports it). A
step that runs out of GPU memory is re-planned and resumed, not fatal (`tasks.oom`).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import BEST_METRICS_GREATER_IS_BETTER, PipelineConfig
from tasks.adapter import InitAdapter, adapter_dir_for, load_init_weights, write_adapter
from tasks.checkpoints import (
    CHECKPOINT_DIRNAME,
    INITIAL_EVAL_FILE,
    checkpoint_to_resume,
    checkpoint_writer,
    last_checkpoint_step,
    mark_completed,
    record_run_start,
    training_setup_hash,
)
from tasks.data import DatasetSplits, tokenize_example
from tasks.distributed import distributed_arguments, in_launched_rank, is_main_rank, launch_training
from tasks.gpu import TrainingPlan
from tasks.modeling import (
    check_target_modules,
    load_base_model,
    load_tokenizer,
    packing_attention,
    quiet_libraries,
    release_memory,
)
from tasks.oom import give_up_message
from tasks.registry import resolve_init_adapter
from tasks.run_lock import hold_output_dir

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    global_step: int
    resumed_from_step: int
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_tokens: int
    tokens_per_second: float
    wall_time_s: float
    peak_memory_bytes: int
    trainable_params: int
    plan: dict[str, Any] = field(default_factory=dict)
    adapter_sha256: str = ""  # tasks.adapter.adapter_content_hash of the written adapter folder
    resumed_from_run: str | None = None  # MLflow run that wrote the checkpoint this run resumed from
    best_metric: str | None = None  # training.best_metric when evaluations picked a best step, else None
    best_step: int | None = None  # the evaluated step with the best metric
    best_metric_value: float | None = None
    adapter_step: int | None = None  # the step whose weights the adapter holds (best_step when kept, else last)
    stopped_early: bool = False
    stop_reason: str = ""  # why training ended, in words
    evaluations: list[dict[str, float]] = field(default_factory=list)  # {step, <metric>} of each evaluation
    replans: list[dict[str, Any]] = field(default_factory=list)  # out-of-memory re-plans (tasks.oom.plan_change)
    init_adapter: dict[str, Any] | None = None  # the adapter training started from (InitAdapter.to_dict), if any
    data_sources: list[dict[str, Any]] = field(default_factory=list)  # each source's stats (tasks.data.SourceStats)


@dataclass
class TrainResult:
    adapter_dir: Path
    summary: TrainSummary
    plan: TrainingPlan | None = None  # the plan training finished under (differs after an out-of-memory re-plan)
    model: Any = None  # the in-memory PeftModel, only when asked for (tests); else released


def prepare_for_kbit_training(model: Any, plan: TrainingPlan) -> Any:
    """peft's k-bit preparation (frozen base, fp32 norms, input grads for checkpointing), minus one cost.

    `prepare_model_for_kbit_training` upcasts every parameter that is not 4-bit to fp32, which doubles
    the embeddings and lm_head: for a 1B Llama that is 263M parameters at 1.05 GB instead of 0.53 GB,
    more than all its NF4 linears together (bench/RESULTS.md, section 3). They are frozen, so their
    dtype only costs memory; they go back to the dtype they were loaded in. Norms stay fp32, which is
    what the upcast is for.
    """
    from peft import prepare_model_for_kbit_training

    embeddings = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    loaded = [weight.dtype for weight in embeddings]
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    for weight, dtype in zip(embeddings, loaded, strict=True):  # a tied lm_head is the same tensor: no-op
        weight.data = weight.data.to(dtype)
    return model


def build_lora_model(model: Any, config: PipelineConfig, plan: TrainingPlan, init: InitAdapter | None = None) -> Any:
    """The base wrapped in the configured LoRA; with `init` (training.init_adapter) its weights are the
    init adapter's instead of a fresh LoRA's (`tasks.adapter.load_init_weights` checks they fit)."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(config, model)
    if plan.load_in_4bit:
        model = prepare_for_kbit_training(model, plan)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        bias=config.lora.bias,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if init is not None:
        load_init_weights(model, init, config)
    return model


def tokenized_dataset(tokenizer: Any, examples: list, max_seq_length: int, train_on: str = "all_assistant") -> Any:
    import datasets

    return datasets.Dataset.from_list([tokenize_example(tokenizer, e, max_seq_length, train_on) for e in examples])


def data_collator(tokenizer: Any, packing: bool) -> Any:
    """Padding-free packing when configured: no compute is spent on pad tokens.

    DataCollatorWithFlattening concatenates the batch into one row with restarting position_ids;
    transformers' masking utilities turn those into a block-diagonal mask, so examples never attend
    to each other.
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening()
    tokenizer.padding_side = "right"  # training pads on the right; generation uses left padding
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def training_arguments(config: PipelineConfig, plan: TrainingPlan, checkpoint_dir: Path, steps: int) -> Any:
    from transformers import TrainingArguments

    training = config.training
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=training.max_steps,
        num_train_epochs=training.num_epochs,
        per_device_train_batch_size=plan.per_device_batch_size,
        per_device_eval_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=int(round(training.warmup_ratio * steps)),
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=plan.optim,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        torch_compile=training.compile,
        bf16=plan.compute_dtype == "bfloat16",
        fp16=plan.compute_dtype == "float16",
        use_cpu=plan.device == "cpu",
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        logging_steps=training.logging_steps,
        eval_strategy="steps" if training.eval_steps else "no",
        eval_steps=training.eval_steps,
        # Best step (tasks.train.best_step_selection): transformers keeps the best checkpoint out of
        # save_total_limit's rotation and loads it back at the end; save_steps == eval_steps (schema).
        load_best_model_at_end=training.selects_best and training.keep_best,
        metric_for_best_model=training.best_metric if training.selects_best else None,
        greater_is_better=BEST_METRICS_GREATER_IS_BETTER[training.best_metric] if training.selects_best else None,
        # a resumed run continues the early-stopping count (EarlyStoppingCallback's state in the checkpoint)
        restore_callback_states_from_checkpoint=True,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        seed=training.seed,
        data_seed=training.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **distributed_arguments(plan),
    )


def early_stopping_callbacks(config: PipelineConfig) -> list[Any]:
    """transformers' own EarlyStoppingCallback when `training.early_stopping_patience` is set."""
    from transformers import EarlyStoppingCallback

    patience = config.training.early_stopping_patience
    return [EarlyStoppingCallback(early_stopping_patience=patience)] if patience and config.training.eval_steps else []


def best_step_selection(config: PipelineConfig, trainer: Any) -> dict[str, Any]:
    """How training ended and which step the adapter holds, from the Trainer's own state.

    Read after `trainer.train()` and before any further evaluation (which would add to the log).
    `state.best_global_step`/`best_metric` are what transformers chose; the early-stopping callback is
    looked up in the Trainer (a resumed run replaces the instance passed in with the checkpoint's).
    """
    from transformers import EarlyStoppingCallback

    training = config.training
    state = trainer.state
    metric = training.best_metric
    evaluations = [{"step": int(entry["step"]), metric: float(entry[metric])}
                   for entry in state.log_history if metric in entry and "step" in entry]
    planned = int(state.max_steps or 0)
    stopper = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)), None)
    stopped_early = bool(stopper and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
                         and state.global_step < planned)
    outcome: dict[str, Any] = {"evaluations": evaluations, "stopped_early": stopped_early,
                               "adapter_step": state.global_step, "stop_reason": f"reached the planned {planned} steps"}
    if not training.selects_best or state.best_global_step is None:
        return outcome
    best_step, best_value = int(state.best_global_step), float(state.best_metric)
    outcome.update(best_metric=metric, best_step=best_step, best_metric_value=best_value)
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        outcome["adapter_step"] = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    if stopped_early:
        outcome["stop_reason"] = (
            f"early stopping: {metric} did not improve on {best_value:.4f} (step {best_step}) for "
            f"{stopper.early_stopping_patience} evaluations; stopped at step {state.global_step} of {planned}")
    return outcome


def planned_steps(config: PipelineConfig, plan: TrainingPlan, train_rows: int) -> int:
    if config.training.max_steps > 0:
        return config.training.max_steps
    per_step = plan.per_device_batch_size * plan.gradient_accumulation_steps
    return max(1, int(config.training.num_epochs * -(-train_rows // per_step)))


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class _Progress:
    """What survives from one training attempt to the next after an out-of-memory re-plan."""

    started: float
    replans: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: tuple[int, str | None] | None = None  # the first attempt's (step, writer run)


class _OutOfMemoryInStep(Exception):
    """Internal: a step ran out of memory; the attempt dropped its model and trainer before raising."""

    def __init__(self, at_step: int, error: str) -> None:
        super().__init__(error)
        self.at_step = at_step
        self.error = error


def train(
    config: PipelineConfig,
    plan: TrainingPlan,
    splits: DatasetSplits,
    callbacks: list[Any] | None = None,
    keep_model: bool = False,
    run_id: str | None = None,
    on_replan: Callable[[dict[str, Any], TrainingPlan], None] | None = None,
) -> TrainResult:
    """Stage 3: train the adapter and write it to `<output_dir>/adapter`.

    The output dir is held for the whole stage (`tasks.run_lock`; inside a flow that already holds it,
    this is a no-op): a second run on it is refused before anything in it is read or changed. Nothing
    else is written to the output dir before the base model has loaded and the LoRA targets are
    checked, so a config error leaves no trace. `run_id`, the pipeline's MLflow run, is recorded with
    the checkpoints, so a run that resumes from them can name the run it continues.

    A step that runs out of GPU memory does not end the stage: memory is freed, the plan re-planned
    (`tasks.oom.replan_after_oom`: same effective batch, smaller per-device split, checkpointing on) and
    training resumes from the last checkpoint; the effective batch is the setup hash's, so the resume
    counts as the same setup. `on_replan(change, new_plan)` is told of each change as it happens (the
    flow records it in the MLflow run); the summary's `replans` lists them all. With nothing smaller
    left, `tasks.oom.OutOfMemoryGiveUp` says so.
    """
    from tasks.oom import OutOfMemoryGiveUp, plan_change, replan_after_oom

    progress = _Progress(started=time.perf_counter())
    if in_launched_rank():  # a torchrun rank (tasks.distributed_worker): its launcher holds the output dir
        return _train_holding_output_dir(config, plan, splits, callbacks, keep_model, run_id, progress)
    with hold_output_dir(config.training):
        if plan.launches_ranks:  # several ranks, or DeepSpeed: torchrun starts them, each comes back above
            return launch_training(config, plan, splits, callbacks=callbacks, run_id=run_id)
        while True:
            try:
                return _train_holding_output_dir(config, plan, splits, callbacks, keep_model, run_id, progress)
            except _OutOfMemoryInStep as oom:
                at_step, error = oom.at_step, oom.error
            # outside the except block: the exception and its frames (model, trainer) are gone
            release_memory()
            smaller = replan_after_oom(plan)
            if smaller is None:
                raise OutOfMemoryGiveUp(give_up_message(plan, at_step, error))
            resume_step = last_checkpoint_step(Path(config.training.output_dir) / CHECKPOINT_DIRNAME)
            change = plan_change(plan, smaller, at_step, resume_step, error)
            progress.replans.append(change)
            logger.warning("out of memory at step %s: %s; resuming from step %s", at_step, smaller.notes[-1],
                           resume_step)
            if on_replan is not None:
                on_replan(change, smaller)
            plan = smaller


def _train_holding_output_dir(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits,
                              callbacks: list[Any] | None, keep_model: bool, run_id: str | None,
                              progress: _Progress) -> TrainResult:
    import torch
    from transformers import Trainer

    from tasks.oom import fault_injection_callbacks

    quiet_libraries()
    started = progress.started
    torch.manual_seed(config.training.seed)
    tokenizer = load_tokenizer(config)
    init = resolve_init_adapter(config)
    base = load_base_model(config, plan)
    if config.training.packing:
        base.set_attn_implementation(packing_attention(plan))
    model = build_lora_model(base, config, plan, init)
    del base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    output_dir = Path(config.training.output_dir)
    checkpoint_dir = output_dir / CHECKPOINT_DIRNAME
    setup_hash = training_setup_hash(config, plan, splits, init)
    # In a rank, the launcher already cleared what must not be resumed: the ranks only read.
    resume_from = checkpoint_to_resume(checkpoint_dir, setup_hash, config.training.resume or in_launched_rank())
    resumed_step = int(Path(resume_from).name.split("-")[-1]) if resume_from else 0
    resumed_from_run = checkpoint_writer(checkpoint_dir, resumed_step) if resume_from else None
    if resume_from:
        logger.info("resuming from %s, written by MLflow run %s", resume_from, resumed_from_run or "unknown")
    if progress.resumed_from is None:
        progress.resumed_from = (resumed_step, resumed_from_run)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    main_rank = is_main_rank()  # rank 0 (or the only process) alone writes files
    if main_rank:
        record_run_start(checkpoint_dir, setup_hash, run_id, resumed_step)

    max_len = config.data.max_seq_length
    train_data = tokenized_dataset(tokenizer, splits.train, max_len, config.data.train_on)
    eval_data = tokenized_dataset(tokenizer, splits.eval, max_len, config.data.train_on) if splits.eval else None
    steps = planned_steps(config, plan, len(train_data))
    trainer = Trainer(
        model=model,
        args=training_arguments(config, plan, checkpoint_dir, steps),
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=data_collator(tokenizer, config.training.packing),
        processing_class=tokenizer,
        callbacks=[*early_stopping_callbacks(config), *fault_injection_callbacks(), *(callbacks or [])],
    )

    initial_eval_file = checkpoint_dir / INITIAL_EVAL_FILE
    eval_before = None
    try:
        # transformers evaluates a DeepSpeed model before training only under ZeRO-3 ("ZeRO inference only
        # makes sense with ZeRO Stage 3"), so with ZeRO-2 offload there is no eval loss before training.
        if eval_data is not None and not initial_eval_file.exists() and plan.offload == "none":
            initial = trainer.evaluate()  # every rank: the eval loss is gathered across them
            eval_before = initial.get("eval_loss")
            # evaluate() had accelerate prepare the model for inference, which marks it prepared; training's
            # prepare then returns it as it is, without the DistributedDataParallel wrapper, and each rank
            # trains alone (measured: 2 CPU ranks ended with different LoRA weights, and after 200 steps at
            # loss 2.00 against one process's 0.76). Clearing the mark lets training wrap it.
            if plan.world_size > 1 and getattr(trainer.model, "_is_accelerate_prepared", False):
                del trainer.model._is_accelerate_prepared
            if main_rank:
                initial_eval_file.write_text(json.dumps(initial))
        elif initial_eval_file.exists():
            eval_before = json.loads(initial_eval_file.read_text()).get("eval_loss")
        output = trainer.train(resume_from_checkpoint=resume_from)
    except torch.cuda.OutOfMemoryError as exc:
        at_step = int(trainer.state.global_step) + 1
        del trainer, model  # this frame stays alive in the traceback: drop what holds GPU memory
        raise _OutOfMemoryInStep(at_step, str(exc)) from None
    selection = best_step_selection(config, trainer)  # before the final evaluation adds to the log
    eval_after = trainer.evaluate().get("eval_loss") if eval_data is not None else None
    runtime = output.metrics.get("train_runtime") or (time.perf_counter() - started)
    tokens = int(trainer.state.num_input_tokens_seen)
    first_resume_step, first_resume_run = progress.resumed_from
    summary = TrainSummary(
        global_step=trainer.state.global_step,
        resumed_from_step=first_resume_step,
        train_loss=output.training_loss,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        train_tokens=tokens,
        tokens_per_second=tokens / runtime if runtime else 0.0,
        wall_time_s=time.perf_counter() - started,
        peak_memory_bytes=peak_memory_bytes(plan.device),
        trainable_params=trainable,
        plan=plan.to_dict(),
        resumed_from_run=first_resume_run,
        replans=list(progress.replans),
        init_adapter=init.to_dict() if init else None,
        data_sources=[asdict(stats) for stats in splits.mix],
        **selection,
    )
    if selection["adapter_step"] != summary.global_step:
        logger.info("the adapter holds step %s (best %s %.4f), not the last step %s; %s", selection["adapter_step"],
                    selection.get("best_metric"), selection.get("best_metric_value"), summary.global_step,
                    selection["stop_reason"])
    adapter_dir = adapter_dir_for(config)
    if main_rank:
        summary.adapter_sha256 = write_adapter(model, tokenizer, config, asdict(summary), adapter_dir)
        mark_completed(checkpoint_dir, setup_hash)
    result = TrainResult(adapter_dir=adapter_dir, summary=summary, plan=plan,
                         model=model if keep_model else None)
    del trainer, model
    release_memory()
    return result
