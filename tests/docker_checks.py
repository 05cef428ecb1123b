"""Checks of the Docker stack in docker/, used by tests/test_docker.py: no Docker engine, no network.

Kept out of the test file so that the test file holds only the tests and the self-check that proves
each check can fail. Every `check_*` function takes parsed structures (the compose file as a dict,
Dockerfile instructions as (INSTRUCTION, arguments) pairs, .env files as dicts) and raises an
AssertionError naming the problem; it never reads the real files itself, so the self-check can hand
it a deliberately broken copy.

- docker/compose.yaml, after ${VAR} interpolation with docker/.env.example, is validated against the
  Compose Specification JSON schema in tests/fixtures/compose-spec.json (`compose_schema_errors`).
  Source of the schema: the PyPI wheel check-jsonschema 0.39.0, file
  check_jsonschema/builtin_schemas/vendor/compose-spec.json, a verbatim copy of schema/compose-spec.json
  of github.com/compose-spec/compose-spec (Apache-2.0), JSON Schema 2020-12,
  sha256 d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64.
  The schema shipped by docker-compose 1.29.2 (compose/config/compose_spec.json) is too old for
  this file: it rejects the top-level `name` used here, and it has no
  healthcheck `start_interval`, no `host_ip` in long port syntax, no `gpus`, and its depends_on
  entries reject `required`/`restart`.
- The wiring checks: services, health checks, secrets (including the check-secrets service that
  refuses change-me placeholders), volumes, ports, .env.example, the Dockerfiles and their
  .dockerignore allowlists, the PostgreSQL init script and mlflow-auth.ini.

This module lives in tests/, never in docker/: docker/ and mlflow/ must not become Python packages.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import hmac
import json
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
WORKER_DOCKERFILE = DOCKER / "worker.Dockerfile"
SERVER_DOCKERFILE = DOCKER / "server.Dockerfile"
DOCKERFILES = [WORKER_DOCKERFILE, SERVER_DOCKERFILE]
AUTH_INI = DOCKER / "mlflow-auth.ini"
INIT_SCRIPT = DOCKER / "postgres-init" / "10-create-databases.sh"
COMPOSE_SCHEMA = REPO / "tests" / "fixtures" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
PREFECT_YAML = REPO / "prefect.yaml"

# The one-shot service that refuses placeholder secrets before anything that uses one starts.
SECRETS_CHECK = "check-secrets"
SERVICES = {SECRETS_CHECK, "postgres", "prefect-server", "mlflow", "worker"}
# Environment variable names that hold credentials.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|(^|_)KEY$|PASSWD|CREDENTIAL")
# Secrets that may be left empty (anonymous access); they still must not default to a value.
OPTIONAL_SECRETS = {"HF_TOKEN"}
# What every secret in .env.example holds, and what the check-secrets service refuses.
PLACEHOLDER = "change-me"
SOURCE_DIRS = ("tasks/", "flows/", "configs/")


# --------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------


class MissingVariable(Exception):
    pass


# $$ | ${NAME} | ${NAME<op>ARG} with op one of :- - :? ? :+ + | $NAME
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-style interpolation of one string (no nesting, which this project does not use)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        is_set, non_empty = value is not None, bool(value)
        if op is None:
            return value or ""
        if op == ":-":
            return value if non_empty else arg
        if op == "-":
            return value if is_set else arg
        if op in (":?", "?"):
            if not (non_empty if op == ":?" else is_set):
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op == ":+":
            return arg if non_empty else ""
        return arg if is_set else ""  # op == "+"

    return _VARIABLE.sub(substitute, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def strings_in(node: Any) -> list[str]:
    """Every string value in a parsed YAML tree: what compose interpolates (comments are not)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in strings_in(item)]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    return []


def variables_used(tree: Any) -> set[str]:
    return {
        m.group("braced") or m.group("bare")
        for text in strings_in(tree)
        for m in _VARIABLE.finditer(text)
        if not m.group("escaped")
    }


