"""Run the CPU benchmarks and write RESULTS.md + results.json.

    python -m bench.run                  # everything, ~10 min on 2 cores (make bench)
    python -m bench.run --quick --out D  # the same code paths on tiny sizes, for the test
    python -m bench.run --sections 2,4   # a subset

Each benchmark runs in this process (side-by-side pairs) or in child processes (memory, flow). A
benchmark that fails is recorded with its error and the others still run; the exit code is 1 then.
The GPU part is `bash bench/gpu.sh` on a GPU machine; its gpu_results.json, when present in the
output folder, becomes section 6.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, loadavg, machine_info

DEFAULT_OUT = REPO_ROOT / "bench"
SECTIONS = ("training", "training_step", "compile", "packing", "memory", "evaluation", "orchestration", "warm_start")


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark runs; FULL for `make bench`, QUICK for the test."""

    train_steps: int
    train_warmup: int
    train_repeats: int
    step_model: str  # benchmark 1b's model shape (bench.common.SHAPES)
    step_train_steps: int
    step_train_warmup: int
    step_train_repeats: int
    compile_steps: int | None  # None: skip (compiling takes minutes even for a tiny model)
    compile_warmup: int
    compile_repeats: int
    warm_start: tuple[int, int, int, int, int] | None  # champion steps, steps, score every, eval rows, tonight's rows
    pack_rows: int
    pack_max_words: int
    pack_steps: int
    pack_warmup: int
    pack_repeats: int
    pack_eval_rows: int
    weights_shape: str
    step_shape: str
    step_batch: int
    step_seq: int
    step_repeats: int
    eval_rows: int
    eval_repeats: int
    flow_overrides: tuple[str, ...] | None  # None: skip the flow


FULL = Sizes(train_steps=60, train_warmup=10, train_repeats=3,
             step_model="llama-step", step_train_steps=16, step_train_warmup=4, step_train_repeats=3,
             compile_steps=40, compile_warmup=20, compile_repeats=1, warm_start=(400, 200, 25, 64, 1000),
             pack_rows=1200, pack_max_words=85, pack_steps=20, pack_warmup=4, pack_repeats=3, pack_eval_rows=32,
             weights_shape="llama-1b", step_shape="llama-mid", step_batch=1, step_seq=64, step_repeats=2,
             eval_rows=64, eval_repeats=3, flow_overrides=())
QUICK = Sizes(train_steps=3, train_warmup=1, train_repeats=1,
              step_model="llama-tiny", step_train_steps=3, step_train_warmup=1, step_train_repeats=1,
              compile_steps=None, compile_warmup=1, compile_repeats=1, warm_start=(3, 2, 1, 4, 1000),
              pack_rows=200, pack_max_words=20, pack_steps=3, pack_warmup=1, pack_repeats=1, pack_eval_rows=8,
              weights_shape="llama-tiny", step_shape="llama-tiny", step_batch=1, step_seq=16, step_repeats=1,
              eval_rows=4, eval_repeats=1, flow_overrides=None)


