"""Multi-process training: the train stage launches its ranks under `torchrun` and waits for them.

When the plan has more than one rank (`training.distributed: ddp | fsdp` with `num_processes` > 1) or
offloads the optimizer with DeepSpeed, `tasks.train.train` hands over to `launch_training` here:

- The parent (the Prefect task or `qlora train`) holds the output dir, writes the run's inputs (the
  config, the plan, the loaded splits and the MLflow run id and URI) to a JSON spec file, and starts
  `python -m torch.distributed.run --nproc_per_node N -m tasks.distributed_worker SPEC`: torchrun is
  the launcher, not code of ours, and only the train stage runs in the ranks, never the whole flow.
- Each rank (`tasks.distributed_worker`) reads the spec and calls the same `tasks.train.train` path.
  The Trainer sets up the process group (gloo on the CPU, nccl on GPUs) and the DistributedSampler;
  each rank loads its 4-bit base on its own GPU (`tasks.modeling.local_device`). Rank 0 alone writes
  checkpoints (the Trainer's own rule), the adapter and the summary, and logs to MLflow through a
  `PipelineTracker` rebuilt from (run_id, uri).
- The parent streams the ranks' output line by line into its logger (the Prefect run logger when it
  runs in a task). A rank that fails writes its traceback to torchrun's per-rank error file
  (`torch.distributed.elastic.multiprocessing.errors.record`); the parent raises
  `DistributedTrainingError` with the failing rank and that traceback (a `ConfigError` in a rank is
  raised as a ConfigError, so the flow does not retry it).
- Resume is the single-process one: checkpoints are ordinary Trainer checkpoints in
  `<output_dir>/checkpoints`, and the parent clears or moves aside what must not be resumed before
  any rank starts, so the ranks only read them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, PipelineConfig
from tasks.data import DatasetSplits, Example
from tasks.gpu import TrainingPlan

logger = logging.getLogger(__name__)

IN_RANK_ENV = "QLORA_DISTRIBUTED_RANK"  # set by launch_training for its ranks: "this process is a rank"
SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"


class DistributedTrainingError(RuntimeError):
    """A rank of a multi-process training run failed; the message carries its rank and traceback."""


def in_launched_rank() -> bool:
    """True inside a rank that `launch_training` started (its parent holds the output dir)."""
    return os.environ.get(IN_RANK_ENV) == "1"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_rank() -> bool:
    """Rank 0, or the only process: the one that writes files and reports."""
    return rank() == 0


def distributed_arguments(plan: TrainingPlan) -> dict[str, Any]:
    """`TrainingArguments` settings for the plan's strategy; empty for one plain process.

    - ddp: gloo on the CPU (nccl is GPU-only); no search for unused parameters (LoRA uses all of its
      own, and the frozen base has no gradients to reduce).
    - fsdp: FSDP-QLoRA as in the peft/accelerate recipe: full sharding wrapped by peft's
      `fsdp_auto_wrap_policy` (the Trainer applies it to a peft model), `use_orig_params` off (frozen
      4-bit and trainable LoRA weights in one flat parameter), CPU-RAM-efficient loading. The 4-bit
      weights are stored in the compute dtype (`tasks.modeling.quantization_config`), so FSDP can
      flatten them with the rest.
    - zero2_cpu: DeepSpeed ZeRO-2 with optimizer states in CPU memory; DeepSpeed's own CPU Adam
      replaces the configured optimizer (ZeRO-Offload needs it); "auto" values come from the Trainer.
    """
    args: dict[str, Any] = {}
    if plan.world_size > 1 and plan.device == "cpu":
        args["ddp_backend"] = "gloo"
    if plan.distributed == "ddp":
        args["ddp_find_unused_parameters"] = False
    elif plan.distributed == "fsdp":
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = {"use_orig_params": False, "cpu_ram_efficient_loading": True,
                               "sync_module_states": True}
    if plan.offload == "zero2_cpu":
        args["deepspeed"] = {
            "zero_optimization": {"stage": 2,
                                  "offload_optimizer": {"device": "cpu", "pin_memory": plan.device == "cuda"}},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}},
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
        }
    return args


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux `PR_SET_PDEATHSIG`).

    torchrun starts each rank in a session of its own, so a `kill -9` of the launching process group
    (a crashed worker, a cancelled flow run) would leave the ranks training on, without the output-dir
    lock, into the folder the next run resumes from. Applied to torchrun (as its `preexec_fn`) and by
    each rank at start, a dead launcher takes its ranks with it; the sweep's trial processes
    (`flows.sweep.trial_runner`) apply it too. Elsewhere than Linux this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, 9, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def free_port() -> int:
    """A free local TCP port for the ranks' rendezvous, so concurrent runs never collide on one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(spec_path: Path, plan: TrainingPlan, log_dir: Path) -> list[str]:
    """torchrun (`python -m torch.distributed.run`, the same interpreter) starting the ranks' entry module.

    Standalone rendezvous on a free port; `--log-dir` is where the per-rank error files go; `--tee 3`
    keeps each rank's stdout and stderr on the launcher's output (prefixed with the rank), which the
    parent streams, and copies them under `--log-dir`.
    """
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(plan.world_size),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "--log-dir", str(log_dir), "--tee", "3", "--max-restarts", "0",
        "-m", "tasks.distributed_worker", str(spec_path),
    ]


