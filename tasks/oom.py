"""Out-of-memory recovery for the train stage: the re-plan rule, the give-up error, the testing switch.

The GPU plan (`tasks.gpu`) estimates memory before any weights load; an estimate can be wrong, and a
Prefect retry would rerun the same plan into the same wall. So when a training step raises
`torch.cuda.OutOfMemoryError`, `tasks.train.train` frees memory, asks `replan_after_oom` for a smaller
split of the same effective batch (and activation recomputation), and resumes from the last checkpoint.
Each change is recorded (`TrainSummary.replans`, the MLflow run, the registered version's lineage).

transformers' own `auto_find_batch_size` is not used: it halves the batch without raising accumulation
(another effective batch, so other optimisation and another setup), restarts the epoch in-process
instead of resuming a checkpoint, never turns checkpointing on, and records nothing.

Testing switch: `QLORA_FAULT_OOM_AT_STEP=N` makes training step N raise `torch.cuda.OutOfMemoryError`
once per process (`fault_injection_callbacks`), so CPU tests run the real recovery path. Not for
production use.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from tasks.gpu import PlanRefused, TrainingPlan

FAULT_OOM_ENV = "QLORA_FAULT_OOM_AT_STEP"
_injected_at_steps: set[int] = set()  # steps this process already failed on purpose: the fault fires once


class OutOfMemoryGiveUp(PlanRefused):
    """Even a per-device batch of 1 with gradient checkpointing ran out of memory: no re-plan is left.

    A PlanRefused (a ConfigError), so the flow does not retry it: the same plan would fail the same way.
    """


def replan_after_oom(plan: TrainingPlan) -> TrainingPlan | None:
    """The next plan after an out-of-memory step, or None when nothing smaller is left.

    The per-device batch goes to its largest divisor at most half of it (halved for the usual powers of
    two) and accumulation rises by the same factor, so the effective batch, and with it what is trained,
    stays exactly the same. Gradient checkpointing is turned on if it was off. A batch of 1 with
    checkpointing already on has nothing left to give.
    """
    batch = plan.per_device_batch_size
    if batch <= 1 and plan.gradient_checkpointing:
        return None
    smaller = max((d for d in range(1, batch // 2 + 1) if batch % d == 0), default=1)
    factor = batch // smaller if batch > 1 else 1
    note = (f"re-planned after running out of memory: batch {batch}x{plan.gradient_accumulation_steps} -> "
            f"{smaller}x{plan.gradient_accumulation_steps * factor}"
            + ("" if plan.gradient_checkpointing else ", gradient checkpointing on"))
    return replace(plan, per_device_batch_size=smaller,
                   gradient_accumulation_steps=plan.gradient_accumulation_steps * factor,
                   gradient_checkpointing=True, notes=(*plan.notes, note))


def plan_change(before: TrainingPlan, after: TrainingPlan, at_step: int, resumed_from_step: int,
                error: str) -> dict[str, Any]:
    """One re-plan as recorded in the summary, the MLflow run and the lineage."""
    def split(plan: TrainingPlan) -> dict[str, Any]:
        return {"per_device_batch_size": plan.per_device_batch_size,
                "gradient_accumulation_steps": plan.gradient_accumulation_steps,
                "gradient_checkpointing": plan.gradient_checkpointing}

    return {"at_step": at_step, "resumed_from_step": resumed_from_step, "error": error[:300],
            "before": split(before), "after": split(after)}


def give_up_message(plan: TrainingPlan, at_step: int, error: str) -> str:
    return (
        f"training ran out of memory at step {at_step} even with per-device batch 1 and gradient checkpointing "
        f"(plan: {plan.summary()}); no smaller plan is left. Fix: lower data.max_seq_length, use a smaller "
        f"model or lora.r, or a GPU with more free memory (qlora check-gpu shows the estimate). Error: {error[:300]}"
    )


def fault_step_from_env() -> int | None:
    raw = os.environ.get(FAULT_OOM_ENV, "").strip()
    if not raw:
        return None
    try:
        step = int(raw)
    except ValueError:
        raise ValueError(f"{FAULT_OOM_ENV}={raw!r} must be a step number (a positive integer), or unset") from None
    if step < 1:
        raise ValueError(f"{FAULT_OOM_ENV}={raw!r} must be a step number (a positive integer), or unset")
    return step


def fault_injection_callbacks() -> list[Any]:
    """The testing switch as a Trainer callback: [] unless QLORA_FAULT_OOM_AT_STEP is set."""
    step = fault_step_from_env()
    if step is None:
        return []
    from transformers import TrainerCallback

    class InjectOutOfMemory(TrainerCallback):
        """Raises torch.cuda.OutOfMemoryError as training step `step` begins, once per process: the resumed
        training after the re-plan passes the same step again, and must not fail there a second time."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch

            if state.global_step + 1 == step and step not in _injected_at_steps:
                _injected_at_steps.add(step)
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory (injected by {FAULT_OOM_ENV}={step}; a testing switch)")

    return [InjectOutOfMemory()]
