"""Where the pipeline's files go, the same whether it runs from a checkout or an installed package.

The code may live in a source checkout (`make demo`, an editable install) or in site-packages (the
docker worker's `pip install .`). Nothing the pipeline writes may depend on which: a folder derived
from `__file__` is site-packages in the second case, and a store created there would land inside the
installed `mlflow` library's own folder. So every default that writes resolves against the *project
directory* instead:

- `$QLORA_PIPELINE_DIR` when set (prefect.yaml's pull step and the docker image already use this
  name for the folder a worker runs flows from);
- otherwise the current working directory.

Only read-only things come from the package itself: the shipped YAML configs, the source folders
MLflow copies next to a logged model, and the git commit of a source checkout.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PROJECT_DIR_ENV = "QLORA_PIPELINE_DIR"
# The folder holding the imported `configs`, `tasks` and `flows` packages: the checkout when run from
# source, site-packages when installed. Read from, never written to.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent
DEMO_CONFIG_NAME = "demo.yaml"


def project_dir() -> Path:
    """The folder the pipeline's default files live under: $QLORA_PIPELINE_DIR, else the working dir.

    Read at call time (not import time), so a process that changes directory or sets the variable
    after importing the pipeline gets the folder it asked for.
    """
    configured = os.environ.get(PROJECT_DIR_ENV, "").strip()
    return Path(configured).expanduser().resolve() if configured else Path.cwd().resolve()


def default_config_path() -> Path | None:
    """The config used when no --config is given: `configs/demo.yaml` under the project dir when it
    exists (a checkout, or a folder a user prepared), else the copy shipped inside the installed
    `configs` package; None when neither exists."""
    for candidate in (project_dir() / "configs" / DEMO_CONFIG_NAME, PACKAGED_CONFIG_DIR / DEMO_CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def source_checkout() -> Path | None:
    """The git work tree the imported packages come from, or None (installed into site-packages).

    The packages' parent folder counts only when it is the *top* of a work tree: a virtualenv inside
    some other repository (site-packages under `repo/.venv/...`) must not report that repository.
    Any git problem (not installed, not a repository, not a safe directory) means None, never an error.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=PACKAGE_PARENT, capture_output=True,
                             text=True, timeout=10, env=env, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return PACKAGE_PARENT if top and Path(top).resolve() == PACKAGE_PARENT else None
