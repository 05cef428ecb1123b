"""The Prefect flow end to end on the demo, under a real (temporary) Prefect server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from tests.conftest import DEMO_CONFIG, REPO_ROOT, SHORT_TRAINING, demo_overrides

ARTIFACT_KEYS = {"validation-summary", "gpu-plan", "evaluation-report", "registration", "sample-predictions"}


def flow_overrides(demo_assets, tmp_path: Path, *extra: str) -> list[str]:
    return demo_overrides(demo_assets, tmp_path, *SHORT_TRAINING, *extra)


async def artifact_keys(flow_run_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key for a in artifacts if a.key}


class CrashOnceAfterCheckpoint(TrainerCallback):
    """Kills the first training attempt right after its first checkpoint is on disk."""

    crashed_at: int | None = None

    def on_save(self, args, state, control, **kwargs):
        if CrashOnceAfterCheckpoint.crashed_at is None:
            CrashOnceAfterCheckpoint.crashed_at = state.global_step
            raise RuntimeError(f"simulated worker crash at step {state.global_step}")


@pytest.mark.usefixtures("mlflow_uri")  # the store demo_overrides names, already migrated
def test_flow_completes_resumes_after_a_crash_and_registers(prefect_server, demo_assets, tmp_path, monkeypatch):
    import mlflow

    import flows.finetune as finetune
    from flows.finetune import finetune_flow

    real_train = finetune.train

    def train_with_crash(config, plan, splits, callbacks=None, **kwargs):
        return real_train(config, plan, splits, callbacks=[*(callbacks or []), CrashOnceAfterCheckpoint()], **kwargs)

    monkeypatch.setattr(finetune, "train", train_with_crash)
    state = finetune_flow(config_path=str(DEMO_CONFIG), overrides=flow_overrides(demo_assets, tmp_path),
                          return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()

    # the first attempt died after checkpoint 80; the retry resumed there instead of from zero
    assert CrashOnceAfterCheckpoint.crashed_at == 80
    summary = yaml.safe_load((Path(outcome.adapter_dir) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 80 and summary["global_step"] == 160

    # a registered version with its metrics and lineage
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version(outcome.registered_model, outcome.version)
    assert version.run_id == outcome.run_id
    tags = version.tags
    for key in ("base_model", "dataset_fingerprint", "validation_success", "gpu_plan", "git_commit", "config_hash"):
        assert any(key in t for t in tags), (key, sorted(tags))
    assert outcome.metrics["adapter"]["bleu"] > outcome.metrics["base"]["bleu"]
    run = client.get_run(outcome.run_id)
    assert "train_loss" in run.data.metrics or "loss" in run.data.metrics

    assert asyncio.run(artifact_keys(state.state_details.flow_run_id)) >= ARTIFACT_KEYS


@pytest.mark.usefixtures("mlflow_uri")  # the store demo_overrides names, already migrated
def test_bad_data_fails_the_flow_before_training_and_registers_nothing(prefect_server, demo_assets, tmp_path):
    import mlflow

    from flows.finetune import finetune_flow

    bad = tmp_path / "bad.jsonl"
    lines = demo_assets.data_path.read_text().splitlines()
    bad.write_text("\n".join(lines[:1500] + ['{"instruction": "Rewrite this in Zorbish.", "output": ""}', "{broken"]))
    state = finetune_flow(config_path=str(DEMO_CONFIG),
                          overrides=[*flow_overrides(demo_assets, tmp_path), f"data.path={bad}"], return_state=True)
    assert state.is_failed()
    assert "validation" in state.message.lower()
    assert not (tmp_path / "out").exists(), "training started on bad data"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_model_versions("name='demo-qlora-adapter'") == []
    (run,) = client.search_runs([client.get_experiment_by_name("qlora-demo").experiment_id])
    assert run.info.status == "FAILED", "a failed night must not stay RUNNING in the MLflow UI"
    assert run.data.tags["validation_success"] == "false"


def test_prefect_yaml_deployment_is_valid() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == "finetune-nightly"]
    loaded = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
    assert loaded.name == "qlora-finetune"
    assert set(deployment["parameters"]) <= set(loaded.parameters.properties)
    assert (REPO_ROOT / deployment["parameters"]["config_path"]).exists()
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert deployment["work_pool"]["name"] == "qlora-pool"


def test_nightly_flow_mixes_sources_and_continues_the_champion(prefect_server, trained, mlflow_store_template,
                                                               demo_assets, tmp_path):
    """`qlora run`'s flow on a nightly config: tonight's rows plus a replay, starting from the champion."""
    import json
    import shutil

    import mlflow

    from configs.schema import load_config
    from flows.finetune import finetune_flow
    from tasks.data import load_splits
    from tasks.register import register_adapter
    from tests.conftest import typed_eval_report

    shutil.copyfile(mlflow_store_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config, _, _, source = trained
    champion_config = config.with_overrides({"registry.tracking_uri": uri, "registry.log_input_example": False})
    register_adapter(champion_config, source.adapter_dir, typed_eval_report())  # version 1, the champion

    lines = demo_assets.data_path.read_text().splitlines()
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    new.write_text("\n".join(lines[2000:]) + "\n")
    old.write_text("\n".join(lines[:2000]) + "\n")
    nightly = ["data.path=null", f"data.sources=[{{path: {new}, weight: 3}}, {{path: {old}, weight: 1}}]",
               "data.validation.min_train_rows=100", "data.validation.min_eval_rows=10",
               "training.init_adapter=models:/demo-qlora-adapter@champion", "training.max_steps=4",
               "training.save_steps=2", "evaluation.max_rows=16", "registry.log_input_example=false"]
    overrides = demo_overrides(demo_assets, tmp_path, *nightly)
    state = finetune_flow(config_path=str(DEMO_CONFIG), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.version == "2"

    # it started where the champion ended, not from the base: its eval loss before training is the champion's
    summary = json.loads((Path(outcome.adapter_dir) / "train_summary.json").read_text())
    assert summary["eval_loss_before"] == pytest.approx(source.summary.eval_loss_after, rel=0.05)
    assert summary["eval_loss_before"] < 0.6 * source.summary.eval_loss_before

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion, tags = (client.get_model_version("demo-qlora-adapter", v).tags for v in ("1", "2"))
    assert tags["init_adapter"] == "models:/demo-qlora-adapter@champion"
    assert (tags["init_adapter.version"], tags["init_adapter.sha256"]) == ("1", champion["adapter_sha256"])
    mixed = load_config(DEMO_CONFIG, overrides)
    assert tags["dataset_fingerprint"] == load_splits(mixed.data).fingerprint
    recorded = json.loads(tags["dataset_sources"])
    assert [(s["path"], s["weight"]) for s in recorded] == [(str(new), 3.0), (str(old), 1.0)]
    alone = [load_splits(mixed.data.model_copy(update={"path": str(p), "sources": None})) for p in (new, old)]
    assert [s["fingerprint"] for s in recorded] == [splits.fingerprint for splits in alone]
    assert "Started from:** `models:/demo-qlora-adapter@champion` (version 1)" in \
        client.get_model_version("demo-qlora-adapter", "2").description

    # the contract's report in the run has a section per source
    local = client.download_artifacts(outcome.run_id, "validation/summary.json", str(tmp_path / "dl"))
    validation = json.loads(Path(local).read_text())
    assert validation["success"] and [s["sources"] for s in validation["sections"]] == [[str(new)], [str(old)]]
