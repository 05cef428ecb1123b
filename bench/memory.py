"""Benchmark 3: memory of QLoRA against bf16.

(a) Bytes of the linear weights of a 1B-class Llama in NF4 + double quantization against bf16. The
    model is built on the meta device and each linear is materialised with random weights and
    quantized with bitsandbytes one at a time, so the whole 1B model never sits in RAM in bf16.
(b) Peak RSS of a training step (forward, backward, AdamW) of the pipeline's QLoRA model against its
    bf16 LoRA model, each built by `tasks.modeling.load_base_model` + `tasks.train.build_lora_model`
    from the same saved random-init mid-size Llama, each in its own process so the peak is clean. A
    third mode, `qlora_peft_upcast`, swaps the pipeline's `prepare_for_kbit_training` for peft's plain
    one (every non-4-bit parameter upcast to fp32), as before the fix: the evidence of what it saves.

The children are run as `python -m bench.memory weights|step ...` and print one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import patch

from bench.common import (
    SHAPES,
    paired_ratios,
    peak_rss_bytes,
    release_freed_memory,
    reset_peak_rss,
    rss_bytes,
    run_child,
    summarize,
)

QLORA_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax


def tensor_bytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


def quant_state_bytes(state: Any) -> int:
    """Bytes of a bitsandbytes QuantState: absmax (8-bit when nested), its own fp32 absmax, codebooks, offset."""
    total = tensor_bytes(state.absmax) + tensor_bytes(state.code)
    if state.nested:
        total += tensor_bytes(state.state2.absmax) + tensor_bytes(state.state2.code) + tensor_bytes(state.offset)
    return total


def quantized_weight_bytes(shape_name: str) -> dict[str, Any]:
    """Child: build `shape_name` layer by layer in NF4 + double quant; count bytes against bf16."""
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape_name]))
    model.tie_weights()  # not done on the meta device by the constructor
    total_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(0)
    params = quantized = codes = 0
    max_error = 0.0
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head]
    for index, (name, module) in enumerate(linears):
        weight = torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16)
        weight.normal_(0.0, 0.02, generator=generator)
        packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                   quant_storage=torch.uint8).to("cpu")  # .to() quantizes
        if index == 0:  # the layer is real: dequantizing gives the weight back up to NF4's error
            restored = bnb.functional.dequantize_4bit(packed.data, packed.quant_state).to(torch.float32)
            max_error = float((restored - weight.float()).abs().max() / weight.float().abs().max())
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = packed
        model.set_submodule(name, layer)
        params += weight.numel()
        codes += tensor_bytes(packed)
        quantized += tensor_bytes(packed) + quant_state_bytes(packed.quant_state)
        del weight, packed
    bf16 = 2 * params
    return {
        "shape": shape_name,
        "linear_layers": len(linears),
        "linear_params": params,
        "total_params": total_params,
        "bf16_bytes": bf16,
        "nf4_dq_bytes": quantized,
        "nf4_code_bytes": codes,
        "bits_per_param": 8 * quantized / params,
        "ratio_to_bf16": quantized / bf16,
        "first_layer_max_rel_error": max_error,
        "build_s": time.perf_counter() - started,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def save_random_model(shape_name: str, out_dir: Path) -> Path:
    """A random-init Llama of `shape_name` saved in bf16, the way a downloaded base model would be."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**SHAPES[shape_name]), dtype=torch.bfloat16)
    model.save_pretrained(str(out_dir))
    del model
    gc.collect()
    return out_dir


# glibc keeps freed memory and so reports its own high-water mark, not the program's: between two runs
# of the same step that varied by 50 MiB. Large blocks mmap'd (and so returned on free), trimming at
# once and two arenas make RSS follow live memory; repeated runs then agree within ~1 MiB.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}
STEP_MODES = ("qlora", "lora_bf16", "qlora_peft_upcast")


