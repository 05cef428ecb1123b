"""The work pool base job templates in configs/work-pools/, checked with Prefect's own machinery.

The templates start from Prefect's defaults (`prefect work-pool get-default-base-job-template --type
kubernetes|docker`, i.e. the worker classes' `get_default_base_job_template()`) and add what a QLoRA run
needs: a GPU, GPU nodes, and a volume for `training.output_dir` so that a retried flow run resumes from its
checkpoints. Every template goes through one pipeline, `check_template`:

1. the checks the Prefect server runs when a pool is created: every `{{ placeholder }}` of the job
   configuration is a declared variable (`validate_base_job_template`), the `variables` section is a valid
   JSON schema (`is_valid_schema`), and the defaults satisfy it (`schema_tools.validate`);
2. nothing of Prefect's default template was dropped (its variables and placeholders are all still there);
3. the worker's own job configuration class renders it (`from_template_and_values` +
   `prepare_for_flow_run`, as the worker does for a flow run), and the result is read by the client library
   that receives it: the Kubernetes job manifest as a typed `V1Job` (kubernetes_asyncio, which
   prefect-kubernetes submits with), the Docker container as docker-py's create arguments (what
   `containers.create` sends to the engine). The GPU, node selector and volume are asserted there.

`test_checks_catch_breakage` runs the same pipeline on broken copies, each of which must be rejected for the
intended reason, and `test_prefect_server_accepts_the_pools` creates the pools on a real (temporary) Prefect
server, renders from what the server stored, and shows the server enforcing the variables schema.
No cluster, no Docker engine, no network.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

POOLS_DIR = REPO_ROOT / "configs" / "work-pools"
TEMPLATES = {"kubernetes": POOLS_DIR / "kubernetes.json", "docker": POOLS_DIR / "docker.json"}
OUTPUTS_PVC = POOLS_DIR / "outputs-pvc.yaml"
WORKER_DOCKERFILE = REPO_ROOT / "docker" / "worker.Dockerfile"
# What the issue asks for: one GPU per flow run by default, in the image built from docker/worker.Dockerfile.
DEFAULT_GPUS = 1
# The Docker pool hands a run every GPU of its host, as `docker run --gpus all` does (device request count -1).
ALL_GPUS = -1
WORKER_IMAGE = "qlora-pipeline/worker:latest"
# docker-py needs an Engine API version to build a host config; 1.44 (Docker 25) supports device requests.
DOCKER_API_VERSION = "1.44"
NVIDIA_GPU = "nvidia.com/gpu"


@dataclass
class Expected:
    """What a rendered job must contain. The defaults are what the templates promise without overrides."""

    gpus: int = DEFAULT_GPUS
    image: str = WORKER_IMAGE
    node_selector: dict[str, str] | None = None  # None: the template's default, which must not be empty
    volume: str = field(default_factory=lambda: pvc_manifest()["metadata"]["name"])
    mount_path: str = field(default_factory=lambda: default_mount_path())


def load_template(pool_type: str) -> dict[str, Any]:
    return json.loads(TEMPLATES[pool_type].read_text())


def worker_class(pool_type: str):
    if pool_type == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker
    from prefect_docker.worker import DockerWorker

    return DockerWorker


def pvc_manifest() -> dict[str, Any]:
    return yaml.safe_load(OUTPUTS_PVC.read_text())


def default_mount_path() -> str:
    return load_template("kubernetes")["variables"]["properties"]["output_mount_path"]["default"]


def worker_image_user() -> tuple[str, int, int]:
    """The worker image's WORKDIR and numeric USER uid:gid, read from docker/worker.Dockerfile."""
    text = WORKER_DOCKERFILE.read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.MULTILINE)[-1]
    uid, gid = re.findall(r"^USER\s+(\d+):(\d+)", text, re.MULTILINE)[-1]
    return workdir, int(uid), int(gid)


# --- 1. the server's checks --------------------------------------------------------------------------------


def check_prefect_schema(template: dict[str, Any]) -> None:
    """What the Prefect server runs on POST /work_pools/ (schemas.actions and api.validation)."""
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import is_valid_schema, validate

    validate_base_job_template(template)
    variables = template["variables"]
    is_valid_schema(variables, preprocess=False)
    defaults = {name: spec["default"] for name, spec in variables["properties"].items() if "default" in spec}
    validate(defaults, variables, raise_on_error=True, ignore_required=True, allow_none_with_default=True)


# --- 2. built on Prefect's default -------------------------------------------------------------------------


def placeholder_names(job_configuration: dict[str, Any]) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {placeholder.name for placeholder in find_placeholders(json.dumps(job_configuration))}


