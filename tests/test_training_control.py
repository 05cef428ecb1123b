"""Training control on the real demo QLoRA run: keep the best evaluated step, stop early, and the config rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from configs.schema import ConfigError
from tasks.adapter import SUMMARY_FILE
from tasks.checkpoints import CHECKPOINT_DIRNAME, training_setup_hash
from tasks.data import load_splits
from tasks.gpu import check_gpu
from tasks.register import training_outcome_tags
from tasks.train import train

# A learning rate far too high for the demo: eval loss soon stops falling, so patience 1 stops the run.
# Where depends on the CPU's kernels: measured on an AVX512-BF16 Xeon, 7.1 at step 2 and 8.4 at step 4
# (stopped at 4); on an AVX2-only EPYC it fell for 8 evaluations (9.15 ... 5.60 at step 16, 5.62 at
# step 18: stopped at 18). max_steps leaves room for both, and the run must stop well before it.
DIVERGING = ["training.learning_rate=0.5", "training.lr_scheduler=constant_with_warmup", "training.warmup_ratio=0",
             "training.max_steps=60", "training.eval_steps=2", "training.save_steps=2", "training.logging_steps=2",
             "training.early_stopping_patience=1", "training.save_total_limit=1"]


def test_early_stopping_without_evaluations_is_refused(make_config) -> None:
    with pytest.raises(ConfigError, match="early_stopping_patience=2 needs evaluations.*training.eval_steps"):
        make_config("training.early_stopping_patience=2")


def test_keep_best_needs_a_checkpoint_at_every_evaluation(make_config) -> None:
    with pytest.raises(ConfigError, match="save_steps=100 differs from eval_steps=10.*training.save_steps=10"):
        make_config("training.eval_steps=10", "training.save_steps=100")
    assert make_config("training.eval_steps=10", "training.save_steps=100",
                       "training.keep_best=false").training.save_steps == 100


def test_save_steps_follows_eval_steps_when_not_set(demo_assets, tmp_path) -> None:
    from configs.schema import PipelineConfig

    config = PipelineConfig.model_validate({
        "data": {"path": str(demo_assets.data_path)}, "model": {"name_or_path": str(demo_assets.model_dir)},
        "training": {"output_dir": str(tmp_path), "eval_steps": 25}})
    assert config.training.save_steps == 25 and config.training.selects_best


def test_setup_hash_counts_best_step_settings_only_when_evaluations_pick_a_step(make_config) -> None:
    config = make_config()
    splits = load_splits(config.data)
    _, plan = check_gpu(config)

    def setup(*overrides: str) -> str:
        return training_setup_hash(make_config(*overrides), plan, splits)

    assert setup() == setup("training.keep_best=false")  # no eval_steps: keep_best is inert
    evaluated = ["training.eval_steps=5", "training.save_steps=5"]
    assert setup(*evaluated) != setup(*evaluated, "training.early_stopping_patience=3")
    assert setup(*evaluated, "training.early_stopping_patience=3") != setup(*evaluated,
                                                                            "training.early_stopping_patience=4")
    assert setup(*evaluated) != setup("training.eval_steps=10", "training.save_steps=10")


def test_a_diverging_run_stops_early_and_keeps_the_best_step(make_config, tmp_path) -> None:
    config = make_config(*DIVERGING, output_dir=tmp_path / "run")
    splits = load_splits(config.data)
    splits.eval = splits.eval[:8]
    _, plan = check_gpu(config)
    summary = train(config, plan, splits).summary

    losses = {e["step"]: e["eval_loss"] for e in summary.evaluations}
    assert summary.stopped_early and summary.global_step < config.training.max_steps
    assert "early stopping" in summary.stop_reason and f"step {summary.best_step}" in summary.stop_reason
    assert summary.best_step == min(losses, key=losses.get) < summary.global_step
    assert losses[summary.global_step] > losses[summary.best_step]  # the last step is worse: it was not kept
    assert summary.best_metric == "eval_loss" and summary.best_metric_value == pytest.approx(losses[summary.best_step])
    assert summary.adapter_step == summary.best_step
    # the written adapter is the best step's: its eval loss is the best evaluation's, and its weights are
    # the best checkpoint's, which save_total_limit=1 did not delete
    assert summary.eval_loss_after == pytest.approx(summary.best_metric_value, abs=1e-4)
    best_checkpoint = tmp_path / "run" / CHECKPOINT_DIRNAME / f"checkpoint-{summary.best_step}"
    kept = load_file(best_checkpoint / "adapter_model.safetensors")
    adapter_dir = tmp_path / "run" / "adapter"
    written = load_file(adapter_dir / "adapter_model.safetensors")
    assert kept.keys() == written.keys()
    for name, tensor in kept.items():
        torch.testing.assert_close(written[name], tensor)
    recorded = json.loads((adapter_dir / SUMMARY_FILE).read_text())
    assert recorded["best_step"] == summary.best_step and recorded["stopped_early"] is True
    lineage = training_outcome_tags(recorded)  # what registration tags the version with
    assert lineage["training.stopped_early"] == "true" and lineage["training.best_step"] == str(summary.best_step)
    assert lineage["training.stop_reason"] == summary.stop_reason


# ---- out-of-memory re-plan (tasks.oom), through the real recovery path with the testing switch


def test_replan_keeps_the_effective_batch_and_gives_up_at_one_with_checkpointing(make_config) -> None:
    from dataclasses import replace

    from tasks.oom import replan_after_oom

    _, planned = check_gpu(make_config())
    plan = replace(planned, per_device_batch_size=16, gradient_accumulation_steps=1, gradient_checkpointing=False)
    seen = []
    while plan is not None:
        seen.append((plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing))
        plan = replan_after_oom(plan)
    assert seen == [(16, 1, False), (8, 2, True), (4, 4, True), (2, 8, True), (1, 16, True)]
    odd = replan_after_oom(replace(planned, per_device_batch_size=12, gradient_accumulation_steps=3))
    assert (odd.per_device_batch_size, odd.gradient_accumulation_steps) == (6, 6)
    three = replan_after_oom(replace(planned, per_device_batch_size=3, gradient_accumulation_steps=2))
    assert (three.per_device_batch_size, three.gradient_accumulation_steps) == (1, 6)  # 3x2 == 1x6
    # batch 1 without checkpointing still has one move left: checkpointing on
    last = replan_after_oom(replace(planned, per_device_batch_size=1, gradient_checkpointing=False))
    assert last.per_device_batch_size == 1 and last.gradient_accumulation_steps == planned.gradient_accumulation_steps
    assert last.gradient_checkpointing and "re-planned after running out of memory" in last.notes[-1]


def test_setup_hash_follows_the_effective_batch_not_its_split(make_config) -> None:
    from dataclasses import replace

    config = make_config()
    splits = load_splits(config.data)
    _, plan = check_gpu(config)
    planned = replace(plan, per_device_batch_size=16, gradient_accumulation_steps=1)
    assert training_setup_hash(config, planned, splits) == training_setup_hash(
        config, replace(planned, per_device_batch_size=8, gradient_accumulation_steps=2, gradient_checkpointing=True),
        splits)
    assert training_setup_hash(config, planned, splits) != training_setup_hash(
        config, replace(planned, per_device_batch_size=8), splits)


def test_out_of_memory_at_step_30_replans_and_finishes_the_configured_steps(make_config, tmp_path,
                                                                           monkeypatch) -> None:
    import tasks.oom

    monkeypatch.setenv(tasks.oom.FAULT_OOM_ENV, "30")
    monkeypatch.setattr(tasks.oom, "_injected_at_steps", set())
    # just past the injected step: checkpoints at 8, 16 and 24 before it, so the re-planned run resumes
    # from 24 and trains 8 steps (batch 8 x 2) to the configured 32
    config = make_config("training.max_steps=32", "training.save_steps=8", "training.logging_steps=8",
                         "training.per_device_batch_size=16", "training.gradient_accumulation_steps=1",
                         output_dir=tmp_path / "run")
    splits = load_splits(config.data)
    splits.train, splits.eval = splits.train[:512], splits.eval[:8]  # 32 batches of 16: no unused rows tokenized
    _, plan = check_gpu(config)
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps) == (16, 1)
    told = []
    result = train(config, plan, splits, on_replan=lambda change, new_plan: told.append((change, new_plan)))

    summary = result.summary
    assert summary.global_step == config.training.max_steps
    (change,) = summary.replans
    assert change["at_step"] == 30 and change["resumed_from_step"] == 24
    assert change["before"] == {"per_device_batch_size": 16, "gradient_accumulation_steps": 1,
                                "gradient_checkpointing": plan.gradient_checkpointing}
    assert change["after"] == {"per_device_batch_size": 8, "gradient_accumulation_steps": 2,
                               "gradient_checkpointing": True}
    assert "out of memory" in change["error"].lower()
    assert told and told[0][0] == change and told[0][1].per_device_batch_size == 8
    assert (result.plan.per_device_batch_size, result.plan.gradient_accumulation_steps) == (8, 2)
    assert summary.plan["per_device_batch_size"] == 8 and summary.plan["gradient_checkpointing"] is True
    # resumed as the same setup: the checkpoints were continued, not moved aside as another setup's
    run = tmp_path / "run"
    assert not list(run.glob(f"{CHECKPOINT_DIRNAME}.stale-*"))
    state = json.loads((run / CHECKPOINT_DIRNAME / "checkpoint-32" / "trainer_state.json").read_text())
    # (state["train_batch_size"] stays 16: transformers keeps the resumed checkpoint's value; the split is the plan's)
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [8, 16, 24, 32]
    recorded = json.loads((result.adapter_dir / SUMMARY_FILE).read_text())
    assert json.loads(training_outcome_tags(recorded)["training.replans"]) == [change]


def test_out_of_memory_at_batch_one_with_checkpointing_gives_up_clearly(make_config, tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    import tasks.oom

    monkeypatch.setenv(tasks.oom.FAULT_OOM_ENV, "1")
    monkeypatch.setattr(tasks.oom, "_injected_at_steps", set())
    config = make_config("training.max_steps=2", output_dir=tmp_path / "run")
    splits = load_splits(config.data)
    splits.eval = splits.eval[:4]
    _, plan = check_gpu(config)
    smallest = replace(plan, per_device_batch_size=1, gradient_accumulation_steps=16, gradient_checkpointing=True)
    with pytest.raises(tasks.oom.OutOfMemoryGiveUp, match="step 1 even with per-device batch 1 and gradient "
                                                           "checkpointing.*Fix: lower data.max_seq_length"):
        train(config, smallest, splits)
    assert not (tmp_path / "run" / "adapter").exists()


def test_fault_switch_refuses_a_value_that_is_not_a_step(monkeypatch) -> None:
    from tasks.oom import FAULT_OOM_ENV, fault_injection_callbacks

    monkeypatch.setenv(FAULT_OOM_ENV, "thirty")
    with pytest.raises(ValueError, match="QLORA_FAULT_OOM_AT_STEP='thirty' must be a step number"):
        fault_injection_callbacks()
    monkeypatch.delenv(FAULT_OOM_ENV)
    assert fault_injection_callbacks() == []


def test_a_replan_is_recorded_in_the_pipeline_run_as_it_happens(make_config, mlflow_uri) -> None:
    """What the flow's train task does with each re-plan (flows.finetune.replan_recorder), on a real store."""
    from dataclasses import replace

    from tasks.oom import plan_change, replan_after_oom
    from tasks.tracking import PipelineTracker

    config = make_config(f"registry.tracking_uri={mlflow_uri}")
    _, plan = check_gpu(config)
    before = replace(plan, per_device_batch_size=16, gradient_accumulation_steps=1, gradient_checkpointing=False)
    after = replan_after_oom(before)
    change = plan_change(before, after, at_step=30, resumed_from_step=20, error="CUDA out of memory")
    with PipelineTracker.start(config) as tracker:
        tracker.log_plan(check_gpu(config)[0], before)
        tracker.log_replan(change, after)
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags["plan.per_device_batch_size"] == "8"
    assert run.data.tags["plan.gradient_accumulation_steps"] == "2"
    assert run.data.tags["plan.gradient_checkpointing"] == "True"
    assert json.loads(run.data.tags["replan.step_30"]) == change
    artifacts = {a.path for a in tracker.client.list_artifacts(tracker.run_id, "training")}
    assert "training/replan-step-30.json" in artifacts


