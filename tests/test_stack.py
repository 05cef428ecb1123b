"""The production stack without Docker, for real: PostgreSQL behind an MLflow server with basic auth
and a Prefect server, and the demo flow run against both.

Needs a PostgreSQL server; the URL comes from QLORA_STACK_POSTGRES_URL (default: the local server,
trust auth, user postgres). The test creates its own databases and drops them afterwards, and stops
every process it starts. `make stack-test` runs this file alone; `make test` runs it with the rest.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from tests.conftest import DEMO_CONFIG, REPO_ROOT

POSTGRES_URL = os.environ.get("QLORA_STACK_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_database(url: str, database: str, driver: str = "postgresql+psycopg2") -> str:
    """The server URL pointed at `database`; the driver named explicitly (SQLAlchemy 2.1 defaults to psycopg 3)."""
    parsed = urlparse(url)
    return parsed._replace(scheme=driver, path=f"/{database}").geturl()


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is in the dev extra")
    try:
        admin = psycopg2.connect(POSTGRES_URL, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"no PostgreSQL answers at {POSTGRES_URL} ({exc}). Start one, or point QLORA_STACK_POSTGRES_URL "
            "at a server where this user may create databases.",
            pytrace=False,
        )
    admin.autocommit = True
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"qlora_stack_{role}_{suffix}" for role in ("mlflow", "auth", "prefect")}
    with admin.cursor() as cursor:
        for name in names.values():
            cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield names
    finally:
        with admin.cursor() as cursor:
            for name in names.values():
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@dataclass
class Server:
    command: list[str]
    env: dict[str, str]
    health_url: str
    log: Path


@contextmanager
def servers(*specs: Server, timeout: float = 180) -> Iterator[None]:
    """Start the servers together, each in its own process group, wait until every health URL answers, and
    always stop them all. Started together, their schema migrations and imports overlap."""
    processes: list[subprocess.Popen] = []
    try:
        for spec in specs:
            with spec.log.open("w") as handle:
                processes.append(subprocess.Popen(spec.command, env=spec.env, stdout=handle, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        deadline = time.monotonic() + timeout
        for spec, process in zip(specs, processes, strict=True):
            while True:
                if process.poll() is not None:
                    pytest.fail(f"{spec.command[0]} exited with {process.returncode}:\n{spec.log.read_text()[-3000:]}")
                try:
                    if requests.get(spec.health_url, timeout=2).status_code < 500:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{spec.command[0]} did not answer {spec.health_url} in {timeout}s:\n"
                                f"{spec.log.read_text()[-3000:]}")
                time.sleep(1)
        yield
    finally:
        running = [process for process in processes if process.poll() is None]
        for process in running:  # all asked to stop first, so their shutdowns overlap too
            os.killpg(process.pid, signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_demo_flow_against_postgres_backed_mlflow_with_auth_and_prefect_server(databases, demo_assets, tmp_path):
    password = secrets.token_urlsafe(16)
    mlflow_port, prefect_port = free_port(), free_port()
    auth_ini = tmp_path / "auth.ini"
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {with_database(POSTGRES_URL, databases['auth'])}\n"
        "admin_username = admin\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # MLflow checks the password's scrypt hash on every request unless it caches good credentials
        # (default: off). A pipeline run makes hundreds of requests: measured here, registering one
        # adapter took 20 s without the cache and 6 s with it. Wrong credentials are never cached: the
        # 401 checks below still run the full check.
        "auth_cache_ttl_seconds = 600\n"
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    mlflow_env = {**base_env, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                  # CSRF protection of the auth app: MLflow refuses to start without a static key
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32)}
    prefect_env = {
        **base_env,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": with_database(POSTGRES_URL, databases["prefect"],
                                                             "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    mlflow_url, prefect_api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                  "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", with_database(POSTGRES_URL, databases["mlflow"]),
                  "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"]
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    with servers(Server(mlflow_cmd, mlflow_env, f"{mlflow_url}/health", tmp_path / "mlflow.log"),
                 Server(prefect_cmd, prefect_env, f"{prefect_api}/health", tmp_path / "prefect.log")):
        run_env = {
            **base_env,
            "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "PREFECT_API_URL": prefect_api,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": password,
        }
        overrides = [
            f"data.path={demo_assets.data_path.resolve()}",
            f"model.name_or_path={demo_assets.model_dir.resolve()}",
            f"training.output_dir={tmp_path / 'out'}",
            f"registry.tracking_uri={mlflow_url}",
            "registry.model_name=stack-demo-adapter",
            # the servers are under test, not the adapter's quality: a few steps are enough
            "training.max_steps=20", "training.save_steps=10", "evaluation.max_rows=16",
        ]
        command = [str(BIN / "qlora"), "run", "--config", str(DEMO_CONFIG)]
        for item in overrides:
            command += ["--set", item]
        run = subprocess.run(command, env=run_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

        auth = ("admin", password)
        registered = requests.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/get",
                                  params={"name": "stack-demo-adapter"}, auth=auth, timeout=10)
        assert registered.status_code == 200, registered.text
        model = registered.json()["registered_model"]
        aliases = {a["alias"] for a in model.get("aliases", [])}
        assert "challenger" in aliases
        version = requests.get(f"{mlflow_url}/api/2.0/mlflow/model-versions/get",
                               params={"name": "stack-demo-adapter", "version": "1"}, auth=auth, timeout=10)
        assert version.status_code == 200 and version.json()["model_version"]["status"] == "READY"

        for credentials in (None, ("admin", "wrong-password")):
            refused = requests.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/get",
                                   params={"name": "stack-demo-adapter"}, auth=credentials, timeout=10)
            assert refused.status_code == 401

        runs = requests.post(f"{prefect_api}/flow_runs/filter", json={"limit": 5}, timeout=10).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
