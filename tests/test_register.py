"""Registration into a real MLflow registry (sqlite in tmp_path, and a real `mlflow server` over HTTP).

Every test registers the real adapter of the shared short QLoRA run; the promotion rule itself, a
pure function, is table-tested in tests/test_promotion.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, make_eval_report, typed_eval_report


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def client(config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.registry.tracking_uri, registry_uri=config.registry.tracking_uri)


def alias_version(config, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(config).get_model_version_by_alias(config.registry.model_name, alias).version)
    except MlflowException:
        return None


def versions(config) -> list[str]:
    found = client(config).search_model_versions(f"name='{config.registry.model_name}'")
    return sorted((str(v.version) for v in found), key=int)


# --------------------------------------------------------------------------------------------------
# A real version, loaded back in a fresh process


LOAD_SCRIPT = """
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
as_list = model.predict(["Rewrite this in Zorbish.\\n\\nthe red cat runs", "Rewrite this in Zorbish.\\n\\nbig dog"])
as_frame = model.predict(pd.DataFrame({"prompt": ["Rewrite this in Zorbish.\\n\\nsmall bird"]}),
                         params={"max_new_tokens": 4})
import tasks
print(json.dumps({"list": as_list, "frame": as_frame, "tasks_from": tasks.__path__[0]}))
"""


def test_registered_version_loads_in_a_fresh_process_and_carries_its_lineage(trained, registry_config,
                                                                            tmp_path) -> None:
    from mlflow.artifacts import download_artifacts

    from tasks.modeling import base_model_reference
    from tasks.register import register_adapter
    from tasks.tracking import using_tracking_uri
    from tasks.validate import ValidationResult

    config, plan, splits, result = trained
    before = file_hashes(result.adapter_dir)
    validation = ValidationResult(success=True, fingerprint=splits.fingerprint, format=splits.format,
                                  row_counts={"train": len(splits.train), "eval": len(splits.eval)}, expectations=[])
    outcome = register_adapter(registry_config, result.adapter_dir, typed_eval_report(), validation=validation,
                               plan=plan)
    assert (outcome.name, outcome.version, outcome.promoted) == ("demo-qlora-adapter", "1", True)
    assert sorted(outcome.aliases) == ["challenger", "champion"]
    assert file_hashes(result.adapter_dir) == before, "registration must never modify the adapter files"

    registry = client(registry_config)
    version = registry.get_model_version("demo-qlora-adapter", "1")
    tags = version.tags
    reference = base_model_reference(config)
    assert tags["base_model"] == f"{reference['path']}@sha256:{reference['sha256']}"
    assert json.loads(tags["base_model_reference"])["sha256"] == reference["sha256"]
    assert tags["dataset_fingerprint"] == splits.fingerprint
    assert tags["validation_success"] == "true"
    assert tags["gpu_plan"] == plan.summary()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"] == (commit or "unknown")
    assert tags["config_hash"] == registry_config.config_hash()
    assert tags["lib.peft"] == metadata.version("peft") and tags["lib.transformers"] == metadata.version("transformers")
    assert float(tags["metric.adapter.bleu"]) == 80.0 and float(tags["metric.base.rougeL"]) == 2.0
    assert tags["decision"] == "promote" and float(tags["decision.bleu_delta_vs_base"]) == 78.0
    assert tags["lora"].startswith("r=16 alpha=32")
    assert "### QLoRA adapter" in version.description and "| bleu | 2.00 | 80.00 | +78.00 |" in version.description
    assert version.run_id == outcome.run_id
    run = registry.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.params["lora.r"] == "16"
    assert run.data.tags["registered_version"] == "1"

    # the registry holds the adapter, the tokenizer and a reference to the base, never the base weights
    with using_tracking_uri(registry_config.registry.tracking_uri):
        local = Path(download_artifacts(artifact_uri="models:/demo-qlora-adapter/1", dst_path=str(tmp_path / "dl")))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "base_model.json",
            "MLmodel", "input_example.json"} <= files
    assert "model.safetensors" not in files

    # a fresh interpreter, started away from the repo, loads the champion and generates
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, registry_config.registry.tracking_uri,
                           "models:/demo-qlora-adapter@champion"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(payload["list"]) == 2 and len(payload["frame"]) == 1
    assert all(isinstance(text, str) and text.strip() for text in payload["list"] + payload["frame"])
    assert "red cat runs" not in payload["list"][0], "the base model only repeats; the adapter translates"
    assert len(payload["frame"][0].split()) <= 4
    assert "/artifacts/code/" in payload["tasks_from"], "the model must ship the code it needs"


def test_loading_refuses_a_missing_or_changed_base_model(trained, registry_config, tmp_path) -> None:
    import mlflow

    from tasks.modeling import base_model_reference
    from tasks.pyfunc_model import BaseModelUnavailable, resolve_base
    from tasks.register import register_adapter
    from tasks.tracking import using_tracking_uri

    config, _, _, result = trained
    registry_config.registry.log_input_example = False
    register_adapter(registry_config, result.adapter_dir, typed_eval_report())
    reference = base_model_reference(config)

    moved = tmp_path / "moved-base"
    shutil.copytree(reference["path"], moved)
    assert resolve_base(reference, str(moved)) == (str(moved), None)  # same content elsewhere is fine
    config_json = moved / "config.json"
    config_json.write_text(config_json.read_text().replace("}", ', "tampered": true}', 1))
    uri = registry_config.registry.tracking_uri
    with using_tracking_uri(uri), pytest.raises(BaseModelUnavailable) as changed:
        mlflow.pyfunc.load_model("models:/demo-qlora-adapter/1", model_config={"base_model_path": str(moved)})
    message = str(changed.value)
    assert str(moved) in message and reference["sha256"] in message and "content hash" in message
    actual = message.split("has content hash ")[1].split(",")[0]
    assert actual != reference["sha256"] and len(actual) == 16

    gone = tmp_path / "gone"
    with using_tracking_uri(uri), pytest.raises(BaseModelUnavailable, match="does not exist"):
        mlflow.pyfunc.load_model("models:/demo-qlora-adapter/1", model_config={"base_model_path": str(gone)})
    with pytest.raises(BaseModelUnavailable, match=str(gone)):
        resolve_base({**reference, "path": str(gone)})


# --------------------------------------------------------------------------------------------------
# Promotion with aliases


def test_champion_moves_only_for_a_significantly_better_adapter(trained, registry_config) -> None:
    from tasks.register import register_adapter
    from tasks.registry import resolve_champion_adapter

    adapter = trained[3].adapter_dir
    registry_config.registry.log_input_example = False  # the fresh-process test covers loading

    def register(**report):
        return register_adapter(registry_config, adapter, typed_eval_report(**report))

    assert resolve_champion_adapter(registry_config) is None
    first = register(adapter=60.0)
    assert first.promoted and alias_version(registry_config, "champion") == "1"
    champion_dir = resolve_champion_adapter(registry_config)
    assert file_hashes(champion_dir)["adapter_model.safetensors"] == file_hashes(adapter)["adapter_model.safetensors"]
    assert champion_dir.name == "demo-qlora-adapter-v1"

    worse = register(adapter=55.0, champion=60.0)
    assert (worse.version, worse.promoted, worse.aliases) == ("2", False, ["challenger"])
    assert alias_version(registry_config, "champion") == "1" and alias_version(registry_config, "challenger") == "2"
    tags = client(registry_config).get_model_version("demo-qlora-adapter", "2").tags
    assert tags["decision"] == "keep challenger" and "bleu does not beat champion" in tags["decision.reasons"]

    insignificant = register(adapter=61.0, champion=60.0, significant_vs_champion=False)
    assert not insignificant.promoted and alias_version(registry_config, "champion") == "1"
    assert alias_version(registry_config, "challenger") == "3"

    not_compared = register(adapter=70.0, champion=60.0, vs_champion=False)
    assert not not_compared.promoted and alias_version(registry_config, "champion") == "1"
    assert any("did not compare" in r for r in not_compared.decision["reasons"])

    better = register(adapter=70.0, champion=60.0)
    assert better.promoted and sorted(better.aliases) == ["challenger", "champion"]
    assert alias_version(registry_config, "champion") == "5" and alias_version(registry_config, "challenger") == "5"
    assert resolve_champion_adapter(registry_config).name == "demo-qlora-adapter-v5"


def test_a_failure_after_the_version_exists_leaves_no_half_registered_version(trained, registry_config,
                                                                            monkeypatch) -> None:
    from mlflow import MlflowClient

    from tasks.register import register_adapter

    adapter = trained[3].adapter_dir
    registry_config.registry.log_input_example = False
    register_adapter(registry_config, adapter, typed_eval_report(adapter=60.0))
    real = MlflowClient.set_registered_model_alias

    def fail_on_champion(self, name, alias, version):
        if alias == "champion":
            raise ConnectionError("tracking server went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_on_champion)
    with pytest.raises(ConnectionError, match="went away"):
        register_adapter(registry_config, adapter, typed_eval_report(adapter=75.0, champion=60.0))
    assert versions(registry_config) == ["1"], "the half-registered version must be deleted"
    assert alias_version(registry_config, "champion") == "1" and alias_version(registry_config, "challenger") == "1"

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    retried = register_adapter(registry_config, adapter, typed_eval_report(adapter=75.0, champion=60.0))
    assert retried.promoted and alias_version(registry_config, "champion") == retried.version


# --------------------------------------------------------------------------------------------------
# An unreachable server, then the same URI once the server is up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: Path, port: int, template: Path) -> subprocess.Popen:
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, store / "mlflow.db")  # skip the ~10 s schema creation
    env = {**os.environ, "QLORA_MLFLOW_DIR": str(store), "MLFLOW_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(["bash", str(REPO_ROOT / "mlflow" / "server.sh")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=(store / "server.log").open("w"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    stop_server(proc)
    raise AssertionError(f"mlflow server did not start: {(store / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_unreachable_server_fails_cleanly_and_the_retry_succeeds(trained, registry_config, mlflow_store_template,
                                                                  tmp_path) -> None:
    from tasks.register import register_adapter
    from tasks.registry import resolve_champion_adapter
    from tasks.tracking import TrackingServerUnreachable

    adapter = trained[3].adapter_dir
    before = file_hashes(adapter)
    port = free_port()
    registry_config.registry.tracking_uri = f"http://127.0.0.1:{port}"
    registry_config.registry.log_input_example = False
    registry_config.training.output_dir = tmp_path / "out"

    started = time.monotonic()
    with pytest.raises(TrackingServerUnreachable) as failure:
        register_adapter(registry_config, adapter, typed_eval_report())
    assert time.monotonic() - started < 30, "MLflow's HTTP retries must follow registry.request_max_retries"
    message = str(failure.value)
    assert f"http://127.0.0.1:{port}" in message and "Nothing was registered" in message and str(adapter) in message
    assert isinstance(failure.value, ConnectionError)  # what the flow's register task retries on
    assert file_hashes(adapter) == before

    server = start_server(tmp_path / "server", port, mlflow_store_template)
    try:
        assert versions(registry_config) == [] and alias_version(registry_config, "champion") is None
        retried = register_adapter(registry_config, adapter, typed_eval_report())
        assert (retried.version, retried.promoted) == ("1", True)
        assert alias_version(registry_config, "champion") == "1"
        # artifacts went through the server (--serve-artifacts) into its artifacts folder
        assert list((tmp_path / "server" / "artifacts").rglob("adapter_model.safetensors"))
        downloaded = resolve_champion_adapter(registry_config)
        assert file_hashes(downloaded)["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    finally:
        stop_server(server)
    assert file_hashes(adapter) == before


# --------------------------------------------------------------------------------------------------
# Two registrations at once


CONCURRENT_SCRIPT = """
import json, pathlib, sys, time
from configs.schema import load_config
from tasks.evaluate import EvalReport
from tasks.register import register_adapter
config_file, adapter, report_file, ready, go = sys.argv[1:6]
config = load_config(config_file)
report = EvalReport.from_json(report_file)
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.05)
result = register_adapter(config, adapter, report)
print(json.dumps({"version": result.version, "promoted": result.promoted}))
"""


def test_two_registrations_at_once_get_distinct_versions(trained, registry_config, tmp_path) -> None:
    adapter = trained[3].adapter_dir
    registry_config.registry.log_input_example = False
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(registry_config.model_dump(mode="json")))
    report_file = tmp_path / "report.json"
    report_file.write_text(json.dumps(make_eval_report()))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SCRIPT, str(config_file), str(adapter),
                               str(report_file), str(tmp_path / f"ready-{i}"), str(go)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.1)
    go.touch()  # both start registering at the same moment
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    assert sorted(r["version"] for r in results) == ["1", "2"]
    assert versions(registry_config) == ["1", "2"]
    # both were judged "first version" against the same empty registry; only one may hold champion
    champion = alias_version(registry_config, "champion")
    assert champion in ("1", "2") and sum(r["promoted"] for r in results) >= 1
    assert alias_version(registry_config, "challenger") in ("1", "2")
    assert file_hashes(adapter)


# --------------------------------------------------------------------------------------------------
# The command line


def test_cli_register_then_predict_from_the_champion(trained, registry_config, tmp_path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    config_file = tmp_path / "config.yaml"
    registry_config.registry.log_input_example = False
    config_file.write_text(yaml.safe_dump(registry_config.model_dump(mode="json")))
    splits = trained[2]
    report = tmp_path / "eval_report.json"  # as `qlora evaluate` writes it: with the fingerprint of its splits
    report.write_text(json.dumps({**make_eval_report(), "dataset_fingerprint": splits.fingerprint}))
    not_a_report = tmp_path / "not_a_report.json"
    not_a_report.write_text(json.dumps({"systems": {}}))
    runner = CliRunner()

    missing = runner.invoke(app, ["register", "--adapter", str(trained[3].adapter_dir), "-c", str(config_file)])
    assert missing.exit_code == 2 and "qlora evaluate" in missing.output  # no report in <output_dir>/evaluation
    wrong = runner.invoke(app, ["register", "--adapter", str(trained[3].adapter_dir), "-c", str(config_file),
                                "--report", str(not_a_report)])
    said = " ".join(wrong.output.split())
    assert wrong.exit_code == 2 and "is not a saved EvalReport" in said and "qlora evaluate" in said
    assert versions(registry_config) == []
    registered = runner.invoke(app, ["register", "--adapter", str(trained[3].adapter_dir), "-c", str(config_file),
                                     "--report", str(report)])
    assert registered.exit_code == 0, registered.output
    said = " ".join(registered.output.split())  # rich wraps long lines
    assert "demo-qlora-adapter version 1" in said and "promoted to champion" in said
    # lineage without re-reading the data: the fingerprint is the one the report recorded
    assert client(registry_config).get_model_version("demo-qlora-adapter", "1").tags["dataset_fingerprint"] == \
        splits.fingerprint

    prompts = ["Rewrite this in Zorbish.\n\nthe red cat runs", "Rewrite this in Zorbish.\n\ndog"]
    predicted = runner.invoke(app, ["predict", "-c", str(config_file), "--json", "--max-new-tokens", "6", *prompts])
    assert predicted.exit_code == 0, predicted.output
    rows = json.loads(predicted.stdout[predicted.stdout.index("["):])
    assert [r["prompt"] for r in rows] == prompts
    assert all(r["completion"].strip() for r in rows)

    unknown = runner.invoke(app, ["predict", "-c", str(config_file), "--model", "models:/no-such-model/1", "hi"])
    assert unknown.exit_code == 2 and "cannot load models:/no-such-model/1" in " ".join(unknown.output.split())


def test_a_champion_moved_by_someone_else_during_registration_is_not_overwritten(trained, registry_config,
                                                                                 monkeypatch) -> None:
    import tasks.register as register
    from tasks.tracking import using_tracking_uri

    adapter = trained[3].adapter_dir
    registry_config.registry.log_input_example = False
    real_log = register.log_adapter_model

    def log_while_another_run_promotes(*args, **kwargs):
        info = real_log(*args, **kwargs)
        with using_tracking_uri(registry_config.registry.tracking_uri):
            other = client(registry_config).create_model_version("demo-qlora-adapter", source=info.model_uri)
        client(registry_config).set_registered_model_alias("demo-qlora-adapter", "champion", other.version)
        return info

    monkeypatch.setattr(register, "log_adapter_model", log_while_another_run_promotes)
    # judged against an empty registry ("first version"), but a champion appears before the aliases move
    outcome = register.register_adapter(registry_config, adapter, typed_eval_report())
    assert (outcome.version, outcome.promoted, outcome.aliases) == ("2", False, ["challenger"])
    assert alias_version(registry_config, "champion") == "1"
    tags = client(registry_config).get_model_version("demo-qlora-adapter", "2").tags
    assert tags["decision"] == "keep challenger" and "champion moved" in tags["decision.reasons"]