def check_extends_prefect_default(pool_type: str, template: dict[str, Any]) -> None:
    """Every variable and placeholder of the worker's default template is kept, so its options still work."""
    default = worker_class(pool_type).get_default_base_job_template()
    dropped_variables = set(default["variables"]["properties"]) - set(template["variables"]["properties"])
    assert not dropped_variables, f"variables of Prefect's default template dropped: {sorted(dropped_variables)}"
    dropped_keys = set(default["job_configuration"]) - set(template["job_configuration"])
    assert not dropped_keys, f"job_configuration keys of Prefect's default template dropped: {sorted(dropped_keys)}"
    dropped = placeholder_names(default["job_configuration"]) - placeholder_names(template["job_configuration"])
    assert not dropped, f"placeholders of Prefect's default template no longer used: {sorted(dropped)}"


# --- 3. rendered by the worker, read by the client library --------------------------------------------------


async def render(pool_type: str, template: dict[str, Any], values: dict[str, Any]):
    """The job configuration a worker of this type builds for a flow run (needs a Prefect API: the harness)."""
    from prefect.client.schemas.objects import FlowRun

    configuration_class = worker_class(pool_type).job_configuration
    configuration = await configuration_class.from_template_and_values(template, values)
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="qlora-template-check"))
    return configuration


async def as_kubernetes_job(manifest: dict[str, Any]):
    """The manifest as the typed V1Job of kubernetes_asyncio: misspelt keys do not survive this."""
    from kubernetes_asyncio.client import ApiClient

    async with ApiClient() as api:
        # deserialize() reads an HTTP response's body; the manifest is that body here.
        return api.deserialize(types.SimpleNamespace(data=json.dumps(manifest)), "V1Job")


async def check_kubernetes_render(template: dict[str, Any], values: dict[str, Any], expected: Expected) -> None:
    configuration = await render("kubernetes", template, values)
    job = await as_kubernetes_job(configuration.job_manifest)
    pod = job.spec.template.spec
    container = pod.containers[0]
    limits = (container.resources.limits if container.resources else None) or {}
    requests = (container.resources.requests if container.resources else None) or {}
    assert limits.get(NVIDIA_GPU) == str(expected.gpus), f"GPU limit: {limits}"
    assert requests.get(NVIDIA_GPU) == str(expected.gpus), f"GPU request: {requests}"
    node_selector = expected.node_selector or template["variables"]["properties"]["node_selector"]["default"]
    assert node_selector, "the default node selector must name GPU nodes"
    assert pod.node_selector == node_selector, f"node selector: {pod.node_selector}"
    claims = {volume.name: volume.persistent_volume_claim.claim_name
              for volume in pod.volumes or [] if volume.persistent_volume_claim}
    mounts = {mount.mount_path: mount.name for mount in container.volume_mounts or []}
    assert expected.mount_path in mounts, f"no volume mounted at {expected.mount_path}: {mounts}"
    assert claims.get(mounts[expected.mount_path]) == expected.volume, (
        f"{expected.mount_path} is not the claim {expected.volume}: volumes {claims}")
    _, _, gid = worker_image_user()
    assert pod.security_context and pod.security_context.fs_group == gid, (
        f"fsGroup must be the image's gid {gid} so its non-root user can write to the volume")
    assert container.image == expected.image, f"image: {container.image}"


def docker_create_arguments(configuration) -> dict[str, Any]:
    """What the Docker worker passes to docker-py's containers.create, turned into Engine API arguments.

    `_build_container_settings` and `_create_container_args` are the private steps the worker and docker-py
    take; they raise on a keyword the Engine does not know (a misspelt device_requests, say).
    """
    import docker  # docker-py; the repo's docker/ folder has no __init__.py, so the installed package wins

    worker = worker_class("docker")(work_pool_name="qlora-gpu-docker")
    client = docker.DockerClient(version=DOCKER_API_VERSION)  # builds requests only; no engine is contacted
    try:
        settings = worker._build_container_settings(client, configuration)
    finally:
        client.close()
    return docker.models.containers._create_container_args({**settings, "version": DOCKER_API_VERSION})


async def check_docker_render(template: dict[str, Any], values: dict[str, Any], expected: Expected) -> None:
    # A remote API URL, as in the compose stack: otherwise the worker asks the engine for its version.
    values = {"env": {"PREFECT_API_URL": "http://prefect-server:4200/api"}, **values}
    arguments = docker_create_arguments(await render("docker", template, values))
    host_config = arguments["host_config"]
    gpu_requests = [request for request in host_config.get("DeviceRequests") or []
                    if ["gpu"] in request["Capabilities"]]
    assert [request["Count"] for request in gpu_requests] == [expected.gpus], (
        f"GPU device requests: {host_config.get('DeviceRequests')}")
    bound = {bind.split(":")[1]: bind.split(":")[0] for bind in host_config.get("Binds") or []}
    assert bound.get(expected.mount_path) == expected.volume, f"volumes: {host_config.get('Binds')}"
    assert arguments["image"] == expected.image, f"image: {arguments['image']}"


