"""Multi-process training from the train stage: 2 CPU ranks (gloo) under torchrun, for real.

The ranks are real torchrun subprocesses training the real demo model through the 4-bit path; the
kill test SIGKILLs the launcher's whole process group after a checkpoint. Planning rules are tested on
fake device reports (forced hardware, no model).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.schema import ConfigError, load_config
from tasks.gpu import GIB, DeviceInfo, DeviceReport, ModelStats, PlanRefused, plan_training
from tests.conftest import DEMO_CONFIG, REPO_ROOT

# Short runs: few steps, a small eval split, a checkpoint every 5 steps.
FAST = ["training.max_steps=12", "training.save_steps=6", "training.logging_steps=2",
        "training.per_device_batch_size=8", "data.eval_fraction=0.02", "training.warmup_ratio=0.0"]
TWO_RANKS = ["training.distributed=ddp", "training.num_processes=2"]
# Logged losses of 2 ranks against one process at the same global batch (8 = 2 x 4 against 1 x 8), same
# tokens trained in the same order. Synchronised gradients make them the same computation up to float
# rounding: measured here within 1e-6 relative at every point of 12 steps. Ranks that do not synchronise
# (each training alone on its half batch, as happened while the model was left unwrapped by DDP) drifted
# apart by up to 5% within 12 steps and 164% after 200, so the tolerance is tight.
LOSS_TOLERANCE = 1e-4


def gpus(count: int, memory_gib: float = 80) -> DeviceReport:
    devices = tuple(DeviceInfo(i, "NVIDIA H100 80GB HBM3", int(memory_gib * GIB), int(memory_gib * GIB * 0.97),
                               (9, 0), True) for i in range(count))
    return DeviceReport("2.13.0", "12.8", devices, "0.50.2", True, cpu_count=64, ram_total_bytes=512 * GIB)


NO_GPU = DeviceReport("2.13.0", None, (), "0.50.2", True, cpu_count=2, ram_total_bytes=24 * GIB)


@pytest.fixture(scope="module")
def demo_stats(demo_assets) -> ModelStats:
    from transformers import AutoConfig

    return ModelStats.from_model_config(AutoConfig.from_pretrained(demo_assets.model_dir))


def demo_config(demo_assets, *overrides: str):
    return load_config(DEMO_CONFIG, [f"data.path={demo_assets.data_path.resolve()}",
                                     f"model.name_or_path={demo_assets.model_dir.resolve()}", *overrides])


# --------------------------------------------------------------------------------------------------
# Planning: world size and the per-rank batch (fast, forced hardware)


@pytest.mark.parametrize(("batch", "accumulation", "ranks", "per_rank", "per_rank_accumulation"), [
    (16, 1, 2, 8, 1), (8, 4, 2, 8, 2), (8, 4, 8, 4, 1), (16, 2, 4, 8, 1), (6, 1, 4, None, None),
])
def test_the_plan_keeps_the_effective_batch_over_ranks(demo_assets, demo_stats, batch, accumulation, ranks,
                                                       per_rank, per_rank_accumulation) -> None:
    config = demo_config(demo_assets, "training.distributed=ddp", f"training.num_processes={ranks}",
                         f"training.per_device_batch_size={batch}",
                         f"training.gradient_accumulation_steps={accumulation}")
    if per_rank is None:
        with pytest.raises(PlanRefused, match=f"cannot be split evenly over {ranks} ranks"):
            plan_training(NO_GPU, config, demo_stats)
        return
    plan = plan_training(NO_GPU, config, demo_stats)
    assert (plan.world_size, plan.per_device_batch_size, plan.gradient_accumulation_steps) == \
        (ranks, per_rank, per_rank_accumulation)
    assert plan.effective_batch_size == batch * accumulation
    assert f"x{ranks}ranks(ddp) effective={batch * accumulation}" in plan.summary()


def test_auto_is_one_rank_per_gpu_and_more_ranks_than_gpus_is_refused(demo_assets, demo_stats) -> None:
    auto = plan_training(gpus(8), demo_config(demo_assets, "training.distributed=fsdp"), demo_stats)
    assert (auto.world_size, auto.distributed) == (8, "fsdp")
    assert any("bnb_4bit_quant_storage" in note for note in auto.notes)
    with pytest.raises(PlanRefused, match="only 2 GPU"):
        plan_training(gpus(2), demo_config(demo_assets, *TWO_RANKS[:1], "training.num_processes=4"), demo_stats)
    cpu_auto = plan_training(NO_GPU, demo_config(demo_assets, "training.distributed=ddp"), demo_stats)
    assert cpu_auto.world_size == 1 and any("set training.num_processes" in n for n in cpu_auto.notes)
    with pytest.raises(PlanRefused, match="fsdp needs GPUs"):
        plan_training(NO_GPU, demo_config(demo_assets, "training.distributed=fsdp", "training.num_processes=2"),
                      demo_stats)
    with pytest.raises(PlanRefused, match="distributed=none trains in one process"):
        plan_training(NO_GPU, demo_config(demo_assets, "training.num_processes=2"), demo_stats)
    single = plan_training(gpus(4), demo_config(demo_assets), demo_stats)
    assert single.world_size == 1 and not single.launches_ranks


def test_config_refuses_bad_distributed_settings(demo_assets) -> None:
    with pytest.raises(ConfigError, match="training.distributed"):
        demo_config(demo_assets, "training.distributed=horovod")
    with pytest.raises(ConfigError, match="num_processes must be 'auto' or > 0"):
        demo_config(demo_assets, "training.num_processes=0")
    with pytest.raises(ConfigError, match="replaces FSDP"):
        demo_config(demo_assets, "training.distributed=fsdp", "training.offload=zero2_cpu")


def test_check_gpu_shows_world_size_and_per_rank_batch(demo_assets) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "check-gpu", "--config", str(DEMO_CONFIG),
         "--set", f"model.name_or_path={demo_assets.model_dir.resolve()}",
         "--set", f"data.path={demo_assets.data_path.resolve()}", "--set", "training.per_device_batch_size=16",
         *[arg for item in TWO_RANKS for arg in ("--set", item)], "--json"],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert (plan["world_size"], plan["per_device_batch_size"], plan["gradient_accumulation_steps"]) == (2, 8, 1)


# --------------------------------------------------------------------------------------------------
# Real 2-rank training (torchrun, gloo)


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
            "HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false", **extra}


def logged_losses(checkpoint_dir: Path, step: int) -> dict[int, float]:
    state = json.loads((checkpoint_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {int(row["step"]): float(row["loss"]) for row in state["log_history"] if "loss" in row}


def test_two_ranks_train_the_adapter_like_one_process_and_only_rank_0_reports(demo_assets, tmp_path,
                                                                              mlflow_uri) -> None:
    import torch

    from tasks.adapter import read_train_summary
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.tracking import PipelineTracker
    from tasks.train import train
    from tasks.training_callback import training_callback

    two = demo_config(demo_assets, *FAST, *TWO_RANKS, f"training.output_dir={tmp_path / 'two'}",
                      f"registry.tracking_uri={mlflow_uri}")
    one = demo_config(demo_assets, *FAST, f"training.output_dir={tmp_path / 'one'}")
    splits = load_splits(two.data)
    _, plan_two = check_gpu(two)
    _, plan_one = check_gpu(one)
    assert plan_two.world_size == 2 and plan_two.effective_batch_size == plan_one.effective_batch_size == 8

    tracker = PipelineTracker.start(two)
    callback = training_callback(tracker, system_metrics=False)
    result = train(two, plan_two, splits, callbacks=[callback], run_id=tracker.run_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each rank (OMP_NUM_THREADS=1 on 2 cores): a loaded 2-core box crawls otherwise
    try:
        single = train(one, plan_one, splits)
    finally:
        torch.set_num_threads(threads)

    # The adapter trained: written once, by rank 0, and it lowered the eval loss.
    assert result.summary.global_step == 12 and result.adapter_dir.is_dir()
    assert result.summary.adapter_sha256 and read_train_summary(result.adapter_dir)["plan"]["world_size"] == 2
    assert result.summary.eval_loss_after < result.summary.eval_loss_before
    assert not list((tmp_path / "two").glob(".distributed-*")), "the launch folder is removed after the run"
    # The same tokens were trained (tokens are counted over all ranks).
    assert result.summary.train_tokens == single.summary.train_tokens

    # The loss curve matches the single process at the same global batch.
    curve_two = logged_losses(tmp_path / "two" / "checkpoints", 12)
    curve_one = logged_losses(tmp_path / "one" / "checkpoints", 12)
    assert sorted(curve_two) == sorted(curve_one) == [2, 4, 6, 8, 10, 12]
    for step, loss in curve_one.items():
        assert abs(curve_two[step] - loss) <= LOSS_TOLERANCE * loss, (curve_two, curve_one)

    # Rank 0 alone logged into the pipeline's MLflow run: each logging step once, not once per rank;
    # its history came back to the caller's callback.
    points = tracker.client.get_metric_history(tracker.run_id, "loss")
    assert sorted(int(p.step) for p in points) == [2, 4, 6, 8, 10, 12]
    assert [row["step"] for row in callback.history if "loss" in row] == [2, 4, 6, 8, 10, 12]


def test_a_failing_rank_fails_the_stage_with_its_traceback(demo_assets, tmp_path) -> None:
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.train import train

    config = demo_config(demo_assets, *FAST, *TWO_RANKS, f"training.output_dir={tmp_path / 'out'}",
                         "lora.target_modules=[no_such_proj]")
    _, plan = check_gpu(config)
    with pytest.raises(ConfigError) as raised:  # a config error in a rank stays a config error: not retried
        train(config, plan, load_splits(config.data))
    message = str(raised.value)
    assert "training rank" in message and "failed" in message
    assert "no_such_proj" in message and "Traceback" in message and "check_target_modules" in message


def test_a_killed_two_rank_run_resumes_from_its_checkpoint(demo_assets, tmp_path) -> None:
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.train import train

    out = tmp_path / "out"
    # killed as soon as checkpoint 5 is on disk: 25 steps to go leave the kill ample time to land first
    overrides = [*FAST, "training.max_steps=30", "training.save_steps=5", *TWO_RANKS, f"training.output_dir={out}",
                 f"model.name_or_path={demo_assets.model_dir.resolve()}",
                 f"data.path={demo_assets.data_path.resolve()}"]
    command = [sys.executable, "-m", "flows.cli", "train", "--config", str(DEMO_CONFIG),
               *[arg for item in overrides for arg in ("--set", item)]]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "checkpoints" / "checkpoint-5" / "trainer_state.json"
    try:
        deadline = time.monotonic() + 240
        while not first.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), "no checkpoint was written before the deadline"
        os.killpg(launcher.pid, signal.SIGKILL)  # the CLI, torchrun and both ranks: one process group
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    assert launcher.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists(), "the run finished before it was killed: the test proves nothing"
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
                    if (p / "trainer_state.json").exists())

    config = load_config(DEMO_CONFIG, overrides)
    _, plan = check_gpu(config)
    result = train(config, plan, load_splits(config.data))
    assert result.summary.resumed_from_step == killed_at >= 5
    assert result.summary.global_step == 30 and result.adapter_dir.is_dir()


def test_the_70b_fsdp_example_passes_the_schema_and_plans_8_ranks_on_8_gpus() -> None:
    """configs/llama-70b-fsdp.yaml on a forced 8 x H100 report, with Llama-3.1-70B's shapes (meta device)."""
    from transformers import LlamaConfig

    config = load_config(REPO_ROOT / "configs" / "llama-70b-fsdp.yaml")
    shapes = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256)
    plan = plan_training(gpus(8), config, ModelStats.from_model_config(shapes))
    assert (plan.world_size, plan.distributed, plan.compute_dtype) == (8, "fsdp", "bfloat16")
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps) == (2, 2)
    assert plan.effective_batch_size == 2 * 16