def write_spec(path: Path, config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits,
               run_id: str | None, tracking_uri: str | None, system_metrics: bool | None) -> None:
    """Everything a rank needs, as JSON: the ranks get the data the flow loaded, not a re-read."""
    spec = {
        "config": config.model_dump(mode="json"),
        "plan": plan.to_dict(),
        "splits": asdict(splits),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "system_metrics": system_metrics,
    }
    path.write_text(json.dumps(spec))


def read_spec(path: Path) -> tuple[PipelineConfig, TrainingPlan, DatasetSplits, dict[str, Any]]:
    """The spec `write_spec` wrote: typed config, plan and splits, plus the tracking fields."""
    spec = json.loads(Path(path).read_text())
    config = PipelineConfig.model_validate(spec["config"])
    plan = TrainingPlan.from_dict(spec["plan"])
    raw = spec["splits"]
    examples = {part: [Example(**{**row, "prompt_messages": tuple(row["prompt_messages"])}) for row in raw[part]]
                for part in ("train", "eval")}
    splits = DatasetSplits(**{**raw, **examples})
    return config, plan, splits, spec


def failed_rank_errors(log_dir: Path) -> list[tuple[int, str]]:
    """(rank, message with traceback) from each error file torchrun's ranks wrote under `log_dir`.

    The file is the one `torch.distributed.elastic.multiprocessing.errors.record` writes
    (`<log_dir>/<run>/attempt_<n>/<rank>/error.json`); sorted by the time each rank failed.
    """
    found: list[tuple[float, int, str]] = []
    for path in log_dir.rglob("error.json"):
        try:
            data = json.loads(path.read_text())
            message = data.get("message", {})
            if isinstance(message, dict):
                extra = message.get("extraInfo", {})
                text = f"{message.get('message', '')}\n{extra.get('py_callstack', '')}".strip()
                stamp = float(extra.get("timestamp", 0) or 0)
            else:
                text, stamp = str(message), 0.0
            found.append((stamp, int(path.parent.name), text))
        except (OSError, ValueError):
            continue
    return [(rank_id, text) for _, rank_id, text in sorted(found)]


def launch_training(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits,
                    callbacks: list[Any] | None = None, run_id: str | None = None) -> Any:
    """Train with `plan.world_size` ranks under torchrun; returns rank 0's `TrainResult`.

    The MLflow run is taken from the tracker of the first callback that has one (the flow passes
    `training_callback(tracker)`): rank 0 logs into it with its own callback, and the rank-0 loss
    history is copied into each given callback's `history` afterwards, as if it had run here.
    """
    from tasks.checkpoints import CHECKPOINT_DIRNAME, checkpoint_to_resume, training_setup_hash
    from tasks.registry import resolve_init_adapter
    from tasks.train import TrainResult, TrainSummary

    tracker = next((cb.tracker for cb in callbacks or [] if getattr(cb, "tracker", None) is not None), None)
    system_metrics = next((cb.system_metrics for cb in callbacks or [] if hasattr(cb, "system_metrics")), None)
    output_dir = Path(config.training.output_dir)
    # Clear or move aside what must not be resumed before any rank starts, so that the ranks only read.
    setup_hash = training_setup_hash(config, plan, splits, resolve_init_adapter(config))
    checkpoint_to_resume(output_dir / CHECKPOINT_DIRNAME, setup_hash, config.training.resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".distributed-*"):  # a killed launch's folder; the lock says none is live
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".distributed-", dir=output_dir) as workdir:
        work = Path(workdir)
        spec_path = work / SPEC_FILE
        write_spec(spec_path, config, plan, splits, run_id or (tracker.run_id if tracker else None),
                   tracker.uri if tracker else None, system_metrics)
        command = torchrun_command(spec_path, plan, work / "logs")
        env = {**os.environ, IN_RANK_ENV: "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS":
               os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.world_size)))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path.cwd()), os.environ.get("PYTHONPATH", "")) if p)
        log = _run_logger()
        log.info("launching %d ranks (%s): %s", plan.world_size, plan.distributed, " ".join(command))
        tail: list[str] = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              bufsize=1, preexec_fn=die_with_parent) as process:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip()
                log.info("%s", line)
                tail = [*tail[-39:], line]
            code = process.wait()
        if code != 0:
            raise _failure(code, failed_rank_errors(work / "logs"), tail)
        result = json.loads((work / RESULT_FILE).read_text())
    for callback in callbacks or []:
        if isinstance(getattr(callback, "history", None), list):
            callback.history.extend(result["history"])
    return TrainResult(adapter_dir=Path(result["adapter_dir"]), summary=TrainSummary(**result["summary"]))


def _failure(code: int, errors: list[tuple[int, str]], tail: list[str]) -> Exception:
    """The error for a failed launch: the first failing rank's traceback, else the output's tail."""
    if not errors:
        return DistributedTrainingError(f"torchrun exited with code {code} and no rank left an error file "
                                        "(killed, or failed before training started); last output:\n"
                                        + "\n".join(tail))
    first_rank, text = errors[0]
    others = f" (ranks {', '.join(str(r) for r, _ in errors[1:])} failed too)" if len(errors) > 1 else ""
    message = f"training rank {first_rank} failed{others}:\n{text}"
    if any(name in text for name in ("ConfigError", "PlanRefused", "DataError")):
        return ConfigError(message)
    return DistributedTrainingError(message)


def _run_logger() -> Any:
    """The Prefect run logger inside a task or flow run (logs reach the UI), else this module's."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            return logger
    except ImportError:
        return logger