def required_variables(tree: Any) -> set[str]:
    return {
        m.group("braced")
        for text in strings_in(tree)
        for m in _VARIABLE.finditer(text)
        if m.group("op") in (":?", "?")
    }


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments are skipped (the subset compose files use here)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, in map or list ("KEY=VALUE") form, as a dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_args(service: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        args += shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    return args


def option_value(args: list[str], option: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker also drops comment lines inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def exec_form_or_words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    sources = []
    for keyword, args in instructions:
        if keyword in ("COPY", "ADD"):
            words = [w for w in exec_form_or_words(args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = interpolate(value, env)
    return env


def compose_schema_validator() -> Any:
    """A validator for the vendored compose-spec schema, after checking the schema itself is valid."""
    from jsonschema.validators import validator_for  # dev dependency: imported where it is needed

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def compose_schema_errors(compose: dict, validator: Any = None) -> list[str]:
    """Every place the (interpolated) compose file breaks the compose-spec schema, as "path: message"."""
    validator = validator or compose_schema_validator()
    errors = sorted(validator.iter_errors(compose), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


# --------------------------------------------------------------------------------------------
# Checks. Each takes parsed structures and fails with an AssertionError.
# --------------------------------------------------------------------------------------------


def check_matches_compose_schema(compose: dict, validator: Any = None) -> None:
    errors = compose_schema_errors(compose, validator)
    assert not errors, "\n".join(errors)


def check_services_exist(compose: dict) -> None:
    missing = SERVICES - set(compose.get("services", {}))
    assert not missing, f"services missing from compose.yaml: {sorted(missing)}"


def _healthy_dependencies(service: dict) -> set[str]:
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):  # short form: only waits for "started"
        return set()
    return {name for name, spec in depends_on.items() if (spec or {}).get("condition") == "service_healthy"}


def check_servers_wait_for_healthy_postgres(compose: dict) -> None:
    for name in ("prefect-server", "mlflow"):
        assert "postgres" in _healthy_dependencies(compose["services"][name]), (
            f"{name} must depend on postgres with condition: service_healthy"
        )


def check_worker_waits_for_servers(compose: dict) -> None:
    missing = {"prefect-server", "mlflow"} - _healthy_dependencies(compose["services"]["worker"])
    assert not missing, f"worker must depend on {sorted(missing)} with condition: service_healthy"


def check_healthchecks(compose: dict) -> None:
    services = compose["services"]
    test = (services["postgres"].get("healthcheck") or {}).get("test") or []
    test_words = shlex.split(test) if isinstance(test, str) else test
    assert any("pg_isready" in word for word in test_words), "postgres healthcheck must run pg_isready"
    # A service_healthy dependency on a service without a healthcheck never becomes healthy.
    for name, service in services.items():
        for dependency in _healthy_dependencies(service):
            healthcheck = services[dependency].get("healthcheck") or {}
            assert healthcheck.get("test") and not healthcheck.get("disable"), (
                f"{name} waits for {dependency} to be healthy, but {dependency} has no healthcheck"
            )


def check_mlflow_basic_auth(compose: dict) -> None:
    mlflow = compose["services"]["mlflow"]
    args = command_args(mlflow)
    assert args[:2] == ["mlflow", "server"], f"mlflow service must run `mlflow server`, runs {args[:2]}"
    assert option_value(args, "--app-name") == "basic-auth", "mlflow server needs --app-name basic-auth"
    env = environment_of(mlflow)
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env.get(name), f"mlflow service needs {name} for basic auth"


def check_worker_reserves_gpu(compose: dict) -> None:
    devices = (
        compose["services"]["worker"]
        .get("deploy", {})
        .get("resources", {})
        .get("reservations", {})
        .get("devices", [])
    )
    assert any(
        device.get("driver") == "nvidia"
        and "gpu" in device.get("capabilities", [])
        and (device.get("count") == "all" or int(device.get("count", 0)) >= 1 or device.get("device_ids"))
        for device in devices
    ), f"worker must reserve an nvidia GPU under deploy.resources.reservations.devices, has {devices}"


def _host_ip(port: Any) -> str | None:
    if isinstance(port, dict):
        return port.get("host_ip")
    spec = str(port).split("/")[0]  # drop /tcp
    parts = spec.rsplit(":", 2)  # [host_ip:]published:target
    return parts[0] if len(parts) == 3 else None


def check_ports_bound_to_localhost(compose_defaults: dict) -> None:
    for name, service in compose_defaults["services"].items():
        for port in service.get("ports", []):
            assert _host_ip(port) == "127.0.0.1", (
                f"{name}: published port {port!r} must bind 127.0.0.1 by default "
                '("${BIND_ADDRESS:-127.0.0.1}:...")'
            )


_REQUIRED_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
_EMPTY_DEFAULT_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-)?\}")
_URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<password>[^@\s]+)@")


def check_no_literal_secrets(raw_compose: dict) -> None:
    for name, service in raw_compose["services"].items():
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key):
                if key in OPTIONAL_SECRETS and _EMPTY_DEFAULT_REF.fullmatch(value):
                    continue
                assert _REQUIRED_REF.fullmatch(value), (
                    f"{name}: {key}={value!r} must be exactly ${{VAR:?message}} (no literal or default)"
                )
        # Credentials inside URLs (env values or command arguments) must be references too.
        for text in [*environment_of(service).values(), *command_args(service)]:
            for match in _URL_PASSWORD.finditer(text):
                assert _REQUIRED_REF.fullmatch(match.group("password")), (
                    f"{name}: password written into URL {text!r}"
                )


