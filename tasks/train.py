"""QLoRA training: transformers Trainer over a 4-bit base with a peft LoRA adapter.

Checkpoints go to `<output_dir>/checkpoints` and a rerun with the same output dir resumes from the
last one. The finished adapter is written to a temporary folder and swapped into
`<output_dir>/adapter` in one rename (`tasks.adapter.write_adapter`), so a crash never leaves a
half-written adapter in place of a good one. Its content hash goes into `train_summary.json`, so
registration can prove it uploads the adapter this training wrote. The run holds the output dir
(`tasks.run_lock`) while it works in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import PipelineConfig
from tasks.adapter import adapter_dir_for, write_adapter
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
from tasks.run_lock import hold_output_dir

CHECKPOINT_DIRNAME = "checkpoints"
INITIAL_EVAL_FILE = "initial_eval.json"
RUN_FILE = "training_run.json"

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


@dataclass
class TrainResult:
    adapter_dir: Path
    summary: TrainSummary
    model: Any = None  # the in-memory PeftModel, only when asked for (tests); else released


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint; a folder without trainer_state.json was cut off mid-save."""
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoint_dir.is_dir():
        return None
    found = get_last_checkpoint(str(checkpoint_dir))
    while found and not (Path(found) / "trainer_state.json").exists():
        shutil.rmtree(found)  # an interrupted save; the previous checkpoint is still whole
        found = get_last_checkpoint(str(checkpoint_dir))
    return found


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


# Settings that change how often things are written, not what is trained: a checkpoint stays valid
# when only these differ.
_BOOKKEEPING_KEYS = {"output_dir", "resume", "save_steps", "save_total_limit", "logging_steps", "eval_steps",
                     "output_dir_lock", "lock_timeout_s"}


def training_setup_hash(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits) -> str:
    """What a checkpoint's weights and optimizer state depend on: model, quantization, LoRA, data
    settings and content, training hyper-parameters and the plan's batch and dtype."""
    training = {k: v for k, v in config.training.model_dump(mode="json").items() if k not in _BOOKKEEPING_KEYS}
    setup = {
        "model": config.model.model_dump(mode="json"),
        "quantization": config.quantization.model_dump(mode="json"),
        "lora": config.lora.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "data_fingerprint": splits.fingerprint,
        "training": training,
        "plan": [plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.compute_dtype, plan.load_in_4bit],
    }
    if plan.launches_ranks:  # only then, so single-process checkpoints keep their hash
        setup["ranks"] = [plan.world_size, plan.distributed, plan.offload]
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_to_resume(checkpoint_dir: Path, setup_hash: str, resume: bool) -> str | None:
    """The checkpoint this run continues from, after clearing what it must not continue.

    Only an unfinished run of the same setup is resumed: a Prefect retry after a crash, or a rerun by
    hand. A finished run's checkpoints are cleared (its adapter is in `adapter/`), so tomorrow's
    scheduled run trains again instead of "resuming" at the last step. Checkpoints of a different
    setup (other data, model or hyper-parameters) are moved aside, not deleted, and a fresh run starts.
    """
    if not checkpoint_dir.exists():
        return None
    if not resume:
        shutil.rmtree(checkpoint_dir)
        return None
    recorded = read_run_marker(checkpoint_dir)
    if recorded.get("completed"):
        shutil.rmtree(checkpoint_dir)
        return None
    if recorded.get("setup_hash") != setup_hash and any(checkpoint_dir.glob("checkpoint-*")):
        stale = checkpoint_dir.with_name(f"{checkpoint_dir.name}.stale-{time.strftime('%Y%m%dT%H%M%S')}")
        checkpoint_dir.rename(stale)
        logger.warning("checkpoints in %s come from another training setup (data, model or hyper-parameters "
                       "changed): moved to %s, starting from step 0", checkpoint_dir, stale)
        return None
    return last_checkpoint(checkpoint_dir)