async def check_template(pool_type: str, template: dict[str, Any], values: dict[str, Any] | None = None,
                         expected: Expected | None = None) -> None:
    """The whole pipeline: server schema checks, Prefect's default kept, rendered job checked."""
    check_prefect_schema(template)
    check_extends_prefect_default(pool_type, template)
    render_check = check_kubernetes_render if pool_type == "kubernetes" else check_docker_render
    default_gpus = ALL_GPUS if pool_type == "docker" else DEFAULT_GPUS
    await render_check(template, values or {}, expected or Expected(gpus=default_gpus))


# --- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_type", sorted(TEMPLATES))
def test_template_passes_prefect_checks_and_renders_a_gpu_job(prefect_server, pool_type: str):
    """Defaults alone: Kubernetes asks for one GPU; Docker gets every GPU of the host, like `--gpus all`."""
    asyncio.run(check_template(pool_type, load_template(pool_type)))


def test_kubernetes_overrides_reach_the_manifest(prefect_server):
    """Job variables a deployment sets (prefect.yaml job_variables) land in the pod spec."""
    values = {"gpu_count": 2, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
              "output_volume_claim": "qlora-outputs-7b", "output_mount_path": "/data/outputs",
              "image": "registry.example.com/qlora-pipeline/worker:1.0"}
    expected = Expected(gpus=2, image=values["image"], node_selector=values["node_selector"],
                        volume="qlora-outputs-7b", mount_path="/data/outputs")
    asyncio.run(check_template("kubernetes", load_template("kubernetes"), values, expected))


def test_docker_overrides_reach_the_container(prefect_server):
    """One GPU instead of all, and a host directory for the outputs."""
    values = {"container_create_kwargs": {"device_requests": [{"driver": "nvidia", "count": 1,
                                                               "capabilities": [["gpu"]]}]},
              "volumes": ["/srv/qlora/outputs:/app/outputs"]}
    expected = Expected(gpus=1, volume="/srv/qlora/outputs", mount_path="/app/outputs")
    asyncio.run(check_template("docker", load_template("docker"), values, expected))


def test_shipped_configs_write_their_checkpoints_to_the_volume():
    """training.output_dir of every shipped config, resolved in the image's WORKDIR, is on the mounted volume.

    Otherwise the checkpoints die with the pod/container and a retried run starts over.
    """
    from configs.schema import load_config

    workdir, _, _ = worker_image_user()
    docker_mounts = {bind.split(":")[1] for bind in
                     load_template("docker")["variables"]["properties"]["volumes"]["default"]}
    config_paths = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert config_paths
    for config_path in config_paths:
        output_dir = PurePosixPath(workdir) / PurePosixPath(load_config(config_path).training.output_dir.as_posix())
        assert output_dir.is_relative_to(default_mount_path()), f"{config_path.name}: {output_dir} (Kubernetes)"
        assert any(output_dir.is_relative_to(mount) for mount in docker_mounts), f"{config_path.name}: {output_dir}"


def test_outputs_claim_is_a_valid_persistent_volume_claim():
    """The PVC the Kubernetes template mounts by default is in the repo and is a valid manifest."""
    from kubernetes_asyncio.client import ApiClient

    async def parse():
        async with ApiClient() as api:
            return api.deserialize(types.SimpleNamespace(data=json.dumps(pvc_manifest())), "V1PersistentVolumeClaim")

    claim = asyncio.run(parse())
    assert claim.kind == "PersistentVolumeClaim"
    default_claim = load_template("kubernetes")["variables"]["properties"]["output_volume_claim"]["default"]
    assert claim.metadata.name == default_claim
    assert claim.spec.resources.requests["storage"]


def _pod(template: dict[str, Any]) -> dict[str, Any]:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


def _container(template: dict[str, Any]) -> dict[str, Any]:
    return _pod(template)["containers"][0]


def _variables(template: dict[str, Any]) -> dict[str, Any]:
    return template["variables"]["properties"]


def _drop_variable_and_its_use(template: dict[str, Any]) -> None:
    del _variables(template)["stream_output"]
    del template["job_configuration"]["stream_output"]


