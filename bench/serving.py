"""Serving benchmarks (issue 16), not a timed test: `python -m bench.serving [--quick]`.

1. **Load.** K concurrent clients for T seconds against `qlora serve-model` with the champion alias
   moved half way (the server must switch with zero errors), and the same load against MLflow's own
   serving of the same version (`mlflow models serve`, which serves one fixed version and cannot
   switch). Reported: requests, errors, p50/p95 latency, tokens/s.
2. **Memory.** N adapters on one base in one server against N one-adapter servers (the N separate
   processes one would need without multi-adapter serving): resident memory after /ready.

It works on a *copy* of the registry's sqlite database (default: the project's `mlflow/mlflow.db`,
filled by `make demo`), so moving the alias never touches the real store; the versions' artifacts are
read where they are. Writes `bench/serving_results.json` and `bench/SERVING.md` (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

PROMPT = "Rewrite this in Zorbish.\n\nthe red cat runs"
TOKEN = "bench-serving-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, MiB (uvicorn and mlflow start worker children)."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace")[-3000:] if process.stderr else ""
            raise RuntimeError(f"server exited with {process.returncode}: {error}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout_s} s")


def start_qlora(db: Path, models: list[str], port: int, env: dict[str, str], batch: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "serve-model", "--port", str(port),
            "--set", f"registry.tracking_uri=sqlite:///{db}", "--set", f"serving.models={json.dumps(models)}",
            "--set", "serving.watch_interval_s=1", "--set", f"serving.max_batch_size={batch}",
            "--set", "serving.max_wait_ms=5", "--set", "serving.summary_interval_s=0", "--set", "serving.ab={}",
            "--set", f"training.output_dir={db.parent / 'out'}"]
    return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def start_mlflow(db: Path, uri: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-p", str(port),
            "-h", "127.0.0.1"]
    return subprocess.Popen(args, cwd=REPO_ROOT, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def load(send: Any, clients: int, seconds: float, halfway: Any = None) -> dict[str, Any]:
    """K threads sending for T seconds; `halfway()` runs once in the middle. Latencies in seconds."""
    latencies: list[float] = []
    tokens, errors, versions = [0], [0], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                n, version = send()
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.monotonic() - started)
                tokens[0] += n
                versions.append(version)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    if halfway is not None:
        time.sleep(seconds / 2)
        halfway()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    return {"requests": len(latencies), "errors": errors[0], "tokens_per_s": tokens[0] / seconds,
            "requests_per_s": len(latencies) / seconds,
            "p50_s": statistics.median(ordered) if ordered else None,
            "p95_s": ordered[int(0.95 * (len(ordered) - 1))] if ordered else None,
            "versions_seen": sorted(set(v for v in versions if v))}


def bench_load(db: Path, name: str, versions: list[str], env: dict[str, str], clients: int, seconds: float,
               max_tokens: int, adapter: Path) -> dict[str, Any]:
    import httpx
    from mlflow import MlflowClient

    registry = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    registry.set_registered_model_alias(name, "champion", versions[0])
    out: dict[str, Any] = {}

    port = free_port()
    server = start_qlora(db, [f"models:/{name}@champion"], port, env, batch=clients)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", server)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=httpx.Limits(
            max_connections=clients))

        def send() -> tuple[int, str]:  # chat: rendered with the chat template, as the pyfunc model does
            response = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                "model": f"{name}@champion"})
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"], response.headers["x-qlora-model-version"]

        send()  # warm-up
        out["qlora"] = load(send, clients, seconds,
                            halfway=lambda: registry.set_registered_model_alias(name, "champion", versions[-1]))
    finally:
        server.terminate()
        server.wait(60)
    registry.set_registered_model_alias(name, "champion", versions[0])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    port = free_port()
    server = start_mlflow(db, f"models:/{name}/{versions[0]}", port, env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping", server)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

        def send_mlflow() -> tuple[int, str]:
            response = http.post("/invocations", json={"inputs": [PROMPT], "params": {"max_new_tokens": max_tokens}})
            response.raise_for_status()
            (text,) = response.json()["predictions"]  # text only: its tokens counted with the adapter's tokenizer
            return len(tokenizer(text, add_special_tokens=False)["input_ids"]), ""

        send_mlflow()
        out["mlflow"] = load(send_mlflow, clients, seconds)
    finally:
        server.terminate()
        server.wait(60)
    out["throughput_ratio"] = out["qlora"]["requests_per_s"] / max(out["mlflow"]["requests_per_s"], 1e-9)
    return out


def bench_memory(db: Path, adapter: Path, n: int, env: dict[str, str]) -> dict[str, Any]:
    copies = []
    for i in range(n):
        folder = db.parent / f"adapter-{i}"
        shutil.copytree(adapter, folder)
        copies.append(str(folder))
    measured = {}
    for label, models in (("one", copies[:1]), ("many", copies)):
        port = free_port()
        server = start_qlora(db, models, port, env, batch=8)
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready", server)
            measured[label] = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(60)
    separate = n * measured["one"]
    return {"adapters": n, "one_adapter_process_mib": measured["one"], "n_adapters_one_process_mib": measured["many"],
            "n_separate_processes_mib": separate, "ratio": measured["many"] / separate,
            "target_ratio": 1 / n + 0.10}


def markdown(results: dict[str, Any]) -> str:
    load_, memory = results["load"], results["memory"]
    rows = []
    for label in ("qlora", "mlflow"):
        r = load_[label]
        rows.append(f"| {label} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
                    f"| {r['tokens_per_s']:.1f} "
                    f"| {r['p50_s']:.3f} | {r['p95_s']:.3f} | {', '.join(r['versions_seen']) or '-'} |")
    return "\n".join([
        "# Serving benchmarks", "",
        f"- date: {results['date']}", f"- command: `{results['command']}`",
        f"- load average at start {results['load_before']}, at end {results['load_after']}", "",
        "> Measured on a shared 2-core CPU machine while other work ran: absolute figures are noisy; the two "
        "servers were measured one after the other under the same client load.", "",
        f"## Load: {results['clients']} clients, {results['seconds']} s, {results['max_tokens']} tokens per answer, "
        "champion alias moved half way (qlora only)", "",
        "| server | requests | errors | requests/s | tokens/s | p50 s | p95 s | versions answered |",
        "|---|---:|---:|---:|---:|---:|---:|---|", *rows, "",
        f"Throughput qlora ÷ mlflow models serve: **{load_['throughput_ratio']:.2f}x** (target ≥ 4x at 8 clients, "
        f"p95 no worse: {'yes' if load_['qlora']['p95_s'] <= load_['mlflow']['p95_s'] else 'no'}).", "",
        f"## Memory: {memory['adapters']} adapters", "",
        "| setup | resident MiB |", "|---|---:|",
        f"| one server, one adapter | {memory['one_adapter_process_mib']:.0f} |",
        f"| one server, {memory['adapters']} adapters | {memory['n_adapters_one_process_mib']:.0f} |",
        f"| {memory['adapters']} one-adapter servers (sum) | {memory['n_separate_processes_mib']:.0f} |", "",
        f"Ratio {memory['ratio']:.3f} (target ≤ 1/N + 10% = {memory['target_ratio']:.3f}: "
        f"{'PASS' if memory['ratio'] <= memory['target_ratio'] else 'MISS'}). On the demo's ~1M-parameter base "
        "the process memory is mostly the Python runtime and libraries, which separate processes also pay N times.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=REPO_ROOT / "mlflow" / "mlflow.db", help="registry sqlite db")
    parser.add_argument("--name", default="demo-qlora-adapter")
    parser.add_argument("--adapter", type=Path, default=REPO_ROOT / "outputs" / "demo" / "adapter")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 clients, 10 s, 2 adapters")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.adapters = 2, 10.0, 2
    from mlflow import MlflowClient

    # mlflow models serve execs `uvicorn` from PATH: the interpreter's own bin folder goes first
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-serving-") as tmp:
        db = Path(tmp) / "mlflow.db"
        shutil.copyfile(args.db, db)
        found = MlflowClient(tracking_uri=f"sqlite:///{db}").search_model_versions(f"name='{args.name}'")
        versions = sorted((str(v.version) for v in found), key=int)
        if len(versions) < 2:
            raise SystemExit(f"{args.name} needs two registered versions in {args.db} (run `make demo` twice)")
        results: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.serving", *sys.argv[1:]]), "load_before": os.getloadavg(),
            "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens}
        results["load"] = bench_load(db, args.name, [versions[0], versions[-1]], env, args.clients, args.seconds,
                                     args.max_tokens, args.adapter)
        results["memory"] = bench_memory(db, args.adapter, args.adapters, env)
        results["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_results.json").write_text(json.dumps(results, indent=2))
    (args.out / "SERVING.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
