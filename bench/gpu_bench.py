"""Benchmark 6: QLoRA vs bf16 LoRA on one GPU with a random-init 1B-class Llama (Llama-3.2-1B shapes).

Tokens/s, peak VRAM and model FLOPs utilisation for each mode, each mode in its own process (clean
peak-VRAM mark). Self-contained on purpose: the GPU machine has torch, transformers, peft and
accelerate but not the project's other dependencies, so this file needs only those (plus
bitsandbytes for QLoRA, which `bench/gpu.sh` installs from a carried wheel) and `bench.common`
(standard library only). The model is prepared the way `tasks/modeling.py` + `tasks/train.py` do it:
NF4 + double quantization with bf16 compute and bf16 quant storage, `prepare_model_for_kbit_training`
followed by embeddings and lm_head back to bf16 (norms stay fp32), as `tasks.train.prepare_for_kbit_training`,
LoRA as in configs/llama-3.2-1b.yaml (preset "instruction": r=64, alpha=128, q/v/o/gate/up/down), bf16
autocast as the Trainer's bf16=True, no gradient checkpointing (the plan does not need it at this size).

FLOPs per token (stated in the output):
    4 * N_mm              forward 2*N_mm + activation gradients 2*N_mm; the base is frozen, so no
                          weight gradients (the 6*N rule counts 2*N_mm of them and is wrong here)
  + 6 * sum r*(in+out)    LoRA A and B: forward, activation gradient and weight gradient
  + 12 * L * s * h        attention scores and weighted values, forward 4*s*h and backward 8*s*h per
                          layer (PaLM's convention: full s, not halved for the causal mask)
where N_mm = parameters of every matmul a token goes through (the 7 linears of each layer and the
lm_head), L layers, h hidden size, s sequence length. MFU = tokens/s * FLOPs/token / 989 TFLOP/s
(H100/H200 SXM dense bf16 peak). 4-bit dequantization is not model FLOPs: it shows as lower MFU.

    python -m bench.gpu_bench [--out DIR]       # on the GPU (bash bench/gpu.sh does the set-up)
    python -m bench.gpu_bench --dry-run         # tiny model on the CPU: checks the script end to end
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import LLAMA_1B, LLAMA_TINY, REPO_ROOT, summarize

PEAK_BF16_FLOPS = 989e12
MODES = ("qlora", "lora_bf16")
LORA_R, LORA_ALPHA, LORA_DROPOUT = 64, 128, 0.05
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOPS_FORMULA = ("4*N_mm (forward 2N + activation-gradient 2N, no weight gradients for the frozen base; N_mm = "
                 "decoder linears + lm_head) + 6*sum(r*(in+out)) (LoRA fwd, act-grad, weight-grad) + "
                 "12*L*s*h (attention, PaLM convention, s not halved for causal); peak 989 TFLOP/s bf16 dense")


def linear_shapes(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one Llama decoder layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def flops_per_token(shape: dict[str, Any], seq: int, lora_r: int, targets: list[str]) -> dict[str, float]:
    layers, h = shape["num_hidden_layers"], shape["hidden_size"]
    linears = linear_shapes(shape)
    n_mm = layers * sum(i * o for i, o in linears.values()) + shape["vocab_size"] * h
    lora = layers * sum(lora_r * (i + o) for name, (i, o) in linears.items() if name in targets)
    parts = {"base_fwd_and_act_grad": 4.0 * n_mm, "lora": 6.0 * lora, "attention": 12.0 * layers * seq * h}
    return {**parts, "total": sum(parts.values()), "n_mm": float(n_mm)}


def save_random_model(shape: dict[str, Any], out_dir: Path, device: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(str(out_dir))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def run_mode(mode: str, model_dir: str, batch: int, seq: int, warmup: int, steps: int, windows: int,
             device: str) -> dict[str, Any]:
    """Child: load, then warm-up steps, then `windows` timed windows of `steps` steps each."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16
    device_map = {"": 0 if device == "cuda" else "cpu"}
    started = time.perf_counter()
    if mode == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=dtype,
                                                     device_map=device_map)
        loaded = {name: param.dtype for name, param in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for name, param in model.named_parameters():  # as tasks.train.prepare_for_kbit_training
            if "norm" not in name and param.dtype != loaded[name]:
                param.data = param.data.to(loaded[name])
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - started
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        after_load = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        after_load = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (batch, seq), generator=generator).to(device)
    model.train()

    def step() -> float:
        with torch.autocast(device_type=device, dtype=dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    sync()
    tokens_per_s = []
    for _ in range(windows):
        tick = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        tokens_per_s.append(batch * seq * steps / (time.perf_counter() - tick))
    return {
        "mode": mode, "load_s": load_s, "tokens_per_s": tokens_per_s, "loss": float(loss),
        "memory_after_load_bytes": int(after_load),
        "peak_vram_bytes": int(torch.cuda.max_memory_allocated()) if cuda else 0,
        "peak_vram_reserved_bytes": int(torch.cuda.max_memory_reserved()) if cuda else 0,
        "trainable_params": sum(p.numel() for p in trainable),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }


def environment(device: str) -> dict[str, Any]:
    import torch

    try:
        import bitsandbytes

        bnb_version: str | None = bitsandbytes.__version__
    except Exception as exc:  # not installed, or its native library failed to load
        bnb_version = f"unavailable: {exc.__class__.__name__}: {exc}"
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    return {"device": name, "torch": torch.__version__, "bitsandbytes": bnb_version,
            "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, a few steps")
    parser.add_argument("--out", type=Path, default=None, help="write gpu_results.json here")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=None, help="timed windows per mode (median, min-max)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dry = args.dry_run
    batch = args.batch or (2 if dry else 8)
    seq = args.seq or (32 if dry else 2048)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    steps = args.steps or (2 if dry else 10)
    windows = args.windows or (2 if dry else 3)

    if args.child:  # one mode in a fresh process
        result = run_mode(args.child, args.model, batch, seq, warmup, steps, windows, args.device)
        print(json.dumps(result))
        return 0

    import torch

    started = time.perf_counter()
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    shape = LLAMA_TINY if dry else LLAMA_1B
    flops = flops_per_token(shape, seq, LORA_R, LORA_TARGETS)
    result: dict[str, Any] = {
        **environment(device), "dry_run": dry, "shape": "llama-tiny" if dry else "llama-1b (Llama-3.2-1B shapes)",
        "batch": batch, "seq": seq, "warmup_steps": warmup, "steps_per_window": steps, "windows": windows,
        "lora_r": LORA_R, "lora_targets": LORA_TARGETS, "flops_formula": FLOPS_FORMULA,
        "flops_per_token": flops, "peak_flops": PEAK_BF16_FLOPS, "modes": {}, "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        model_dir = Path(scratch) / "model"
        save_random_model(shape, model_dir, device)
        result["save_s"] = time.perf_counter() - started
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        for mode in MODES:
            command = [sys.executable, "-m", "bench.gpu_bench", "--child", mode, "--model", str(model_dir),
                       "--device", device, "--batch", str(batch), "--seq", str(seq), "--warmup", str(warmup),
                       "--steps", str(steps), "--windows", str(windows)]
            proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                result["errors"][mode] = (proc.stderr or proc.stdout)[-2000:]
                print(f"{mode} failed:\n{result['errors'][mode]}", file=sys.stderr)
                continue
            run = json.loads(lines[-1])
            run["tokens_per_s"] = summarize(run["tokens_per_s"])
            run["mfu"] = summarize([t * flops["total"] / PEAK_BF16_FLOPS for t in run["tokens_per_s"]["runs"]])
            result["modes"][mode] = run
            print(f"{mode}: {run['tokens_per_s']['median']:.0f} tokens/s, peak VRAM "
                  f"{run['peak_vram_bytes'] / 2**30:.2f} GiB, MFU {run['mfu']['median']:.1%}", flush=True)
    modes = result["modes"]
    if len(modes) == 2:
        q, b = modes["qlora"], modes["lora_bf16"]
        result["ratios"] = {
            "tokens_per_s_qlora_over_bf16": statistics.median(q["tokens_per_s"]["runs"])
            / statistics.median(b["tokens_per_s"]["runs"]),
        }
        if b["peak_vram_bytes"]:
            result["ratios"]["peak_vram_qlora_over_bf16"] = q["peak_vram_bytes"] / b["peak_vram_bytes"]
    result["wall_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_results.json").write_text(text + "\n")
    print(text)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