# (what is broken, pool type, how, the error it must raise: a pattern of its message)
BREAKAGES: list[tuple[str, str, Callable[[dict[str, Any]], Any], str]] = [
    ("placeholder of an undeclared variable", "kubernetes",
     lambda t: _container(t)["resources"]["limits"].__setitem__(NVIDIA_GPU, "{{ gpus }}"), "undeclared variable"),
    ("GPU limit removed", "kubernetes", lambda t: _container(t)["resources"]["limits"].pop(NVIDIA_GPU), "GPU limit"),
    ("GPU request removed", "kubernetes",
     lambda t: _container(t)["resources"]["requests"].pop(NVIDIA_GPU), "GPU request"),
    ("node selector removed", "kubernetes", lambda t: _pod(t).pop("nodeSelector"), "node selector"),
    ("node selector misspelt", "kubernetes",
     lambda t: _pod(t).__setitem__("nodeSelecter", _pod(t).pop("nodeSelector")), "node selector"),
    ("volume mount removed", "kubernetes", lambda t: _container(t).pop("volumeMounts"), "no volume mounted"),
    ("volume of the mount is not the claim", "kubernetes",
     lambda t: _pod(t)["volumes"][0].__setitem__("emptyDir", _pod(t)["volumes"][0].pop("persistentVolumeClaim")),
     "is not the claim"),
    ("fsGroup removed", "kubernetes", lambda t: _pod(t).pop("securityContext"), "fsGroup"),
    ("variables not a JSON schema", "kubernetes",
     lambda t: _variables(t)["gpu_count"].__setitem__("type", "int"), "Invalid schema"),
    ("default violates its own schema", "kubernetes",
     lambda t: _variables(t)["gpu_count"].__setitem__("default", 0), "gpu_count"),
    ("Prefect's stream_output dropped", "kubernetes", _drop_variable_and_its_use, "stream_output"),
    ("image default reset to Prefect's", "kubernetes", lambda t: _variables(t)["image"].pop("default"), "image"),
    ("placeholder of an undeclared variable", "docker",
     lambda t: t["job_configuration"].__setitem__("volumes", "{{ output_volumes }}"), "undeclared variable"),
    ("GPU device request removed", "docker",
     lambda t: _variables(t)["container_create_kwargs"].__setitem__("default", {}), "GPU device requests"),
    ("device request misspelt", "docker",
     lambda t: _variables(t)["container_create_kwargs"]["default"].__setitem__(
         "device_request", _variables(t)["container_create_kwargs"]["default"].pop("device_requests")),
     "unexpected keyword argument 'device_request'"),
    ("outputs volume removed", "docker", lambda t: _variables(t)["volumes"].pop("default"), "volumes"),
    ("Prefect's stream_output dropped", "docker", _drop_variable_and_its_use, "stream_output"),
]


@pytest.mark.parametrize(("what", "pool_type", "breakage", "error"), BREAKAGES,
                         ids=[f"{pool}: {what}" for what, pool, _, _ in BREAKAGES])
def test_checks_catch_breakage(prefect_server, what: str, pool_type: str, breakage, error: str):
    """Each broken copy is rejected, with the error of the check meant to catch it."""
    from prefect.utilities.schema_tools import ValidationError

    broken = copy.deepcopy(load_template(pool_type))
    breakage(broken)
    with pytest.raises((AssertionError, ValueError, TypeError, ValidationError), match=error):
        asyncio.run(check_template(pool_type, broken))


def test_prefect_server_accepts_the_pools(prefect_server):
    """The server validates and stores each template; a worker renders what it stored; job variables that
    break the variables schema are refused when a deployment sets them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    async def main() -> None:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("qlora-finetune")
            for pool_type in sorted(TEMPLATES):
                template = load_template(pool_type)
                name = f"qlora-gpu-{pool_type}-{uuid.uuid4().hex[:8]}"
                await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
                stored = (await client.read_work_pool(name)).base_job_template
                assert stored == template
                await check_template(pool_type, stored)

            # The server checks defaults against the schema too (the client-side model does not).
            broken = load_template("kubernetes")
            _variables(broken)["gpu_count"]["default"] = 0
            with pytest.raises(PrefectHTTPStatusError, match="422"):
                await client.create_work_pool(WorkPoolCreate(name=f"qlora-broken-{uuid.uuid4().hex[:8]}",
                                                             type="kubernetes", base_job_template=broken))

            pool = f"qlora-gpu-kubernetes-{uuid.uuid4().hex[:8]}"
            await client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes",
                                                         base_job_template=load_template("kubernetes")))
            await client.create_deployment(flow_id=flow_id, name="two-gpus", work_pool_name=pool,
                                           job_variables={"gpu_count": 2})
            with pytest.raises(PrefectHTTPStatusError, match="422"):
                await client.create_deployment(flow_id=flow_id, name="no-gpu", work_pool_name=pool,
                                               job_variables={"gpu_count": 0})

    asyncio.run(main())


def test_templates_are_the_files_the_readme_names():
    """The README's Scaling out section points at these files with the commands that create the pools."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    for pool_type, path in TEMPLATES.items():
        relative = Path(path).relative_to(REPO_ROOT).as_posix()
        assert f"--type {pool_type} --base-job-template {relative}" in section, relative
    assert OUTPUTS_PVC.relative_to(REPO_ROOT).as_posix() in section
