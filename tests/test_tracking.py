"""MLflow tracking: one tracker per pipeline run; every stage and the Trainer callback log into its run."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO_ROOT, typed_eval_report


def runs_in_experiment(client, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id])


def test_default_store_is_the_sqlite_file_in_the_repo_mlflow_folder(make_config, monkeypatch) -> None:
    from tasks.tracking import artifact_location, resolve_tracking_uri

    # as `make demo` runs: from the repo root, no store configured (tests/test_installed.py: elsewhere)
    monkeypatch.chdir(REPO_ROOT)
    for variable in ("QLORA_PIPELINE_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    uri = resolve_tracking_uri(make_config())
    assert uri == f"sqlite:///{REPO_ROOT / 'mlflow' / 'mlflow.db'}"
    assert artifact_location(uri) == (REPO_ROOT / "mlflow" / "artifacts").as_uri()
    assert not (REPO_ROOT / "mlflow" / "__init__.py").exists(), "mlflow/ must stay data, not a package"
    assert (REPO_ROOT / "mlflow" / "server.sh").exists()
    elsewhere = make_config("registry.tracking_uri=http://mlflow.example:5000")
    assert resolve_tracking_uri(elsewhere) == "http://mlflow.example:5000"


def test_every_stage_logs_into_the_one_pipeline_run(make_config, mlflow_uri, tmp_path) -> None:
    import mlflow

    from tasks.gpu import check_gpu
    from tasks.tracking import PipelineTracker, client_for
    from tasks.train import TrainSummary
    from tasks.validate import ValidationResult

    config = make_config(f"registry.tracking_uri={mlflow_uri}")
    tracker = PipelineTracker.start(config, run_name="stages")
    assert mlflow.active_run() is None, "no fluent run may stay open in the process"

    validation = ValidationResult(success=True, fingerprint="f" * 16, format="alpaca",
                                  row_counts={"rows": 12, "train": 10, "eval": 2},
                                  expectations=[{"name": "rows", "success": True, "observed": 12, "expected": ">= 1",
                                                 "examples": []}])
    tracker.log_validation(validation)
    report, plan = check_gpu(config)
    tracker.log_plan(report, plan)
    history = [{"step": 20, "loss": 3.1, "learning_rate": 1e-3}, {"step": 40, "loss": 1.2},
               {"step": 40, "eval_loss": 1.4}]
    summary = TrainSummary(global_step=40, resumed_from_step=0, train_loss=2.0, eval_loss_before=3.0,
                           eval_loss_after=1.4, train_tokens=1000, tokens_per_second=50.0, wall_time_s=20.0,
                           peak_memory_bytes=1 << 20, trainable_params=1000, plan=plan.to_dict())
    tracker.log_training(summary, history)
    evaluation = typed_eval_report()
    tracker.log_evaluation(evaluation)
    tracker.log_evaluation(evaluation)  # a retried evaluation must not append to the first table

    client = client_for(mlflow_uri)
    (run,) = runs_in_experiment(client, config.registry.experiment_name)
    assert run.info.run_id == tracker.run_id and run.info.status == "RUNNING"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["training.max_steps"] == "400" and params["lora.r"] == "16"
    assert params["registry.guard_metrics.rougeL"] == "1.0"
    assert params["lib.mlflow"] == mlflow.__version__ and "lib.torch" in tags
    assert tags["config_hash"] == config.config_hash()
    assert tags["validation_success"] == "true" and metrics["validation.row_counts.rows"] == 12
    assert tags["plan.device"] == "cpu" and tags["plan.load_in_4bit"] == "True"
    assert metrics["plan.estimated_memory_bytes"] > 0
    assert metrics["train.global_step"] == 40 and metrics["train.train_loss"] == 2.0
    assert metrics["eval.adapter.bleu"] == 80.0 and metrics["eval.base.bleu"] == 2.0
    assert metrics["eval.adapter_vs_base.bleu.delta"] == 78.0
    assert metrics["eval.adapter_vs_base.bleu.significant"] == 1.0

    run_id = tracker.run_id
    artifacts = {f.path for d in ("", "training", "validation", "gpu", "evaluation")
                 for f in client.list_artifacts(run_id, d or None)}
    assert {"training/loss_curve.png", "training/train_summary.json", "validation/summary.md",
            "gpu/plan.json", "gpu/device_report.json", "evaluation/report.json",
            "evaluation/samples.json", "evaluation/samples-2.json"} <= artifacts
    png = Path(client.download_artifacts(run_id, "training/loss_curve.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/evaluation/samples.json")
    assert table["columns"] == ["prompt", "reference", "base", "adapter"] and len(table["data"]) == 1
    # artifacts of a local sqlite store sit beside the database, never in a ./mlruns of the cwd
    experiment = client.get_experiment_by_name(config.registry.experiment_name)
    assert experiment.artifact_location == (tmp_path / "artifacts").as_uri()
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())


def test_the_tracker_travels_as_its_run_id_and_its_creator_ends_the_run(make_config, mlflow_uri) -> None:
    from tasks.tracking import PipelineTracker, client_for

    config = make_config(f"registry.tracking_uri={mlflow_uri}")
    tracker = PipelineTracker.start(config)
    tracker.log_metrics({"before": 1.0})  # its client exists now; a pickle must not carry it

    # what Prefect does with a task argument it hands to another worker: the copy reopens the same run
    copy = pickle.loads(pickle.dumps(tracker))
    assert (copy.run_id, copy.uri, copy._client) == (tracker.run_id, tracker.uri, None)
    copy.log_metrics({"from_the_copy": 2.0})
    client = client_for(mlflow_uri)
    assert client.get_run(tracker.run_id).data.metrics == {"before": 1.0, "from_the_copy": 2.0}

    with tracker:
        pass
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    crashed = PipelineTracker.start(config)
    with pytest.raises(KeyboardInterrupt), crashed:
        raise KeyboardInterrupt  # a crashed (or interrupted) night must not stay RUNNING
    assert client.get_run(crashed.run_id).info.status == "FAILED"
    # stages log into the run they were given: both runs are their own, none was reopened by URI lookup
    assert len(runs_in_experiment(client, config.registry.experiment_name)) == 2


def test_importing_tracking_does_not_import_transformers() -> None:
    """The CLI and registration import tracking; transformers costs ~15 s to import on a small CPU."""
    code = "import sys, tasks.tracking, tasks.register; print('transformers' in sys.modules)"
    ran = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "False"


def test_training_callback_logs_each_step_into_the_given_run(make_config, demo_assets, mlflow_uri, tmp_path) -> None:
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.tracking import PipelineTracker, client_for
    from tasks.train import train
    from tasks.training_callback import training_callback

    # the real callback in a real Trainer, kept short: a slice of the demo data, small batches, no eval
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(demo_assets.data_path.read_text().splitlines()[:64]) + "\n")
    config = make_config(f"registry.tracking_uri={mlflow_uri}", f"data.path={small}", "training.max_steps=2",
                         "training.logging_steps=1", "training.save_steps=2", "training.per_device_batch_size=4")
    tracker = PipelineTracker.start(config)
    callback = training_callback(tracker, system_metrics=False)
    _, plan = check_gpu(config)
    splits = load_splits(config.data)
    splits.eval = []
    result = train(config, plan, splits, callbacks=[callback], run_id=tracker.run_id)
    tracker.log_training(result.summary, callback.history)

    run_id = tracker.run_id
    client = client_for(mlflow_uri)
    (run,) = runs_in_experiment(client, config.registry.experiment_name)  # no second run (HF integration off)
    assert run.info.run_id == run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "memory_rss_bytes"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert all(m.value > 0 for m in history), key
    assert "train_loss" in run.data.metrics and run.data.metrics["train.global_step"] == 2
    assert callback.pending == []
    assert "training/loss_curve.png" in {f.path for f in client.list_artifacts(run_id, "training")}


def test_training_callback_samples_system_metrics_and_survives_a_dead_store(make_config, mlflow_uri) -> None:
    from tasks.tracking import PipelineTracker, client_for
    from tasks.training_callback import training_callback

    config = make_config(f"registry.tracking_uri={mlflow_uri}")
    tracker = PipelineTracker.start(config)
    callback = training_callback(tracker, system_metrics=True, system_metrics_interval_s=0.5)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    time.sleep(2.5)
    state.global_step, state.num_input_tokens_seen = 10, 5000
    callback.on_log(None, state, None, logs={"loss": 1.5, "learning_rate": 1e-3, "grad_norm": 0.7})
    callback.on_train_end(None, state, None)
    metrics = client_for(mlflow_uri).get_run(tracker.run_id).data.metrics
    assert metrics["loss"] == 1.5 and metrics["tokens_per_second"] > 0
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    assert any(k.startswith("system/system_memory_usage") for k in metrics), sorted(metrics)

    # the tracking store going away mid-training must not stop training: metrics wait for the next log
    dead = training_callback(PipelineTracker(tracker.run_id, "http://127.0.0.1:1"), system_metrics=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        patch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        dead.on_log(None, state, None, logs={"loss": 1.0})
    assert dead.pending and dead.history[-1]["loss"] == 1.0
