"""Where the time goes when a target is missed: torch.profiler over steady-state steps.

    python -m bench.profile training   # the project's Trainer step vs the hand-written step (benchmark 1)
    python -m bench.profile packing    # padded vs the pipeline's packing vs packing over a dense mask (benchmark 2)

Prints the top operators by self CPU time for each side, and the step time split into operators
that ran and Python/framework time around them. Single-threaded, like the benchmarks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import patch

from transformers import TrainerCallback

from bench.common import REPO_ROOT
from bench.training import PACKING_VARIANTS, demo_config, dense_mask_attention, write_mixed_length_data


class ProfileSteps(TrainerCallback):
    """Profiles Trainer steps [start, start + count): everything inside `training_step` and around it."""

    def __init__(self, start: int, count: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.start, self.count = start, count
        self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        self.wall = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.start:
            self.profiler.start()
            self.wall = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.start + self.count:
            self.wall = time.perf_counter() - self.wall
            self.profiler.stop()


def report(name: str, profiler: Any, wall: float, steps: int, rows: int = 12) -> None:
    events = profiler.key_averages()
    print(f"\n=== {name}: {wall / steps * 1000:.1f} ms/step over {steps} steps ===")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def profile_training(steps: int, start: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorWithFlattening

    from tasks.data import load_splits, tokenize_example
    from tasks.demo_assets import build_demo_assets
    from tasks.gpu import check_gpu
    from tasks.modeling import packing_attention
    from tasks.train import train

    assets = build_demo_assets(REPO_ROOT / ".cache" / "demo")
    with tempfile.TemporaryDirectory() as work:
        config = demo_config(assets, Path(work), [f"training.max_steps={start + steps + 1}"])
        splits = replace(load_splits(config.data), eval=[])
        _, plan = check_gpu(config)
        probe = ProfileSteps(start, steps)
        train(config, plan, splits, callbacks=[probe])
        report(f"project train() (Trainer, {plan.optim}, grad clipping, logging)", probe.profiler, probe.wall,
               steps)

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            config.model.name_or_path, dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32))
        if config.training.packing:  # the same attention as the project's run
            model.set_attn_implementation(packing_attention(plan))
        model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=0.0,
                                                 target_modules=config.lora.target_modules, task_type="CAUSAL_LM"))
        rows = [tokenize_example(tokenizer, e, config.data.max_seq_length) for e in splits.train]
        collate = DataCollatorWithFlattening()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batches = [collate(rows[i * 16:(i + 1) * 16]) for i in range(start + steps)]

        def step(batch: dict[str, Any]) -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.train()
        for batch in batches[:start]:
            step(batch)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            wall = time.perf_counter()
            for batch in batches[start:]:
                step(batch)
            wall = time.perf_counter() - wall
        report("hand-written loop (torch AdamW)", profiler, wall, steps)


def profile_packing(steps: int, start: int) -> None:
    from tasks.data import load_splits
    from tasks.demo_assets import build_demo_assets
    from tasks.gpu import check_gpu
    from tasks.train import train

    assets = build_demo_assets(REPO_ROOT / ".cache" / "demo")
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "mixed.jsonl"
        write_mixed_length_data(data, 600, seed=7, min_words=2, max_words=85)
        for variant in PACKING_VARIANTS:
            config = demo_config(assets, Path(work) / variant, [
                f"data.path={data}", "data.max_seq_length=256", f"training.max_steps={start + steps + 1}",
                f"training.packing={variant != 'padded'}"])
            splits = replace(load_splits(config.data), eval=[])
            _, plan = check_gpu(config)
            probe = ProfileSteps(start, steps)
            if variant == "flattened_dense_mask":  # packing as before the fix: plain SDPA over the packed row
                with patch("tasks.train.packing_attention", dense_mask_attention):
                    train(config, plan, splits, callbacks=[probe])
            else:
                train(config, plan, splits, callbacks=[probe])
            report(variant, probe.profiler, probe.wall, steps, rows=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("training", "packing"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--start", type=int, default=5, help="warm-up steps before profiling")
    args = parser.parse_args()
    import torch

    from tasks.modeling import quiet_libraries

    torch.set_num_threads(1)
    quiet_libraries()
    if args.benchmark == "training":
        profile_training(args.steps, args.start)
    else:
        profile_packing(args.steps, args.start)


if __name__ == "__main__":
    main()