def test_compile_reaches_the_trainer_and_a_compiled_run_resumes_an_eager_one(make_config, tmp_path) -> None:
    """`training.compile` turns on the Trainer's own torch.compile (a compiled run: the test below, and
    benchmark 1c for its speed); it changes kernels, not what is trained, so a checkpoint written eagerly
    stays resumable with it on."""
    from tasks.train import training_arguments

    config = make_config()
    compiled = make_config("training.compile=true")
    _, plan = check_gpu(config)
    assert config.training.compile is False
    assert training_arguments(compiled, plan, tmp_path, 10).torch_compile is True
    assert training_arguments(config, plan, tmp_path, 10).torch_compile is False
    splits = load_splits(config.data)
    assert training_setup_hash(config, plan, splits) == training_setup_hash(compiled, plan, splits)


def test_a_compiled_run_trains_like_an_eager_one(make_config, demo_data_slice, tmp_path) -> None:
    """training.compile=true for real: the Trainer compiles the 4-bit peft model (torch.compile) and trains;
    same data and seed as an eager run, so the same losses up to kernel rounding."""
    from collections import Counter
    from dataclasses import replace

    from tasks.data import tokenize_example
    from tasks.modeling import load_tokenizer

    # Rows of one token length only: every batch then has one shape, so inductor compiles the training step
    # once instead of again for the first batch of another length (each compile takes ~45 s on 2 CPU cores).
    config = make_config(f"data.path={demo_data_slice}")
    tokenizer = load_tokenizer(config)
    splits = load_splits(config.data)
    lengths = {e.row: len(tokenize_example(tokenizer, e, config.data.max_seq_length)["input_ids"])
               for e in splits.train + splits.eval}
    common = Counter(lengths.values()).most_common(1)[0][0]
    rows = demo_data_slice.read_text().splitlines()
    same_length = tmp_path / "same-length.jsonl"
    same_length.write_text("".join(rows[row] + "\n" for row, length in sorted(lengths.items()) if length == common))

    runs = {}
    for compiled in (False, True):
        config = make_config(f"data.path={same_length}", "training.max_steps=3", "training.save_steps=3",
                             "training.logging_steps=1", "training.packing=false", "evaluation.max_rows=4",
                             "training.per_device_batch_size=8", f"training.compile={str(compiled).lower()}",
                             "training.resume=false", output_dir=tmp_path / f"compiled-{compiled}")
        _, plan = check_gpu(config)
        splits = load_splits(config.data)
        assert len(splits.train) >= 24 and len(splits.eval) >= 4, (len(splits.train), len(splits.eval))
        runs[compiled] = train(config, plan, replace(splits, eval=splits.eval[:4])).summary
    assert runs[True].global_step == runs[False].global_step == 3
    assert runs[True].train_loss == pytest.approx(runs[False].train_loss, rel=1e-3)