def _volume_mounts(service: dict) -> list[dict[str, Any]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append(
                {
                    "source": volume.get("source"),
                    "target": volume.get("target"),
                    "read_only": bool(volume.get("read_only")),
                    "type": volume.get("type"),
                }
            )
            continue
        parts = volume.split(":")
        if len(parts) == 1:  # anonymous volume: "/path"
            mounts.append({"source": None, "target": parts[0], "read_only": False, "type": "volume"})
        else:
            mode = parts[2] if len(parts) > 2 else ""
            mounts.append(
                {
                    "source": parts[0],
                    "target": parts[1],
                    "read_only": "ro" in mode.split(","),
                    "type": "bind" if parts[0].startswith((".", "/", "~")) else "volume",
                }
            )
    return mounts


def check_volumes_named(compose: dict) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for mount in _volume_mounts(service):
            if mount["type"] == "bind":
                # Only configuration from docker/ itself, read-only (e.g. the postgres init scripts).
                source = (COMPOSE_FILE.parent / mount["source"]).resolve()
                assert source.is_relative_to(DOCKER) and mount["read_only"], (
                    f"{name}: bind mount {mount['source']} must be read-only and inside docker/; "
                    "data belongs on named volumes"
                )
                continue
            assert mount["source"] in declared, (
                f"{name}: volume for {mount['target']} must be a named volume declared at top level"
            )
            used.add(mount["source"])
    assert declared <= used, f"declared but unused volumes: {sorted(declared - used)}"


def _mounted_on_named_volume(compose: dict, service: str, path: str) -> bool:
    declared = set(compose.get("volumes") or {})
    return any(
        mount["source"] in declared and PurePosixPath(path).is_relative_to(mount["target"])
        for mount in _volume_mounts(compose["services"][service])
    )


def check_state_on_named_volumes(compose: dict, worker_env: dict[str, str]) -> None:
    """Everything worth keeping lives on a named volume."""
    assert _mounted_on_named_volume(compose, "postgres", "/var/lib/postgresql/data"), "postgres data"
    artifacts = option_value(command_args(compose["services"]["mlflow"]), "--artifacts-destination")
    assert artifacts and _mounted_on_named_volume(compose, "mlflow", artifacts), "mlflow artifacts"
    hf_home = environment_of(compose["services"]["worker"]).get("HF_HOME") or worker_env.get("HF_HOME")
    assert hf_home and _mounted_on_named_volume(compose, "worker", hf_home), "worker HF cache (HF_HOME)"
    assert _mounted_on_named_volume(compose, "worker", "/app/outputs"), "worker training outputs"


def check_env_example_complete(raw_compose: dict, env_example: dict[str, str]) -> None:
    used, listed = variables_used(raw_compose), set(env_example)
    assert not used - listed, f"variables missing from .env.example: {sorted(used - listed)}"
    assert not listed - used, f".env.example lists unused variables: {sorted(listed - used)}"


_PREFECT_ENV_TEMPLATE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def check_env_example_has_only_placeholders(env_example: dict[str, str]) -> None:
    """No real secret ends up in the committed example: every secret value is a change-me placeholder."""
    for key, value in env_example.items():
        if SECRET_NAME.search(key) and key not in OPTIONAL_SECRETS:
            assert PLACEHOLDER in value, f".env.example: {key} must hold a {PLACEHOLDER} placeholder"
        if key in OPTIONAL_SECRETS:
            assert not value, f".env.example: {key} must be left empty"


def placeholder_variables(env_example: Mapping[str, str]) -> set[str]:
    """The variables .env.example holds a change-me placeholder for: what a copied, unedited
    docker/.env would start the stack with, and so what the check-secrets service must refuse."""
    return {key for key, value in env_example.items() if PLACEHOLDER in value}


def _completed_dependencies(service: Mapping[str, Any]) -> set[str]:
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):  # short form: only waits for "started"
        return set()
    return {
        name
        for name, spec in depends_on.items()
        if (spec or {}).get("condition") == "service_completed_successfully"
    }