def peft_full_upcast(model: Any, plan: Any) -> Any:
    """Stand-in for `tasks.train.prepare_for_kbit_training` in the `qlora_peft_upcast` mode: peft's
    `prepare_model_for_kbit_training` alone, which upcasts every parameter that is not 4-bit to fp32
    (embeddings and lm_head included). What the pipeline did before the fix; kept as the evidence."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def training_step_memory(model_dir: str, mode: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Child: the pipeline's QLoRA or bf16 LoRA model (or QLoRA with peft's full fp32 upcast, as before the
    fix in `tasks.train.prepare_for_kbit_training`); RSS after loading and peak RSS over `steps` steps."""
    import bitsandbytes  # noqa: F401  both modes pay for the same imports before the baseline is read
    import peft  # noqa: F401
    import torch

    from configs.schema import PipelineConfig
    from tasks.gpu import TrainingPlan
    from tasks.modeling import load_base_model
    from tasks.train import build_lora_model

    rss_imports = rss_bytes()
    qlora = mode.startswith("qlora")
    config = PipelineConfig.model_validate({
        "data": {"path": "unused.jsonl"},
        "model": {"name_or_path": model_dir},
        "quantization": {"load_in_4bit": qlora, "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "dropout": 0.0, "target_modules": "all-linear"},
    })
    plan = TrainingPlan(device="cpu", device_name="cpu", load_in_4bit=qlora, quant_type="nf4", double_quant=True,
                        compute_dtype="bfloat16", per_device_batch_size=batch, gradient_accumulation_steps=1,
                        gradient_checkpointing=False, optim="adamw_torch", estimated_memory_bytes=0,
                        available_memory_bytes=0)
    started = time.perf_counter()
    if mode == "qlora_peft_upcast":
        with patch("tasks.train.prepare_for_kbit_training", peft_full_upcast):
            model = build_lora_model(load_base_model(config, plan), config, plan)
    else:
        model = build_lora_model(load_base_model(config, plan), config, plan)
    load_s = time.perf_counter() - started
    trimmed = release_freed_memory()
    rss_loaded = rss_bytes()
    weight_bytes = sum(tensor_bytes(p) for p in model.parameters())
    weight_bytes += sum(quant_state_bytes(p.quant_state) for p in model.parameters()
                        if getattr(p, "quant_state", None) is not None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()
    peak_reset = reset_peak_rss()
    step_times = []
    for _ in range(steps):
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs with bf16=True
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - tick)
    peak = peak_rss_bytes()
    return {
        "mode": mode, "batch": batch, "seq": seq, "steps": steps, "load_s": load_s, "step_s": step_times,
        "loss": loss.item(), "rss_after_imports": rss_imports, "rss_after_load": rss_loaded,
        "peak_rss_steps": peak, "peak_reset_worked": peak_reset, "malloc_trim": trimmed, "weight_bytes": weight_bytes,
        "trainable_params": sum(p.numel() for p in trainable),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }


def memory_benchmark(work: Path, weights_shape: str, step_shape: str, batch: int, seq: int, steps: int,
                     repeats: int, threads: int) -> dict[str, Any]:
    env = {"OMP_NUM_THREADS": str(threads), **MALLOC_ENV}
    model_dir = save_random_model(step_shape, work / f"{step_shape}-random")
    # Children run concurrently: none of this benchmark's figures is a time, and each process has
    # its own peak-RSS mark.
    jobs: list[tuple[str, list[str]]] = [("weights", ["weights", "--shape", weights_shape])]
    for repeat in range(repeats):
        for mode in (STEP_MODES if repeat % 2 == 0 else tuple(reversed(STEP_MODES))):
            jobs.append((mode, ["step", "--model", str(model_dir), "--mode", mode, "--batch", str(batch),
                                "--seq", str(seq), "--steps", str(steps)]))
    print(f"  [3] {len(jobs)} processes: {weights_shape} quantized layer by layer, {step_shape} training steps",
          flush=True)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        done = list(pool.map(lambda job: (job[0], run_child("bench.memory", job[1], env=env)), jobs))
    weights = next(result for name, result in done if name == "weights")
    runs: dict[str, list[dict[str, Any]]] = {mode: [r for name, r in done if name == mode] for mode in STEP_MODES}
    for mode in STEP_MODES:
        print(f"  [3] {mode}: peak RSS {[round(r['peak_rss_steps'] / 2**20) for r in runs[mode]]} MiB", flush=True)

    def peaks(mode: str, above_imports: bool = False) -> list[float]:
        return [float(r["peak_rss_steps"] - (r["rss_after_imports"] if above_imports else 0)) for r in runs[mode]]

    return {
        "weights": weights,
        "qlora_paper_bits_per_param": QLORA_BITS_PER_PARAM,
        "target": 0.27,
        "step": {
            "shape": step_shape, "batch": batch, "seq": seq, "steps": steps, "repeats": repeats, "runs": runs,
            "peak_rss": {mode: summarize(peaks(mode)) for mode in STEP_MODES},
            "peak_rss_above_imports": {mode: summarize(peaks(mode, True)) for mode in STEP_MODES},
            "peak_rss_ratio": paired_ratios(peaks("qlora"), peaks("lora_bf16")),
            "peak_above_imports_ratio": paired_ratios(peaks("qlora", True), peaks("lora_bf16", True)),
            "peft_upcast_peak_above_imports_ratio": paired_ratios(peaks("qlora_peft_upcast", True),
                                                                  peaks("lora_bf16", True)),
            "peft_upcast_peak_rss_ratio": paired_ratios(peaks("qlora_peft_upcast"), peaks("lora_bf16")),
            "weight_bytes": {mode: runs[mode][0]["weight_bytes"] for mode in STEP_MODES},
            "weight_bytes_ratio": runs["qlora"][0]["weight_bytes"] / runs["lora_bf16"][0]["weight_bytes"],
            "peft_upcast_weight_bytes_ratio": runs["qlora_peft_upcast"][0]["weight_bytes"]
            / runs["lora_bf16"][0]["weight_bytes"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    weights = sub.add_parser("weights")
    weights.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    step = sub.add_parser("step")
    step.add_argument("--model", required=True)
    step.add_argument("--mode", choices=STEP_MODES, required=True)
    step.add_argument("--batch", type=int, default=1)
    step.add_argument("--seq", type=int, default=64)
    step.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from tasks.modeling import quiet_libraries

    quiet_libraries()
    if args.command == "weights":
        result = quantized_weight_bytes(args.shape)
    else:
        result = training_step_memory(args.model, args.mode, args.batch, args.seq, args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