def test_zero2_offload_trains_with_deepspeeds_cpu_optimizer(demo_assets, tmp_path) -> None:
    """training.offload=zero2_cpu for real: DeepSpeed ZeRO-2 with the optimizer on the CPU, launched by
    the train stage. Needs the `offload` extra (`pip install -e '.[offload]'`); DeepSpeed JIT-compiles
    its CPU Adam on first use (~3 min here, cached in ~/.cache/torch_extensions afterwards)."""
    pytest.importorskip("deepspeed")
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.train import train

    config = demo_config(demo_assets, *FAST, "training.max_steps=4", "training.save_steps=2",
                         "training.offload=zero2_cpu", f"training.output_dir={tmp_path / 'out'}")
    _, plan = check_gpu(config)
    assert plan.offload == "zero2_cpu" and plan.launches_ranks
    result = train(config, plan, load_splits(config.data))
    summary = json.loads((result.adapter_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["plan"]["offload"] == "zero2_cpu"
    from safetensors.torch import load_file

    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # LoRA B starts at zero: it trained
    # DeepSpeed's own ZeRO checkpoint (partitioned optimizer states) next to the adapter weights
    checkpoints = tmp_path / "out" / "checkpoints"
    shards = list(checkpoints.glob("checkpoint-*/global_step*/zero_pp_rank_0_*optim_states.pt"))
    assert shards, "no ZeRO optimizer shard in the checkpoints: DeepSpeed did not train"


def test_offload_without_deepspeed_is_refused_with_the_fix(demo_assets, demo_stats) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here: test_zero2_offload_trains_with_deepspeeds_cpu_optimizer runs instead")
    with pytest.raises(PlanRefused, match=r"deepspeed is not installed.*pip install -e '\.\[offload\]'"):
        plan_training(NO_GPU, demo_config(demo_assets, "training.offload=zero2_cpu"), demo_stats)