def check_secret_users_wait_for_secrets_check(raw_compose: dict, env_example: dict[str, str]) -> None:
    """Every service that receives a placeholder-bearing variable starts only after check-secrets has
    exited 0, so a copied, unedited .env never reaches a database or a server as a password.

    Works on the raw file (${...} not substituted): which variables a service uses is only visible there,
    whatever key or argument it passes them under."""
    placeholders = placeholder_variables(env_example)
    assert placeholders, f".env.example holds no {PLACEHOLDER} placeholder to check"
    services = raw_compose["services"]
    assert SECRETS_CHECK in services, f"compose.yaml needs the {SECRETS_CHECK} service"
    restart = services[SECRETS_CHECK].get("restart", "no")
    assert restart == "no", f'{SECRETS_CHECK} runs once: its restart policy must be "no", is {restart!r}'
    for name, service in services.items():
        if name == SECRETS_CHECK:
            continue
        used = variables_used(service) & placeholders
        assert not used or SECRETS_CHECK in _completed_dependencies(service), (
            f"{name} uses {sorted(used)} but does not wait for {SECRETS_CHECK}: add "
            f"depends_on: {{{SECRETS_CHECK}: {{condition: service_completed_successfully}}}}"
        )


def check_secrets_check_covers_placeholders(raw_compose: dict, env_example: dict[str, str]) -> None:
    """The check-secrets script receives and inspects every variable .env.example holds a placeholder for."""
    service = raw_compose["services"][SECRETS_CHECK]
    args = command_args(service)
    assert args[:2] == ["/bin/sh", "-c"] and len(args) == 3, (
        f"{SECRETS_CHECK} must run one script with /bin/sh -c, runs {args}"
    )
    script_words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", args[2]))
    env = environment_of(service)
    for name in sorted(placeholder_variables(env_example)):
        assert variables_used(env.get(name, "")) == {name}, (
            f"{SECRETS_CHECK} must receive {name} in its environment as {name}: ${{{name}:?...}}"
        )
        assert name in script_words, f"{SECRETS_CHECK}'s script does not check {name}"


def secrets_check_script(compose: dict) -> str:
    """The check-secrets shell script as the container runs it (compose has turned $$ into $)."""
    return command_args(compose["services"][SECRETS_CHECK])[2]


def check_worker_runs_prefect_yaml(compose: dict, prefect_yaml: dict, worker_env: dict[str, str]) -> None:
    """The worker serves the pool the deployments name and has the env their steps template in."""
    script = " ".join(command_args(compose["services"]["worker"]))
    pools_served = set(re.findall(r"--pool\s+(\S+)", script))
    pools_needed = {d["work_pool"]["name"] for d in prefect_yaml.get("deployments", [])}
    assert pools_needed, "prefect.yaml defines no deployment with a work pool"
    assert pools_served == pools_needed, f"worker serves pools {pools_served}, deployments use {pools_needed}"
    assert "deploy --all" in script, "worker must register the deployments (prefect deploy --all)"
    env = {**worker_env, **environment_of(compose["services"]["worker"])}
    templated = set(_PREFECT_ENV_TEMPLATE.findall(json.dumps(prefect_yaml)))
    missing = templated - set(env)
    assert not missing, f"prefect.yaml needs {sorted(missing)} in the worker environment"


def check_worker_dockerfile_layers(instructions: list[tuple[str, str]]) -> None:
    def first(predicate: Callable[[str, str], bool]) -> int:
        return next((i for i, (kw, args) in enumerate(instructions) if predicate(kw, args)), -1)

    def copies(source: str) -> Callable[[str, str], bool]:
        return lambda kw, args: kw == "COPY" and source in exec_form_or_words(args)[:-1]

    base = instructions[0]
    assert base[0] == "FROM" and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base[1]), (
        f"worker image must start FROM an nvidia/cuda *-runtime-ubuntu* tag, not {base[1]!r}"
    )
    deps = first(lambda kw, args: kw == "RUN" and "pip install" in args and " -r " in args)
    project = first(lambda kw, args: kw == "RUN" and re.search(r"pip install --no-deps \.(\s|$)", args))
    source_copies = [first(copies(src)) for src in SOURCE_DIRS]
    assert deps >= 0, "worker.Dockerfile must install the dependencies with `pip install -r ...`"
    assert project >= 0, "worker.Dockerfile must install the project with `pip install --no-deps .`"
    assert min(source_copies) >= 0, f"worker.Dockerfile must COPY {SOURCE_DIRS}"
    assert deps < min(source_copies), "dependencies must be installed before the source is copied"
    assert project > max(source_copies), "the project must be installed after the source is copied"
    assert all(
        src in {"pyproject.toml", "docker/list_requirements.py"}
        for kw, args in instructions[:deps]
        if kw == "COPY"
        for src in exec_form_or_words(args)[:-1]
    ), "only pyproject.toml (and the requirements helper) may be copied before the dependency layer"
    torch_pin = first(lambda kw, args: kw == "RUN" and re.search(r"torch==", args) is not None)
    assert 0 <= torch_pin <= deps, "torch must be pinned (torch==...) to the build the CUDA base matches"