def read_run_marker(checkpoint_dir: Path) -> dict[str, Any]:
    """`training_run.json`: the setup hash, whether the run completed, and the runs that trained here.

    An unreadable marker reads as empty: the checkpoints then count as another setup's and are moved
    aside, never deleted.
    """
    try:
        recorded = json.loads((checkpoint_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _write_run_marker(checkpoint_dir: Path, marker: dict[str, Any]) -> None:
    staging = checkpoint_dir / f".{RUN_FILE}.{os.getpid()}"
    staging.write_text(json.dumps(marker, indent=2))
    staging.replace(checkpoint_dir / RUN_FILE)  # a kill mid-write leaves the old marker, not half a new one


def record_run_start(checkpoint_dir: Path, setup_hash: str, run_id: str | None, from_step: int) -> None:
    """Append this run to the marker's chain of runs that trained in this folder, with the step it
    starts from. A fresh start (from step 0) begins a new chain."""
    recorded = read_run_marker(checkpoint_dir)
    chain = list(recorded.get("runs") or []) if from_step and recorded.get("setup_hash") == setup_hash else []
    chain.append({"mlflow_run_id": run_id, "started_at_step": from_step, "pid": os.getpid()})
    _write_run_marker(checkpoint_dir, {"setup_hash": setup_hash, "completed": False, "runs": chain})


def mark_completed(checkpoint_dir: Path, setup_hash: str) -> None:
    _write_run_marker(checkpoint_dir, {**read_run_marker(checkpoint_dir), "setup_hash": setup_hash,
                                       "completed": True})


def checkpoint_writer(checkpoint_dir: Path, step: int) -> str | None:
    """The MLflow run that wrote `checkpoint-<step>`: the latest run of the chain that started before it.

    A run started from step s writes only checkpoints after s, so among the runs that started before
    `step`, the last one (a later run resumed from an earlier one's checkpoint) wrote it.
    """
    chain = read_run_marker(checkpoint_dir).get("runs") or []
    writers = [entry for entry in chain if int(entry.get("started_at_step", 0)) < step]
    return writers[-1].get("mlflow_run_id") if writers else None


def build_lora_model(model: Any, config: PipelineConfig, plan: TrainingPlan) -> Any:
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
    return get_peft_model(model, lora)


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
        bf16=plan.compute_dtype == "bfloat16",
        fp16=plan.compute_dtype == "float16",
        use_cpu=plan.device == "cpu",
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        logging_steps=training.logging_steps,
        eval_strategy="steps" if training.eval_steps else "no",
        eval_steps=training.eval_steps,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        seed=training.seed,
        data_seed=training.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **distributed_arguments(plan),
    )


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


def train(
    config: PipelineConfig,
    plan: TrainingPlan,
    splits: DatasetSplits,
    callbacks: list[Any] | None = None,
    keep_model: bool = False,
    run_id: str | None = None,
) -> TrainResult:
    """Stage 3: train the adapter and write it to `<output_dir>/adapter`.

    The output dir is held for the whole stage (`tasks.run_lock`; inside a flow that already holds it,
    this is a no-op): a second run on it is refused before anything in it is read or changed. Nothing
    else is written to the output dir before the base model has loaded and the LoRA targets are
    checked, so a config error leaves no trace. `run_id`, the pipeline's MLflow run, is recorded with
    the checkpoints, so a run that resumes from them can name the run it continues.
    """
    if in_launched_rank():  # a torchrun rank (tasks.distributed_worker): its launcher holds the output dir
        return _train_holding_output_dir(config, plan, splits, callbacks, keep_model, run_id)
    with hold_output_dir(config.training):
        if plan.launches_ranks:  # several ranks, or DeepSpeed: torchrun starts them, each comes back above
            return launch_training(config, plan, splits, callbacks=callbacks, run_id=run_id)
        return _train_holding_output_dir(config, plan, splits, callbacks, keep_model, run_id)


def _train_holding_output_dir(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits,
                              callbacks: list[Any] | None, keep_model: bool, run_id: str | None) -> TrainResult:
    import torch
    from transformers import Trainer

    quiet_libraries()
    started = time.perf_counter()
    torch.manual_seed(config.training.seed)
    tokenizer = load_tokenizer(config)
    base = load_base_model(config, plan)
    if config.training.packing:
        base.set_attn_implementation(packing_attention(plan))
    model = build_lora_model(base, config, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    output_dir = Path(config.training.output_dir)
    checkpoint_dir = output_dir / CHECKPOINT_DIRNAME
    setup_hash = training_setup_hash(config, plan, splits)
    # In a rank, the launcher already cleared what must not be resumed: the ranks only read.
    resume_from = checkpoint_to_resume(checkpoint_dir, setup_hash, config.training.resume or in_launched_rank())
    resumed_step = int(Path(resume_from).name.split("-")[-1]) if resume_from else 0
    resumed_from_run = checkpoint_writer(checkpoint_dir, resumed_step) if resume_from else None
    if resume_from:
        logger.info("resuming from %s, written by MLflow run %s", resume_from, resumed_from_run or "unknown")
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
        callbacks=callbacks or [],
    )

    initial_eval_file = checkpoint_dir / INITIAL_EVAL_FILE
    eval_before = None
    # transformers evaluates a DeepSpeed model before training only under ZeRO-3 ("ZeRO inference only
    # makes sense with ZeRO Stage 3"), so with ZeRO-2 offload there is no eval loss before training.
    if eval_data is not None and not initial_eval_file.exists() and plan.offload == "none":
        initial = trainer.evaluate()  # every rank: the eval loss is gathered across them
        eval_before = initial.get("eval_loss")
        if main_rank:
            initial_eval_file.write_text(json.dumps(initial))
    elif initial_eval_file.exists():
        eval_before = json.loads(initial_eval_file.read_text()).get("eval_loss")

    output = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate().get("eval_loss") if eval_data is not None else None
    runtime = output.metrics.get("train_runtime") or (time.perf_counter() - started)
    tokens = int(trainer.state.num_input_tokens_seen)
    summary = TrainSummary(
        global_step=trainer.state.global_step,
        resumed_from_step=resumed_step,
        train_loss=output.training_loss,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        train_tokens=tokens,
        tokens_per_second=tokens / runtime if runtime else 0.0,
        wall_time_s=time.perf_counter() - started,
        peak_memory_bytes=peak_memory_bytes(plan.device),
        trainable_params=trainable,
        plan=plan.to_dict(),
        resumed_from_run=resumed_from_run,
    )
    adapter_dir = adapter_dir_for(config)
    if main_rank:
        summary.adapter_sha256 = write_adapter(model, tokenizer, config, asdict(summary), adapter_dir)
        mark_completed(checkpoint_dir, setup_hash)
    result = TrainResult(adapter_dir=adapter_dir, summary=summary, model=model if keep_model else None)
    del trainer, model
    release_memory()
    return result
