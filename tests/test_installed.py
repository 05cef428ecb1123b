"""The package installed the way the docker worker installs it (`pip install .`, not editable).

Installed, the code lives in site-packages: nothing may be written beside it, and every default that
writes (the MLflow store) or is read by default (the config) must come from the project dir
($QLORA_PIPELINE_DIR, else the working directory) or, for the config only, the copy shipped in the
package. The `installed` tests build and install a real wheel of this checkout into a temporary
folder that plays site-packages (offline: `--no-index --no-build-isolation`, dependencies are the
test environment's) and run the installed `qlora` from a folder outside the checkout, with
PYTHONPATH pointing at the installed copy only. Select them with `-m installed` (about a minute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_CONFIG, REPO_ROOT

# What docker/worker.Dockerfile copies before `pip install --no-deps .`
INSTALLED_SOURCES = ("pyproject.toml", "README.md", "tasks", "flows", "configs")
# Variables that would point the installed copy back at the checkout or at another store.
CLEARED_VARIABLES = ("PYTHONPATH", "QLORA_PIPELINE_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@dataclass
class InstalledCopy:
    site: Path  # the install target: plays site-packages
    env: dict[str, str]

    def qlora(self, *args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """The installed console script, as a user on the worker would run it."""
        return subprocess.run([str(self.site / "bin" / "qlora"), *args], cwd=cwd, env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=300)

    def python(self, code: str, *args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> dict:
        """Run `code` with the installed copy; it prints one JSON object last."""
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def files(self) -> set[str]:
        """Everything in the install, bytecode caches aside (Python may add those at import)."""
        return {str(p.relative_to(self.site)) for p in self.site.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> InstalledCopy:
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # a copy, so the build's build/ and *.egg-info never land in the checkout
    source.mkdir()
    for name in INSTALLED_SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    site = root / "site-packages"
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_VARIABLES}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--target", str(site), str(source)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GX_ANALYTICS_ENABLED="false",
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    return InstalledCopy(site=site, env=env)


PROBE = """
import json, sys
import mlflow
import configs, flows.cli, tasks
from configs.paths import default_config_path, project_dir
from configs.schema import load_config
from tasks.register import git_commit
from tasks.registry import model_code_paths
from tasks.tracking import artifact_location, client_for, resolve_tracking_uri, sqlite_path

