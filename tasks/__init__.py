"""The pipeline's stages and the concepts they share (README "Architecture")."""

import logging

# On a CPU with AVX512-BF16, importing bitsandbytes logs a warning that it could not fetch an optional
# kernel from the hub ("Failed to load CPU gemm_4bit_forward from kernels-community"). The pipeline turns
# that CPU path off (tasks.modeling.pin_cpu_4bit_path) and downloads nothing at run time, so the line
# reads like a failure and is none. Set before any stage module can import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
