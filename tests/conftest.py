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

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
# Short but real: enough steps for the adapter to clearly beat the base on the demo task.
SHORT_TRAINING = ["training.max_steps=160", "training.save_steps=80", "training.logging_steps=20",
                  "evaluation.max_rows=64"]


@pytest.fixture(scope="session")
def demo_assets():
    from tasks.demo_assets import build_demo_assets

    return build_demo_assets(REPO_ROOT / ".cache" / "demo")


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