def check_non_root_user(instructions: list[tuple[str, str]]) -> None:
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "the image must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER must not be root, is {users[-1]!r}"


def check_no_baked_secrets(instructions: list[tuple[str, str]]) -> None:
    for kw, args in instructions:
        if kw in ("ENV", "ARG"):
            for word in shlex.split(args):
                name = word.partition("=")[0]
                assert not SECRET_NAME.search(name), f"secret baked into the image: {kw} {args}"


def check_dockerignore_allows_copies(dockerfile: Path, instructions: list[tuple[str, str]]) -> None:
    """The Dockerfile-specific .dockerignore is an allowlist that lets in exactly what COPY needs."""
    ignore = Path(f"{dockerfile}.dockerignore")
    assert ignore.exists(), f"{ignore.name} is missing"
    lines = [line.strip() for line in ignore.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", f"{ignore.name} must start with `*` (allowlist)"
    allowed = {p[1:].strip("/") for p in patterns if p.startswith("!")}
    needed = {src.strip("/").removeprefix("./") for src in copy_sources(instructions)}
    assert not needed - allowed, f"{ignore.name} leaves out COPY sources {sorted(needed - allowed)}"
    assert not allowed - needed, f"{ignore.name} lets in {sorted(allowed - needed)} that no COPY uses"


def _database(uri: str) -> str:
    return urlsplit(uri).path.lstrip("/")


def check_databases_created(compose: dict, init_script: str, auth_ini: configparser.ConfigParser) -> None:
    created = set(re.findall(r"CREATE DATABASE (\w+)", init_script))
    prefect_env = environment_of(compose["services"]["prefect-server"])
    used = {
        prefect_env.get("PREFECT_SERVER_DATABASE_NAME")
        or _database(prefect_env.get("PREFECT_API_DATABASE_CONNECTION_URL", "")),
        _database(option_value(command_args(compose["services"]["mlflow"]), "--backend-store-uri") or ""),
        _database(auth_ini["mlflow"]["database_uri"]),
    }
    assert used <= created, f"databases used but not created by the init script: {sorted(used - created)}"
    mounts = _volume_mounts(compose["services"]["postgres"])
    assert any(
        m["target"] == "/docker-entrypoint-initdb.d"
        and (COMPOSE_FILE.parent / m["source"]).resolve() == INIT_SCRIPT.parent
        for m in mounts
        if m["source"]
    ), "postgres must mount docker/postgres-init at /docker-entrypoint-initdb.d"


def check_auth_ini(
    auth_ini: configparser.ConfigParser, server_env: dict[str, str], server_copies: list[tuple[str, str]]
) -> None:
    section = auth_ini["mlflow"]
    uri = urlsplit(section["database_uri"])
    assert uri.scheme.startswith("postgresql"), f"auth database must be PostgreSQL, is {uri.scheme}"
    assert uri.password is None, "no password in mlflow-auth.ini: psycopg2 reads PGPASSWORD"
    assert not section.get("admin_password"), "admin password must come from MLFLOW_AUTH_ADMIN_PASSWORD"
    destination = next((dest for src, dest in server_copies if src == "docker/mlflow-auth.ini"), None)
    assert destination and server_env.get("MLFLOW_AUTH_CONFIG_PATH") == destination, (
        "server.Dockerfile must COPY mlflow-auth.ini to the path MLFLOW_AUTH_CONFIG_PATH names"
    )


def copies_with_destination(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = []
    for kw, args in instructions:
        if kw == "COPY":
            words = [w for w in exec_form_or_words(args) if not w.startswith("--")]
            pairs += [(src, words[-1]) for src in words[:-1]]
    return pairs


def read_auth_ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read_string(AUTH_INI.read_text())
    return parser


def scram_verifier_matches(stored: str, password: str) -> bool:
    """Check a PostgreSQL SCRAM-SHA-256 verifier (RFC 5802/7677) against a clear-text password."""
    method, rest = stored.split("$", 1)
    iterations_salt, keys = rest.split("$", 1)
    iterations, salt = iterations_salt.split(":")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return (
        method == "SCRAM-SHA-256"
        and hashlib.sha256(client_key).digest() == stored_key
        and (hmac.new(salted, b"Server Key", "sha256").digest() == server_key)
    )