def run_sections(sections: list[str], sizes: Sizes, work: Path, threads: int) -> dict[str, Any]:
    from bench.common import SHAPES
    from bench.evaluation import generation_benchmark
    from bench.memory import memory_benchmark
    from bench.orchestration import orchestration_benchmark
    from bench.training import compile_benchmark, packing_benchmark, representative_model, training_throughput
    from bench.warm_start import warm_start_benchmark
    from tasks.demo_assets import build_demo_assets
    from tasks.modeling import quiet_libraries

    quiet_libraries()
    assets = build_demo_assets(REPO_ROOT / ".cache" / "demo")
    s = sizes
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "training": lambda: training_throughput(assets, work / "training", s.train_steps, s.train_warmup,
                                                s.train_repeats),
        "training_step": lambda: training_throughput(
            assets, work / "training-step", s.step_train_steps, s.step_train_warmup, s.step_train_repeats,
            model_dir=representative_model(assets, work / "step-model", SHAPES[s.step_model])),
        "compile": lambda: compile_benchmark(assets, work / "compile", s.compile_steps or 0, s.compile_warmup,
                                             s.compile_repeats),
        "packing": lambda: packing_benchmark(assets, work / "packing", s.pack_steps, s.pack_warmup, s.pack_repeats,
                                             s.pack_rows, s.pack_max_words, s.pack_eval_rows),
        "memory": lambda: memory_benchmark(work / "memory", s.weights_shape, s.step_shape, s.step_batch, s.step_seq,
                                           1, s.step_repeats, threads),
        "evaluation": lambda: generation_benchmark(assets, work / "evaluation", s.eval_rows, s.eval_repeats),
        "warm_start": lambda: warm_start_benchmark(assets, work / "warm_start", *(s.warm_start or ()),
                                                   new_weight=3.0, old_weight=1.0),
        "orchestration": lambda: orchestration_benchmark(assets.data_path, assets.model_dir, work / "orchestration",
                                                         list(s.flow_overrides or ()), threads),
    }
    results: dict[str, Any] = {}
    for name in SECTIONS:
        if name not in sections:
            results[name] = {"skipped": "not selected (--sections)"}
            continue
        if name == "compile" and s.compile_steps is None:
            results[name] = {"skipped": "compiling takes minutes even for a tiny model; it runs in the full "
                                        "configuration (not --quick)"}
            continue
        if name == "orchestration" and s.flow_overrides is None:
            results[name] = {"skipped": "the demo flow takes minutes; it runs in the full configuration (not --quick)"}
            continue
        print(f"[{name}] starting (load average {loadavg()})", flush=True)
        started = time.perf_counter()
        measured = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "loadavg_start": loadavg()}
        try:
            results[name] = jobs[name]()
        except Exception as exc:  # keep the other benchmarks; the error goes into the report
            traceback.print_exc()
            results[name] = {"error": f"{exc.__class__.__name__}: {str(exc)[-800:]}"}
        results[name]["section_wall_s"] = time.perf_counter() - started
        results[name]["measured"] = {**measured, "loadavg_end": loadavg()}
        print(f"[{name}] done in {results[name]['section_wall_s']:.0f} s", flush=True)
    return results


def write(out: Path, results: dict[str, Any]) -> None:
    """Add the GPU section (OUT/gpu_results.json, when a GPU run left one) and the summary; write both files."""
    from bench.report import render, summary_rows

    gpu_file = out / "gpu_results.json"
    date = str(results.get("machine", {}).get("date", "?"))[:10]
    where = ("the machine that ran it had no CUDA device" if not results.get("cuda_available")
             else "the GPU benchmark was not run")
    results["gpu"] = json.loads(gpu_file.read_text()) if gpu_file.exists() else {
        "skipped": f"no GPU figures in this run ({date}): {where}, and there is no gpu_results.json beside "
                   "this file. On a GPU machine run `bash bench/gpu.sh --out bench`, then "
                   "`python -m bench.run --report-only` adds bench/gpu_results.json to this file"}
    results["summary"] = summary_rows(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "RESULTS.md").write_text(render(results))
    print(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'}")
    for row in results["summary"]:
        print(f"  {row['verdict']:4}  {row['figure']}: {row['value']} (target {row['target']})")


def keep_previous(out: Path, sections: list[str]) -> dict[str, Any]:
    """The sections of OUT/results.json this run does not measure (`--sections` subset), kept as they were
    measured: each carries its own date and load (`measured`), which RESULTS.md prints under its heading."""
    previous = out / "results.json"
    if not previous.exists():
        return {}
    old = json.loads(previous.read_text())
    date = old.get("machine", {}).get("date")
    kept = {}
    for name in SECTIONS:
        section = old.get(name)
        if name in sections or not isinstance(section, dict) or "skipped" in section:
            continue
        kept[name] = {**section, "measured": section.get("measured") or {"date": date}}
    return kept


def rerender(out: Path) -> int:
    results_file = out / "results.json"
    if not results_file.exists():
        print(f"{results_file} does not exist: run `python -m bench.run` first", file=sys.stderr)
        return 2
    write(out, json.loads(results_file.read_text()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, no flow: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for RESULTS.md and results.json")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: a busy neighbour slows both sides of a pair alike instead of "
                             "stalling OpenMP barriers)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: re-render RESULTS.md from OUT/results.json (e.g. after a GPU run "
                             "left OUT/gpu_results.json)")
    args = parser.parse_args(argv)
    if args.report_only:
        return rerender(args.out)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as scratch:
        work = args.work or Path(scratch)
        results = run_sections(sections, QUICK if args.quick else FULL, work, args.threads)
    results = {
        "machine": machine,
        "command": " ".join(["python -m bench.run", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "threads": args.threads,
        "cuda_available": torch.cuda.is_available(),
        "wall_s": time.perf_counter() - started,
        "loadavg_end": loadavg(),
        **results,
    }
    for name, section in (keep_previous(args.out, sections) if not args.quick else {}).items():
        results[name] = section  # not measured now: the earlier figures, with their own date
    write(args.out, results)
    failed = [name for name in SECTIONS if "error" in results.get(name, {})]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
