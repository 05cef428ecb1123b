"""Shared fixtures: the real demo assets, a real tiny QLoRA training run, offline settings.

Demo assets are built once per machine into the repo's `.cache/demo` (the same place `make demo`
uses), and one short training run is shared by every test that needs a trained adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# One intra-op thread, set before torch is imported (and inherited by the servers and CLI runs the tests
# start). The demo model's matrices are tiny, so a second OpenMP thread only adds synchronisation, and
# on a busy 2-core machine its spin-waiting threads crawl: measured here, the out-of-memory re-plan test
# took 113 s with torch's default of one thread per core against 13 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
# Short but real: enough steps for the adapter to clearly beat the base on the demo task.
SHORT_TRAINING = ["training.max_steps=160", "training.save_steps=80", "training.logging_steps=20",
                  "evaluation.max_rows=64"]
# The first rows of the demo data, for pipeline runs whose tests are about orchestration, not learning: every
# run tokenizes, validates and evaluates (eval loss) all of its rows. The demo's data contract asks for
# 1,000 train and 100 eval rows; these overrides let the slice (358 train, 42 eval rows) pass it.
DEMO_SLICE_ROWS = 400
DEMO_SLICE_VALIDATION = ["data.validation.min_train_rows=100", "data.validation.min_eval_rows=10"]


def demo_overrides(demo_assets, tmp_path: Path, *extra: str) -> list[str]:
    """Overrides that point the demo config at the built assets and at a private output dir and sqlite
    MLflow store in tmp_path, then `extra` (for configs passed by path, e.g. to a flow).

    The store is `mlflow_uri`'s path: a test that also requests that fixture starts from a copy of the
    migrated empty store instead of paying MLflow's ~10 s schema creation."""
    return [
        f"data.path={demo_assets.data_path.resolve()}",
        f"model.name_or_path={demo_assets.model_dir.resolve()}",
        f"training.output_dir={tmp_path / 'out'}",
        f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


@pytest.fixture(scope="session")
def demo_assets():
    from tasks.demo_assets import build_demo_assets

    return build_demo_assets(REPO_ROOT / ".cache" / "demo")


@pytest.fixture(scope="session")
def demo_data_slice(demo_assets, tmp_path_factory) -> Path:
    """The first DEMO_SLICE_ROWS rows of the demo data as a file (pass DEMO_SLICE_VALIDATION with it)."""
    path = tmp_path_factory.mktemp("demo-slice") / "demo.jsonl"
    path.write_text("\n".join(demo_assets.data_path.read_text().splitlines()[:DEMO_SLICE_ROWS]) + "\n")
    return path


@pytest.fixture
def make_config(demo_assets, tmp_path):
    """Demo config with absolute asset paths and a private output dir, plus any overrides."""
    from configs.schema import load_config

    def factory(*overrides: str, output_dir: Path | None = None):
        base = [
            f"data.path={demo_assets.data_path.resolve()}",
            f"model.name_or_path={demo_assets.model_dir.resolve()}",
            f"training.output_dir={output_dir or tmp_path / 'out'}",
        ]
        return load_config(DEMO_CONFIG, base + list(overrides))

    return factory


@pytest.fixture(scope="session")
def trained(demo_assets, tmp_path_factory):
    """One short real QLoRA run on the demo (CPU, NF4 + double quant): (config, plan, splits, result)."""
    from configs.schema import load_config
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.train import train

    out = tmp_path_factory.mktemp("trained")
    config = load_config(DEMO_CONFIG, [
        f"data.path={demo_assets.data_path.resolve()}",
        f"model.name_or_path={demo_assets.model_dir.resolve()}",
        f"training.output_dir={out}",
        *SHORT_TRAINING,
    ])
    splits = load_splits(config.data)
    _, plan = check_gpu(config)
    result = train(config, plan, splits, keep_model=True)
    return config, plan, splits, result


@pytest.fixture(scope="session")
def evaluated(trained, tmp_path_factory):
    """The `trained` adapter evaluated against the base on the demo eval rows: (config, result, report, paths).

    `paths` are the saved report files (eval_report.json, eval_summary.md, eval_samples.json).
    """
    from tasks.evaluate import evaluate_adapter

    config, plan, splits, result = trained
    report = evaluate_adapter(config, plan, splits, result.adapter_dir)
    paths = report.save(tmp_path_factory.mktemp("evaluated"))
    return config, result, report, paths


@pytest.fixture(scope="session")
def prefect_server():
    """The API URL of one temporary Prefect server (prefect_test_harness) shared by every module that runs
    flows or checks work pools (their job configuration classes resolve templates through the API):
    starting one takes ~15 s. Tests find their own flow runs by id, so they do not see each other's."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory):
    """An empty MLflow sqlite store with its schema created once (MLflow's migrations take ~10 s a store)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(mlflow_store_template, tmp_path):
    """A fresh, real sqlite MLflow store in tmp_path (a copy of the empty template); artifacts go beside it."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_store_template, db)
    return f"sqlite:///{db}"


@pytest.fixture
def registry_config(trained, mlflow_uri):
    """The trained demo config pointed at a fresh sqlite MLflow store in tmp_path; HTTP failures fail fast."""
    config = trained[0].model_copy(deep=True)
    config.registry.tracking_uri = mlflow_uri
    config.registry.request_max_retries = 0
    config.registry.request_timeout_s = 10
    return config


def make_eval_report(base: float = 2.0, adapter: float = 80.0, champion: float | None = None,
                     significant: bool = True, rouge_drop: float = 0.0, vs_champion: bool = True,
                     significant_vs_champion: bool | None = None, runaway: float = 0.0,
                     champion_runaway: float = 0.0, general_text_loss: tuple[float, float] | None = (2.0, 2.0),
                     champion_general_text_loss: float | None = None, canary_failures: int = 0) -> dict:
    """An evaluation report in the shape tasks/evaluate.py writes (points 0-100), for registry tests.

    `runaway` is the adapter's runaway share; `general_text_loss` (base, adapter) adds the general-text
    losses; `canary_failures` of three canaries fail."""
    def scores(bleu: float, rouge: float, runaway_share: float = 0.0) -> dict:
        return {"bleu": bleu, "rouge1": rouge, "rouge2": rouge / 2, "rougeL": rouge, "rougeLsum": rouge,
                "chrf": rouge, "exact_match": bleu / 2, "eval_loss": 1.0, "perplexity": 2.7,
                "runaway_share": runaway_share, "samples_per_s": 50.0, "wall_time_s": 1.0}

    def comparison(delta: float, rouge_delta: float, significant: bool) -> dict:
        p_value = 0.001 if significant else 0.4
        return {"bleu": {"delta": delta, "ci_low": delta - 1, "ci_high": delta + 1, "p_value": p_value,
                         "significant": significant},
                "rougeL": {"delta": rouge_delta, "ci_low": rouge_delta - 1, "ci_high": rouge_delta + 1,
                           "p_value": p_value, "significant": significant}}

    adapter_rouge = adapter - rouge_drop
    report = {
        "n_samples": 64, "generation": {"max_new_tokens": 24, "do_sample": False}, "bleu_signature": "nrefs:1|test",
        "significance_level": 0.05, "wall_time_s": 3.0,
        "systems": {"base": scores(base, base), "adapter": scores(adapter, adapter_rouge, runaway)},
        "comparisons": {"adapter_vs_base": comparison(adapter - base, adapter_rouge - base, significant)},
        "samples": [{"prompt": "Rewrite this in Zorbish.\n\nred cat", "reference": "zel vobip", "base": "red cat",
                     "adapter": "zel vobip"}],
    }
    if general_text_loss is not None:
        report["systems"]["base"]["general_text_loss"], report["systems"]["adapter"]["general_text_loss"] = (
            general_text_loss)
        report["general_text"] = {"path": "general.txt", "passages": 100}
    report["canaries"] = {"path": "canaries.yaml", "results": [
        {"name": f"canary {i}", "prompt": f"prompt {i}", "expect": {"contains": "zel"},
         "output": "red" if i < canary_failures else "zel", "passed": i >= canary_failures} for i in range(3)],
        "failed": min(canary_failures, 3)}
    if champion is not None:
        report["systems"]["champion"] = scores(champion, champion, champion_runaway)
        if champion_general_text_loss is None and general_text_loss is not None:
            champion_general_text_loss = general_text_loss[1]  # as good as the adapter: the guard holds
        if champion_general_text_loss is not None:
            report["systems"]["champion"]["general_text_loss"] = champion_general_text_loss
        report["samples"][0]["champion"] = "zel"
        if vs_champion:
            report["comparisons"]["adapter_vs_champion"] = comparison(
                adapter - champion, adapter_rouge - champion,
                significant if significant_vs_champion is None else significant_vs_champion)
    return report


def typed_eval_report(**kwargs):  # -> tasks.evaluate.EvalReport
    """`make_eval_report(**kwargs)` as the typed value the evaluate stage hands to registration."""
    from tasks.evaluate import EvalReport

    return EvalReport.from_dict(make_eval_report(**kwargs))