config = load_config(None, sys.argv[1:])
uri = resolve_tracking_uri(config)
client_for(uri).search_experiments()  # opens the store for real: MLflow creates the database
print(json.dumps({
    "modules": [tasks.__file__, flows.cli.__file__, configs.__file__], "mlflow": mlflow.__file__,
    "project_dir": str(project_dir()), "config": str(default_config_path()),
    "experiment": config.registry.experiment_name, "db": str(sqlite_path(uri)), "artifacts": artifact_location(uri),
    "git": list(git_commit()), "code_paths": [str(p) for p in model_code_paths()],
}))
"""


def demo_overrides(demo_assets) -> list[str]:
    return [f"model.name_or_path={demo_assets.model_dir.resolve()}", f"data.path={demo_assets.data_path.resolve()}"]


def assert_nothing_written_into(site: Path) -> None:
    assert not (site / "mlflow").exists(), "a store inside site-packages would land in the mlflow library's folder"
    assert not list(site.rglob("*.db")), f"a database was created in site-packages: {list(site.rglob('*.db'))}"


@pytest.mark.installed
def test_installed_cli_runs_from_any_folder(installed_copy, demo_assets, tmp_path) -> None:
    site = installed_copy.site
    work = tmp_path / "anywhere"
    work.mkdir()
    before = installed_copy.files()

    ran = installed_copy.python("import json, configs, flows.cli, tasks\n"
                                "print(json.dumps([m.__file__ for m in (tasks, flows.cli, configs)]))", cwd=work)
    for module_file in ran:
        assert Path(module_file).is_relative_to(site), f"{module_file} is not the installed copy"
        assert not Path(module_file).is_relative_to(REPO_ROOT)

    help_run = installed_copy.qlora("--help", cwd=work)
    assert help_run.returncode == 0, help_run.stderr[-3000:]
    assert "validate" in help_run.stdout and "check-gpu" in help_run.stdout

    # no --config: the demo config shipped inside the installed package is the default
    validated = installed_copy.qlora("validate", str(demo_assets.data_path.resolve()), *sum(
        (["--set", item] for item in demo_overrides(demo_assets)), []), cwd=work)
    assert validated.returncode == 0, validated.stdout[-2000:] + validated.stderr[-3000:]
    assert "data contract passed" in validated.stderr

    checked = installed_copy.qlora("check-gpu", "--config", str(site / "configs" / "demo.yaml"), *sum(
        (["--set", item] for item in demo_overrides(demo_assets)), []), cwd=work)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "Plan:" in checked.stderr

    assert installed_copy.files() == before, "running the installed package must not write into site-packages"
    assert_nothing_written_into(site)


@pytest.mark.installed
def test_installed_defaults_resolve_against_the_working_dir_or_the_project_dir(installed_copy, demo_assets,
                                                                                  tmp_path) -> None:
    site = installed_copy.site
    overrides = demo_overrides(demo_assets)

    # 1. a bare folder: store under it, config from the package, no git lineage, shipped code = installed code
    work = tmp_path / "work"
    work.mkdir()
    found = installed_copy.python(PROBE, *overrides, cwd=work)
    assert all(Path(m).is_relative_to(site) for m in found["modules"]), found["modules"]
    assert found["project_dir"] == str(work.resolve())
    assert found["config"] == str((site / "configs" / "demo.yaml").resolve())
    assert found["db"] == str(work.resolve() / "mlflow" / "mlflow.db")
    assert Path(found["db"]).is_file(), "the default store was not created where it resolved"
    assert found["artifacts"] == (work.resolve() / "mlflow" / "artifacts").as_uri()
    assert found["git"] == ["unknown", "unknown"], "an installed copy has no source checkout"
    assert found["code_paths"] == [str((site / "tasks").resolve()), str((site / "configs").resolve())]
    assert not (Path(found["mlflow"]).parent / "mlflow.db").exists()
    assert_nothing_written_into(site)

    # 2. QLORA_PIPELINE_DIR wins over the working directory, and its configs/demo.yaml over the packaged one
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "demo.yaml").write_text(
        DEMO_CONFIG.read_text().replace("experiment_name: qlora-demo", "experiment_name: project-copy"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = installed_copy.python(PROBE, *overrides, cwd=elsewhere, extra_env={"QLORA_PIPELINE_DIR": str(project)})
    assert found["project_dir"] == str(project.resolve())
    assert found["config"] == str((project / "configs" / "demo.yaml").resolve())
    assert found["experiment"] == "project-copy"
    assert found["db"] == str(project.resolve() / "mlflow" / "mlflow.db") and Path(found["db"]).is_file()
    assert not (elsewhere / "mlflow").exists()
    assert_nothing_written_into(site)


# --------------------------------------------------------------------------------------------------
# The same rules in-process, from the checkout (fast)


def test_project_dir_is_the_environment_variable_else_the_working_dir(monkeypatch, tmp_path) -> None:
    from configs.paths import PROJECT_DIR_ENV, project_dir

    monkeypatch.delenv(PROJECT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert project_dir() == tmp_path.resolve()
    monkeypatch.setenv(PROJECT_DIR_ENV, str(tmp_path / "project"))
    assert project_dir() == (tmp_path / "project").resolve()


def test_default_store_follows_the_working_dir(make_config, monkeypatch, tmp_path) -> None:
    from configs.paths import PROJECT_DIR_ENV
    from tasks.tracking import artifact_location, resolve_tracking_uri, sqlite_path

    config = make_config()
    assert config.registry.tracking_uri is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PROJECT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(config)
    assert sqlite_path(uri) == tmp_path.resolve() / "mlflow" / "mlflow.db"
    assert artifact_location(uri) == (tmp_path.resolve() / "mlflow" / "artifacts").as_uri()


def test_without_any_config_the_error_names_the_option(monkeypatch, tmp_path) -> None:
    import configs.paths
    from configs.schema import ConfigError, load_config

    monkeypatch.delenv(configs.paths.PROJECT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(configs.paths, "PACKAGED_CONFIG_DIR", tmp_path / "no-packaged-configs")
    with pytest.raises(ConfigError, match="pass --config"):
        load_config(None)
    (tmp_path / "configs").mkdir()
    shutil.copy2(DEMO_CONFIG, tmp_path / "configs" / "demo.yaml")
    assert load_config(None).registry.experiment_name == "qlora-demo"


def test_git_lineage_comes_only_from_the_checkout_holding_the_code(monkeypatch, tmp_path) -> None:
    import configs.paths
    from tasks.register import git_commit
    from tasks.registry import model_code_paths

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # running from a checkout: its commit
        assert git_commit()[0] == head.stdout.strip()
    assert model_code_paths() == [REPO_ROOT / "tasks", REPO_ROOT / "configs"]

    # site-packages of a virtualenv inside some other repository: that repository is not this code
    repo = tmp_path / "repo"
    site = repo / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "other project"], cwd=repo, check=True)
    monkeypatch.setattr(configs.paths, "PACKAGE_PARENT", site.resolve())
    assert git_commit() == ("unknown", "unknown")
    # a folder that is no repository at all
    monkeypatch.setattr(configs.paths, "PACKAGE_PARENT", tmp_path.resolve())
    assert git_commit() == ("unknown", "unknown")
    # the top of a work tree is a checkout
    monkeypatch.setattr(configs.paths, "PACKAGE_PARENT", repo.resolve())
    other_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_commit() == (other_head, "false")


@pytest.mark.parametrize("project_dir_set", [False, True], ids=["repo-root", "QLORA_PIPELINE_DIR"])
def test_mlflow_server_script_serves_the_store_the_pipeline_writes(make_config, monkeypatch, tmp_path,
                                                                   project_dir_set) -> None:
    """`make mlflow-ui` (mlflow/server.sh, run from the repo root) and the pipeline name the same store.

    A stand-in `mlflow` executable first on PATH records the command line the real script builds."""
    from tasks.tracking import resolve_tracking_uri

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorded = tmp_path / "mlflow-args.txt"
    (bin_dir / "mlflow").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {recorded}\n')
    (bin_dir / "mlflow").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_VARIABLES + ("QLORA_MLFLOW_DIR",)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("QLORA_PIPELINE_DIR", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    if project_dir_set:
        env["QLORA_PIPELINE_DIR"] = str(tmp_path / "project")
        monkeypatch.setenv("QLORA_PIPELINE_DIR", str(tmp_path / "project"))

    proc = subprocess.run(["bash", str(REPO_ROOT / "mlflow" / "server.sh")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = recorded.read_text().splitlines()
    served = args[args.index("--backend-store-uri") + 1]
    assert served == resolve_tracking_uri(make_config())
    artifacts = Path(args[args.index("--artifacts-destination") + 1])
    assert artifacts == Path(served.removeprefix("sqlite:///")).parent / "artifacts"
