"""The model server, over real HTTP: a real uvicorn server on a random port of 127.0.0.1, the real demo
base in 4 bits with two really trained adapters, registered into a real sqlite MLflow store.

One server is shared by the whole module (loading is the expensive part); the test that moves the
champion alias runs last, because it changes what the server answers with.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import typed_eval_report

TOKEN = "test-serving-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAME = "demo-qlora-adapter"
CHAMPION, CHALLENGER = f"{NAME}@champion", f"{NAME}@challenger"
PROMPT = "Rewrite this in Zorbish.\n\nthe red cat runs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(client: httpx.Client, model: str | None, text: str = PROMPT, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 12, **extra}
    if model is not None:
        body["model"] = model
    return client.post("/v1/chat/completions", json=body)


def answer_text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja")


@pytest.fixture(scope="module")
def second_adapter(trained, tmp_path_factory):
    """A second really trained adapter that answers differently: the shared run's adapter as it was at its
    step-80 checkpoint (adapter files only), so this module costs no second training run; trained for 40
    steps with another learning rate when that checkpoint is not there."""
    from tasks.checkpoints import CHECKPOINT_DIRNAME
    from tasks.train import train

    config, plan, splits, result = trained
    checkpoint = Path(config.training.output_dir) / CHECKPOINT_DIRNAME / "checkpoint-80"
    if (checkpoint / "adapter_model.safetensors").is_file():
        folder = tmp_path_factory.mktemp("second-adapter") / "adapter-step-80"
        folder.mkdir()
        for name in ADAPTER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, folder / name)
        return folder
    other = config.model_copy(deep=True)
    other.training.output_dir = tmp_path_factory.mktemp("second-adapter")
    other.training.max_steps, other.training.learning_rate, other.training.seed = 40, 1e-3, 7
    return train(other, plan, splits).adapter_dir


@pytest.fixture(scope="module")
def served(trained, second_adapter, mlflow_store_template, tmp_path_factory):
    """(base URL, config, ModelServer) of a live server: v1 = the shared adapter (champion), v2 = the second
    adapter (challenger), A/B 70/30 between them, aliases watched every 0.5 s, token required."""
    import uvicorn

    from tasks.register import register_adapter
    from tasks.serving import create_app

    folder = tmp_path_factory.mktemp("serving-store")
    shutil.copyfile(mlflow_store_template, folder / "mlflow.db")
    config = trained[0].model_copy(deep=True)
    config.training.output_dir = folder / "out"
    registry = config.registry
    registry.tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    registry.request_max_retries, registry.request_timeout_s, registry.log_input_example = 0, 10, False
    first = register_adapter(config, trained[3].adapter_dir, typed_eval_report())
    second = register_adapter(config, second_adapter, typed_eval_report(adapter=55.0, champion=60.0))
    assert (first.version, first.promoted, second.version, second.promoted) == ("1", True, "2", False)
    config.serving = config.serving.model_validate({
        "models": [f"models:/{CHAMPION}", f"models:/{CHALLENGER}"],
        "ab": {"champion": 0.7, "challenger": 0.3}, "max_batch_size": 8, "max_wait_ms": 150,
        "watch_interval_s": 0.5, "max_prompt_tokens": 48, "max_tokens": 16, "default_max_tokens": 8,
        "summary_interval_s": 3600})
    app = create_app(config, token=TOKEN)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            ready = httpx.get(f"{url}/ready", timeout=5)
            if ready.status_code == 200:
                break
            assert ready.json()["status"] == "loading", ready.text
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not get ready in 300 s"
        time.sleep(0.2)
    yield url, config, app.state.server
    server.should_exit = True
    thread.join(timeout=60)


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0], headers=AUTH, timeout=120) as http:
        yield http


def test_models_lists_every_adapter_with_its_version(client) -> None:
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(listed) == {CHAMPION, CHALLENGER, "__base__"}
    assert (listed[CHAMPION]["version"], listed[CHALLENGER]["version"]) == (f"{NAME}/1", f"{NAME}/2")
    response = chat(client, CHAMPION)
    assert response.headers["x-qlora-model-version"] == f"{NAME}/1"
    assert response.headers["x-qlora-arm"] == "none" and response.headers["x-request-id"] == response.json()["id"]


def test_two_adapters_in_one_mixed_batch_answer_as_each_alone(client, served) -> None:
    prompts = {CHAMPION: PROMPT, CHALLENGER: "Rewrite this in Zorbish.\n\nbig dog", "__base__": PROMPT}
    alone = {}
    for model, text in prompts.items():
        response = chat(client, model, text)
        assert response.headers["x-qlora-batch-size"] == "1"
        alone[model] = answer_text(response)
    assert alone[CHAMPION] != alone["__base__"], "the adapter must answer differently from the base"
    # the challenger on the champion's prompt differs too: the batch really mixes two adapters
    assert answer_text(chat(client, CHALLENGER, PROMPT)) != alone[CHAMPION]

    together: dict[str, httpx.Response] = {}
    threads = [threading.Thread(target=lambda m=m, t=t: together.__setitem__(m, chat(client, m, t)))
               for m, t in prompts.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {m: r.headers["x-qlora-batch-size"] for m, r in together.items()} == dict.fromkeys(prompts, "3")
    assert {m: answer_text(r) for m, r in together.items()} == alone


def test_completions_and_streaming(client) -> None:
    plain = client.post("/v1/completions", json={"model": CHAMPION, "prompt": ["red cat", "big dog"], "max_tokens": 5})
    assert plain.status_code == 200, plain.text
    choices = plain.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert plain.json()["usage"]["completion_tokens"] <= 10

    whole = answer_text(chat(client, CHAMPION))
    pieces, finish = [], None
    with client.stream("POST", "/v1/chat/completions", json={
            "model": CHAMPION, "stream": True, "max_tokens": 12,
            "messages": [{"role": "user", "content": PROMPT}]}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        pieces.append(choice["delta"].get("content", ""))
        finish = choice["finish_reason"] or finish
    assert "".join(pieces).strip() == whole and finish in ("stop", "length")
    assert len([p for p in pieces if p]) > 1, "a stream sends the answer in pieces"


@pytest.mark.parametrize(("request_kwargs", "status", "code"), [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ({"json": {"model": CHAMPION}}, 400, "invalid_request"),  # no prompt
    ({"json": {"model": "no-such-model", "prompt": "x"}}, 404, "model_not_found"),
    ({"json": {"model": CHAMPION, "prompt": "red cat " * 40}}, 400, "context_length_exceeded"),
    ({"json": {"model": CHAMPION, "prompt": "x", "max_tokens": 17}}, 400, "max_tokens_exceeded"),
    ({"json": {"model": CHAMPION, "prompt": "x", "max_tokens": 0}}, 400, "invalid_request"),
    ({"json": {"model": CHAMPION, "prompt": "x", "n": 2}}, 400, "invalid_request"),
    ({"json": {"model": CHAMPION, "prompt": []}}, 400, "invalid_request"),
    ({"json": {"model": CHAMPION, "prompt": "x"}, "headers": {"Authorization": ""}}, 401, "invalid_api_key"),
    ({"json": {"model": CHAMPION, "prompt": "x"}, "headers": {"Authorization": "Bearer wrong"}}, 401,
     "invalid_api_key"),
])
def test_bad_completion_requests_get_their_4xx_and_the_server_keeps_serving(client, request_kwargs, status,
                                                                           code) -> None:
    response = client.post("/v1/completions", **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert client.post("/v1/completions", json={"model": CHAMPION, "prompt": "red cat", "max_tokens": 2}
                       ).status_code == 200


def test_other_bad_requests(client, served) -> None:
    checks = [
        (client.post("/v1/chat/completions", json={"model": CHAMPION, "messages": []}), 400, "invalid_request"),
        (client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
         404, "model_not_found"),
        (client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400,
         "invalid_request"),
        (client.post("/v1/feedback", json={"request_id": "cmpl-unknown", "score": 1}), 404, "request_not_found"),
        (client.post("/v1/feedback", json={"request_id": "x"}), 400, "invalid_request"),
        (client.get("/v1/nothing-here"), 404, "not_found"),
        (httpx.get(f"{served[0]}/v1/models"), 401, "invalid_api_key"),
        (httpx.get(f"{served[0]}/metrics"), 401, "invalid_api_key"),
    ]
    for response, status, code in checks:
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    # liveness and readiness are open, for orchestrators
    assert httpx.get(f"{served[0]}/health").json() == {"status": "ok"}
    assert httpx.get(f"{served[0]}/ready").status_code == 200


def test_a_non_loopback_bind_needs_a_token() -> None:
    from configs.schema import ConfigError
    from tasks.serving import TOKEN_ENV, required_token

    with pytest.raises(ConfigError, match=TOKEN_ENV):
        required_token("0.0.0.0", {})
    assert required_token("0.0.0.0", {TOKEN_ENV: "s3cret"}) == "s3cret"
    assert required_token("127.0.0.1", {}) is None


def test_ab_weights_sticky_users_feedback_metrics_and_report(client, served) -> None:
    from tasks.serving_ab import ab_report, choose_arm, format_report

    _, config, server = served
    users = [f"user-{i}" for i in range(120)]
    arms: dict[str, str] = {}
    ids: dict[str, list[str]] = {"champion": [], "challenger": []}
    lock = threading.Lock()

    def ask(user: str) -> None:
        response = client.post("/v1/completions", json={"prompt": "red cat", "max_tokens": 1, "user": user})
        assert response.status_code == 200, response.text
        arm = response.headers["x-qlora-arm"]
        expected_version = {"champion": f"{NAME}/1", "challenger": f"{NAME}/2"}[arm]
        assert response.headers["x-qlora-model-version"] == expected_version
        with lock:
            assert arms.setdefault(user, arm) == arm, f"{user} must stay in its arm"
            ids[arm].append(response.json()["id"])

    for _ in range(2):  # every user twice: the second time lands in the same arm
        workers = [threading.Thread(target=lambda chunk=users[i::8]: [ask(u) for u in chunk]) for i in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    share = Counter(arms.values())["champion"] / len(users)
    assert abs(share - 0.7) < 0.15, f"champion share {share:.2f} for weight 0.7"
    assert arms == {u: choose_arm({"champion": 0.7, "challenger": 0.3}, u) for u in users}

    # the challenger's answers are liked better
    for arm, score in (("champion", 0.0), ("challenger", 1.0)):
        for n, request_id in enumerate(ids[arm]):
            recorded = client.post("/v1/feedback", json={"request_id": request_id, "score": score + 0.1 * (n % 3)})
            assert recorded.status_code == 200 and recorded.json()["arm"] == arm
    metrics = client.get("/metrics").text
    for arm in ("champion", "challenger"):
        count, version = float(len(ids[arm])), f"{NAME}/{1 if arm == 'champion' else 2}"
        assert f'qlora_requests_total{{arm="{arm}",model="{NAME}@{arm}",version="{version}"}} {count}' in metrics
        assert f'qlora_feedback_score_count{{arm="{arm}",version="{version}"}} {count}' in metrics
    assert "qlora_request_latency_seconds_bucket" in metrics and "qlora_batch_size_bucket" in metrics

    server.summaries.flush()  # what the periodic thread does every serving.summary_interval_s
    summaries, extra = ab_report(config)
    by_arm = {s.arm: s for s in summaries}
    assert {a: by_arm[a].requests for a in ("champion", "challenger")} == {a: len(ids[a]) for a in ids}
    assert by_arm["challenger"].feedback_mean > by_arm["champion"].feedback_mean
    assert extra["p_values"]["champion vs challenger"] < 0.001
    assert "significant" in format_report(summaries, extra)


def test_moving_the_champion_alias_switches_without_a_failed_request(client, served) -> None:
    from mlflow import MlflowClient

    url, config, server = served
    registry = MlflowClient(tracking_uri=config.registry.tracking_uri, registry_uri=config.registry.tracking_uri)
    seen: list[tuple[float, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as own:
            while not stop.is_set():
                try:
                    response = chat(own, CHAMPION, max_tokens=4)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text}")
                    else:
                        seen.append((time.monotonic(), response.headers["x-qlora-model-version"]))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    workers = [threading.Thread(target=loop) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 60
        while len(seen) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        registry.set_registered_model_alias(NAME, "champion", "2")
        moved = time.monotonic()
        while not any(v == f"{NAME}/2" and t > moved for t, v in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        after = len(seen)
        while len(seen) < after + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not failures, failures[:3]
    versions = [v for _, v in sorted(seen)]
    assert versions[0] == f"{NAME}/1" and versions[-1] == f"{NAME}/2", Counter(versions)
    listed = {m["id"]: m["version"] for m in client.get("/v1/models").json()["data"]}
    assert listed[CHAMPION] == f"{NAME}/2"
    # champion and challenger are one version now: the old adapter was unloaded, one remains
    deadline = time.monotonic() + 10
    while len(server.pool.model.peft_config) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(server.pool.model.peft_config) == 1

    # /admin/reload switches at once (the watcher may already have done it; either way v1 answers now)
    registry.set_registered_model_alias(NAME, "champion", "1")
    reloaded = client.post("/admin/reload")
    assert reloaded.status_code == 200
    assert chat(client, CHAMPION).headers["x-qlora-model-version"] == f"{NAME}/1"


def test_serving_config_rejects_unknown_keys_and_bad_arms(make_config) -> None:
    from configs.schema import ConfigError
    from tasks.serving_ab import arm_models

    with pytest.raises(ConfigError, match="unknown key 'serving.max_batch'"):
        make_config("serving.max_batch=4")
    config = make_config(f"serving.models=[models:/{CHAMPION}]", "serving.ab={champion: 1, nobody: 1}")
    with pytest.raises(ConfigError, match="arm 'nobody'"):
        arm_models(config.serving)
    with pytest.raises(ConfigError, match="models:/<name>@<alias>"):
        make_config("serving.models=[models:/broken]")
    assert Path(make_config("serving.models=[/tmp/x/adapter]").serving.models[0].served_name()) == Path("adapter")


def test_export_merges_and_matches_base_plus_adapter(served, tmp_path) -> None:
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from configs.schema import ConfigError
    from tasks.export import export_merged

    _, config, _ = served
    out = tmp_path / "merged"
    result = export_merged(config, f"models:/{NAME}/1", out, dtype="float32", register=True)
    assert result.same_argmax and result.relative_diff < 1e-2, result
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files and "adapter_config.json" not in files
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template, "the chat template travels with the merged model"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    registry = MlflowClient(tracking_uri=config.registry.tracking_uri, registry_uri=config.registry.tracking_uri)
    version = registry.get_model_version(f"{NAME}-merged", result.registered.rsplit("/", 1)[1])
    assert version.tags["adapter_uri"] == f"models:/{NAME}/1"
    with pytest.raises(ConfigError, match="not empty"):
        export_merged(config, f"models:/{NAME}/1", out)


def test_serve_model_command_refuses_a_public_bind_without_a_token(make_config, tmp_path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO_ROOT

    config_file = tmp_path / "serving.yaml"
    config_file.write_text(yaml.safe_dump(make_config(f"serving.models=[models:/{CHAMPION}]").model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "QLORA_SERVING_TOKEN"} | {"PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "serve-model", "--config", str(config_file),
                           "--host", "0.0.0.0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "QLORA_SERVING_TOKEN" in proc.stderr and "0.0.0.0" in proc.stderr
