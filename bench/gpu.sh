#!/usr/bin/env bash
# Benchmark 6 on one GPU: QLoRA vs bf16 LoRA on a random-init 1B-class Llama (tokens/s, peak VRAM, MFU).
#
#   bash bench/gpu.sh --out bench        # on the GPU machine; writes bench/gpu_results.json (< 8 min)
#   bash bench/gpu.sh --dry-run          # tiny model on the CPU: checks the script end to end
#
# Needs torch, transformers, peft, accelerate, and bitsandbytes for the QLoRA half. Where bitsandbytes
# is missing and there is no network (the lent H200), carry its manylinux wheel in .gpu-wheels/,
# downloaded on a machine with network from the repo root:
#   pip download bitsandbytes==0.50.2 --no-deps --only-binary :all: --platform manylinux_2_24_x86_64 \
#       --python-version 3.12 --implementation cp -d .gpu-wheels
# The wheel holds the CUDA 11.8-13.2 builds of the library. Afterwards run `python -m bench.run` here
# (or copy gpu_results.json into bench/) so RESULTS.md gets the GPU section.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c "import bitsandbytes" >/dev/null 2>&1; then
  shopt -s nullglob
  wheels=(.gpu-wheels/bitsandbytes-*.whl)
  if ((${#wheels[@]})); then
    site="${TMPDIR:-/tmp}/bench-gpu-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$site" "${wheels[-1]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "bench/gpu.sh: bitsandbytes is not importable and .gpu-wheels/ has no wheel: QLoRA will fail" >&2
  fi
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Multi-GPU case, only where several GPUs are visible: DDP and FSDP-QLoRA ranks (torchrun, nccl) of the
# pipeline's own train stage on the demo model against one process at the same global batch
# (bench/distributed.py). Skipped on one GPU; skip it with BENCH_MULTI_GPU=0.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [[ "${BENCH_MULTI_GPU:-1}" != 0 && "${gpus:-0}" -gt 1 && " $* " != *" --dry-run "* ]]; then
  out_dir=bench
  for ((i = 1; i <= $#; i++)); do [[ "${!i}" == --out ]] && { j=$((i + 1)); out_dir="${!j}"; }; done
  for strategy in ddp fsdp; do
    timeout "${BENCH_MULTI_GPU_TIMEOUT:-240}" "$PYTHON" -m bench.distributed --strategy "$strategy" --ranks "$gpus" \
      --steps 100 --batch $((8 * gpus)) --out "$out_dir/multi_gpu_${strategy}.json" \
      || echo "bench/gpu.sh: multi-GPU $strategy case failed (see above)" >&2
  done
fi

# Hard stop well inside the 8-minute budget; the script itself takes about 2-3 minutes on an H200.
exec timeout "${BENCH_GPU_TIMEOUT:-450}" "$PYTHON" -m bench.gpu_bench "$@"
