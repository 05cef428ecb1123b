"""Shared helpers of the benchmarks: statistics, the machine, memory probes, child processes, shapes.

Standard library only, so that `bench/gpu_bench.py` can use it on a machine without the project's
dependencies.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
MIB = 1024**2

# Llama-3.2-1B's shapes (tied embeddings, grouped-query attention): the "1B-class" model.
LLAMA_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 4096,
}
# A mid-size Llama (~69M parameters, embeddings 18% of them as in Llama-3.2-1B's 21%) whose bf16
# training step fits the CPU time budget.
LLAMA_MID: dict[str, Any] = {
    "vocab_size": 16000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "tie_word_embeddings": True,
    "max_position_embeddings": 1024,
}
# The "representative step" of benchmark 1b: 8 layers x 512 hidden on the demo tokenizer (vocabulary
# 704), every linear dimension a multiple of 64; its training step takes well over 0.3 s on this CPU, so
# the Trainer's fixed cost per step no longer dominates the ratio the way it does on the 1M demo model.
LLAMA_STEP: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}
# For --quick and dry runs: the same code paths in a fraction of a second.
LLAMA_TINY: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "max_position_embeddings": 256,
}
SHAPES: dict[str, dict[str, Any]] = {"llama-1b": LLAMA_1B, "llama-mid": LLAMA_MID, "llama-tiny": LLAMA_TINY,
                                     "llama-step": LLAMA_STEP}


def summarize(values: list[float]) -> dict[str, Any]:
    """Median and range of repeated measurements; `runs` keeps every value in measurement order."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """Ratio of each side-by-side pair (repeat i of A over repeat i of B), summarized.

    Pairs were measured back to back, so a load spike from a neighbour hits both sides of a pair
    more often than it hits one side of the median.
    """
    return summarize([a / b for a, b in zip(numerators, denominators, strict=True) if b])


def fmt_range(stats: dict[str, Any], digits: int = 2, unit: str = "") -> str:
    """`median (min–max)` as RESULTS.md prints it."""
    return f"{stats['median']:.{digits}f}{unit} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def read_proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes (VmRSS: now, VmHWM: peak since start/reset); 0 if absent."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    return read_proc_status("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> bool:
    """Hand memory freed by Python/torch back to the OS (glibc malloc_trim), so RSS shows live memory.

    Loading a quantized model frees a lot (the bf16 copies of quantized weights); glibc keeps those
    pages, and without a trim the RSS would measure the allocator's leftovers rather than the step.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since start or the last reset; falls back to getrusage (never reset) off Linux."""
    return read_proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(module: str, args: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m module args` in a fresh interpreter and parse the JSON it prints on its last line.

    A fresh process gives a clean peak-RSS/peak-VRAM mark and no state shared with other benchmarks.
    """
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), merged.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=merged, capture_output=True, text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"`python -m {module} {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on; load average says how busy the machine was."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _lscpu_model(),
        "cpu_cores": os.cpu_count() or 1,
        "ram_gib": round(_ram_bytes() / GIB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1_5_15": load,
        "versions": {
            name: _version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "prefect",
                                              "mlflow")
        },
    }


def loadavg() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []
