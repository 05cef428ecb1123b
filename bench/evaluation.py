"""Benchmark 4: evaluation samples/s of batched generation against one prompt at a time.

Both sides call the pipeline's own `tasks.generation.generate` on the same rendered eval
prompts of the demo, with the demo base model loaded as evaluation loads it (NF4 on the CPU); only
`batch_size` differs. Greedy decoding, so the answers must be identical.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import paired_ratios, summarize
from bench.training import demo_config
from tasks.demo_assets import DemoAssets


def generation_benchmark(assets: DemoAssets, work: Path, rows: int, repeats: int) -> dict[str, Any]:
    from tasks.data import load_splits, render_prompt
    from tasks.generation import generate
    from tasks.gpu import check_gpu
    from tasks.modeling import load_base_model, load_tokenizer

    config = demo_config(assets, work / "generation", [])
    splits = load_splits(config.data)
    _, plan = check_gpu(config)
    tokenizer = load_tokenizer(config)
    model = load_base_model(config, plan)
    prompts = [render_prompt(tokenizer, e.prompt_messages) for e in splits.eval[:rows]]
    batch_size, max_new = config.evaluation.batch_size, config.evaluation.max_new_tokens
    generate(model, tokenizer, prompts[:2], max_new, batch_size)  # warm-up (first-call allocations)
    speed: dict[int, list[float]] = {batch_size: [], 1: []}
    outputs: dict[int, list[str]] = {}
    for repeat in range(repeats):
        for size in ((batch_size, 1) if repeat % 2 == 0 else (1, batch_size)):
            started = time.perf_counter()
            outputs[size] = generate(model, tokenizer, prompts, max_new, size)
            speed[size].append(len(prompts) / (time.perf_counter() - started))
            print(f"  [4] repeat {repeat + 1}/{repeats} batch_size={size}: {speed[size][-1]:.1f} samples/s", flush=True)
    equal = [a == b for a, b in zip(outputs[batch_size], outputs[1], strict=True)]
    mismatch = next((i for i, same in enumerate(equal) if not same), None)
    return {
        "setup": {"model": str(config.model.name_or_path), "rows": len(prompts), "batch_size": batch_size,
                  "max_new_tokens": max_new, "repeats": repeats, "plan": plan.summary()},
        "batched_samples_per_s": summarize(speed[batch_size]),
        "single_samples_per_s": summarize(speed[1]),
        "ratio": paired_ratios(speed[batch_size], speed[1]),
        "outputs_equal_share": sum(equal) / len(equal),
        "first_mismatch": None if mismatch is None else {
            "prompt": prompts[mismatch], "batched": outputs[batch_size][mismatch], "single": outputs[1][mismatch]},
        "example_output": outputs[1][0] if outputs[1] else "",
        "target": 8.0,
    }
