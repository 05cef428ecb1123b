"""What the machine offers beyond the CUDA devices: a working bitsandbytes 4-bit layer, and the CPU
features that change bitsandbytes' CPU path (AVX512-BF16, AMX).

Plain functions over the machine (or a /proc/cpuinfo text, so tests can force any CPU); the device
report and the plan in `tasks.gpu` use them, and `tasks.pyfunc_model` asks `probe_bitsandbytes`
whether a registered adapter can be loaded 4-bit where it is served.
"""

from __future__ import annotations

from pathlib import Path

# CPU flags (Linux /proc/cpuinfo names) that change how bitsandbytes computes 4-bit layers on the CPU:
# with AVX512-BF16 it switches eval-mode layers to a packed bf16 kernel; AMX speeds bf16 matmuls.
CPU_FEATURES = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "amx_tile": "AMX-TILE"}


def probe_bitsandbytes(device: str) -> tuple[str | None, bool, str | None]:
    """Version of bitsandbytes and whether a real NF4 layer quantizes and runs on `device`."""
    import logging

    # On an AVX512-BF16 CPU, importing bitsandbytes warns that an optional fused kernel for its packed
    # CPU path is missing; the pipeline never uses that path (tasks.modeling.pin_cpu_4bit_path).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as exc:  # ImportError, or a broken native library raising at import
        return None, False, f"{exc.__class__.__name__}: {exc}"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to(device)
        out = layer(torch.ones(1, 64, device=device))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output from a 4-bit layer")
        return bnb.__version__, True, None
    except Exception as exc:
        return getattr(bnb, "__version__", None), False, f"{exc.__class__.__name__}: {exc}"


def cpu_features_from_cpuinfo(cpuinfo: str) -> tuple[str, ...]:
    """The CPU_FEATURES flags listed in a /proc/cpuinfo text (its `flags` lines), in CPU_FEATURES order."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(flag for flag in CPU_FEATURES if flag in flags)


def detect_cpu_features(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> tuple[tuple[str, ...], str, bool]:
    """(CPU_FEATURES flags present, torch's CPU capability, whether bitsandbytes detects AVX512-BF16).

    /proc/cpuinfo exists on Linux only; elsewhere the flags come from bitsandbytes' own check, which
    is what decides its behaviour anyway.
    """
    import torch

    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        capability = ""
    try:
        from bitsandbytes.functional import has_avx512bf16

        bnb_packed = bool(has_avx512bf16())
    except Exception:
        bnb_packed = False
    try:
        features = cpu_features_from_cpuinfo(cpuinfo_path.read_text())
    except OSError:
        features = ("avx512_bf16",) if bnb_packed else ()
    return features, capability, bnb_packed
