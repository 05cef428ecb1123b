"""The checkpoint folder of a training run: what may be resumed, and which run wrote what.

A rerun resumes only an unfinished run of the same setup (`training_setup_hash`); a finished run's
checkpoints are cleared and another setup's are moved aside. `training_run.json` (the run marker)
records the setup hash, whether the run completed, and the chain of MLflow runs that trained in the
folder, so a resumed run can name the run it resumed from. Used by the train stage and by the
multi-process launcher, which must decide the same way before it starts the ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.schema import PipelineConfig
from tasks.data import DatasetSplits
from tasks.gpu import TrainingPlan

if TYPE_CHECKING:
    from tasks.adapter import InitAdapter

CHECKPOINT_DIRNAME = "checkpoints"
INITIAL_EVAL_FILE = "initial_eval.json"
RUN_FILE = "training_run.json"

logger = logging.getLogger(__name__)


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


# Settings that change how often things are written or how a step is run, not what is trained: a
# checkpoint stays valid when only these differ.
_BOOKKEEPING_KEYS = {"output_dir", "resume", "save_steps", "save_total_limit", "logging_steps", "eval_steps",
                     "output_dir_lock", "lock_timeout_s", "compile"}  # compile: same math, another kernel


# Settings that decide which evaluated step becomes the adapter and when training stops. Inert without
# evaluations during training; with them, a resume under other values would give an adapter that no
# one config describes, so they count as setup then (eval_steps too: it sets which steps compete).
_BEST_STEP_KEYS = {"eval_steps", "early_stopping_patience", "best_metric", "keep_best"}
# How the effective batch is split (per-device batch x accumulation) and whether activations are
# recomputed: the plan's effective batch stands for them. An out-of-memory re-plan changes the split
# and turns checkpointing on, and resuming under it is the same setup.
_SPLIT_KEYS = {"per_device_batch_size", "gradient_accumulation_steps", "gradient_checkpointing"}


# Keys that joined the schema after checkpoints were first hashed: left out while unset, so the
# checkpoints of a config that does not use them keep their hash (and resume).
_LATER_DATA_KEYS = {"sources", "mix_seed", "mix_stopping"}


def training_setup_hash(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits,
                        init: InitAdapter | None = None) -> str:
    """What a checkpoint's weights and optimizer state depend on: model, quantization, LoRA, data
    settings and content, training hyper-parameters, the best-step settings when evaluations pick one,
    the plan's effective batch (not its per-device split) and dtype, and the adapter training starts
    from (`init`, `training.init_adapter` resolved: its content hash, so a moved alias is another setup)."""
    if config.training.init_adapter and init is None:
        raise ValueError("training.init_adapter is set: pass the resolved InitAdapter (tasks.registry."
                         "resolve_init_adapter) so the setup hash covers the adapter's content")
    best_step = _BEST_STEP_KEYS if not config.training.selects_best else set()
    ignored = (_BOOKKEEPING_KEYS - _BEST_STEP_KEYS) | best_step | _SPLIT_KEYS | {"init_adapter"}
    training = {k: v for k, v in config.training.model_dump(mode="json").items() if k not in ignored}
    data = config.data.model_dump(mode="json", exclude=_LATER_DATA_KEYS if config.data.sources is None else None)
    setup = {
        "model": config.model.model_dump(mode="json"),
        "quantization": config.quantization.model_dump(mode="json"),
        "lora": config.lora.model_dump(mode="json"),
        "data": data,
        "data_fingerprint": splits.fingerprint,
        "training": training,
        "plan": [plan.per_device_batch_size * plan.gradient_accumulation_steps, plan.compute_dtype, plan.load_in_4bit],
    }
    if plan.launches_ranks:  # only then, so single-process checkpoints keep their hash
        setup["ranks"] = [plan.world_size, plan.distributed, plan.offload]
    if init is not None:
        setup["init_adapter"] = init.adapter_sha256
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


def last_checkpoint_step(checkpoint_dir: Path) -> int:
    found = last_checkpoint(checkpoint_dir)
    return int(Path(found).name.split("-")[-1]) if found else 0
