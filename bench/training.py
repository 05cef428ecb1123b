"""Benchmarks 1 and 2: training throughput of `tasks.train.train` against a hand-written loop, and
padding-free packing against padded batches on mixed-length data.

Both compare A and B inside one process, repeat by repeat, alternating which side goes first, so slow
drift and neighbours' load fall on both sides. Steady-state tokens/s is measured between the end of
the warm-up steps and the end of the last step (no model load, tokenization, checkpoint at the end);
end-to-end tokens/s divides by the whole call (model load and adapter save included).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest.mock import patch

from transformers import TrainerCallback

from bench.common import REPO_ROOT, paired_ratios, summarize
from configs.schema import PipelineConfig, load_config
from tasks.data import DatasetSplits, load_splits, tokenize_example
from tasks.demo_assets import INSTRUCTIONS, SOURCE_WORDS, DemoAssets, zorbish_lexicon
from tasks.gpu import TrainingPlan, check_gpu
from tasks.modeling import packing_attention
from tasks.train import train


@dataclass
class RunTiming:
    """Step-end clock of one training run: (seconds since start, real tokens seen so far) per step."""

    marks: list[tuple[float, int]] = field(default_factory=list)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def steady_tokens_per_s(self, warmup: int) -> float:
        first, last = self.marks[warmup - 1], self.marks[-1]
        return (last[1] - first[1]) / (last[0] - first[0])

    def end_to_end_tokens_per_s(self) -> float:
        return self.marks[-1][1] / self.wall_s

    def steady_s_per_step(self, warmup: int) -> float:
        return (self.marks[-1][0] - self.marks[warmup - 1][0]) / (len(self.marks) - warmup)


class StepClock(TrainerCallback):
    """Records when each optimizer step ended and the non-padding tokens the Trainer has seen."""

    def __init__(self) -> None:
        self.timing = RunTiming()
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.timing.marks.append((time.perf_counter() - self.started, int(state.num_input_tokens_seen)))


def demo_config(assets: DemoAssets, output_dir: Path, overrides: list[str],
                model_dir: Path | None = None) -> PipelineConfig:
    base = [
        f"data.path={assets.data_path.resolve()}",
        f"model.name_or_path={(model_dir or assets.model_dir).resolve()}",
        f"training.output_dir={output_dir}",
        "training.resume=false",
    ]
    return load_config(REPO_ROOT / "configs" / "demo.yaml", base + overrides)


def run_project(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits) -> RunTiming:
    """The pipeline's own training stage, exactly as the flow calls it."""
    clock = StepClock()
    result = train(config, plan, splits, callbacks=[clock])
    timing = clock.timing
    timing.wall_s = time.perf_counter() - clock.started
    summary = result.summary
    timing.extra = {"train_loss": summary.train_loss, "eval_loss_after": summary.eval_loss_after,
                    "train_tokens": summary.train_tokens, "global_step": summary.global_step}
    return timing


def run_hand_written(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits, steps: int,
                     work: Path) -> RunTiming:
    """What one would write by hand: peft + bitsandbytes 4-bit + plain torch AdamW, no Trainer.

    Same model file, quantization (NF4, double quant, same compute dtype), LoRA shape, batch size,
    sequence length, learning rate, collator and number of steps as the project's run, and, when
    packing, the same attention (`tasks.modeling.packing_attention`): the ratio measures the training
    loop, not the attention kernel.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
    )

    started = time.perf_counter()
    torch.manual_seed(config.training.seed)
    dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
    path = config.model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
        dtype=dtype,
    )
    if config.training.packing:
        model.set_attn_implementation(packing_attention(plan))
    lora = config.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    rows = [tokenize_example(tokenizer, e, config.data.max_seq_length) for e in splits.train]
    if config.training.packing:
        collate: Any = DataCollatorWithFlattening()
    else:
        tokenizer.padding_side = "right"
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    batch_size = int(config.training.per_device_batch_size)
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(config.training.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.training.learning_rate)
    model.train()
    timing = RunTiming()
    seen, step = 0, 0
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mask = batch.get("attention_mask")
            seen += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            step += 1
            timing.marks.append((time.perf_counter() - started, seen))
            if step == steps:
                break
    model.save_pretrained(str(work / "hand-written-adapter"))
    timing.wall_s = time.perf_counter() - started
    timing.extra = {"final_loss": loss.item()}
    return timing


def _parameter_count(config: PipelineConfig) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model.name_or_path))
    return sum(p.numel() for p in model.parameters())


CPU_OPTIM = "adamw_torch"  # the config option for CPU users; the default stays paged_adamw_8bit on purpose


def representative_model(assets: DemoAssets, out: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    """A randomly initialised Llama of `shape` on the demo tokenizer, saved like a real base model.

    Throughput does not depend on what the weights say, so it is not pretrained; the vocabulary is the
    demo base's (padded to a multiple of 64), so the demo data and collators apply unchanged.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    demo = AutoConfig.from_pretrained(assets.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    config = LlamaConfig(**{**shape, "vocab_size": demo.vocab_size, "bos_token_id": demo.bos_token_id,
                            "eos_token_id": demo.eos_token_id, "pad_token_id": demo.pad_token_id})
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def training_throughput(assets: DemoAssets, work: Path, steps: int, warmup: int, repeats: int,
                        model_dir: Path | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Benchmark 1 on the demo data with the demo config (eval split left out of all sides); the demo
    model, or `model_dir` (benchmark 1b: the representative step) with `batch_size` rows a step.

    Sides per repeat, order rotating: the project as configured (`paged_adamw_8bit`), the hand-written
    loop, and the project with `training.optim=adamw_torch`, the option for CPU users
    (the default keeps bitsandbytes' paged 8-bit optimizer on purpose; on a CPU paging does nothing).
    """
    common = [f"training.max_steps={steps}"]
    if batch_size:
        common.append(f"training.per_device_batch_size={batch_size}")
    config = demo_config(assets, work / "project", common, model_dir)
    adamw = demo_config(assets, work / "project-adamw", [*common, f"training.optim={CPU_OPTIM}"], model_dir)
    splits = replace(load_splits(config.data), eval=[])  # time training only; train() skips eval without rows
    _, plan = check_gpu(config)
    _, adamw_plan = check_gpu(adamw)
    sides = ("project", "hand", "project_adamw")
    runs: dict[str, list[RunTiming]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side in sides[repeat % len(sides):] + sides[:repeat % len(sides)]:
            if side == "project":
                runs[side].append(run_project(config, plan, splits))
            elif side == "project_adamw":
                runs[side].append(run_project(adamw, adamw_plan, splits))
            else:
                runs[side].append(run_hand_written(config, plan, splits, steps, work))
            print(f"  [1] repeat {repeat + 1}/{repeats} {side}: {runs[side][-1].steady_tokens_per_s(warmup):.0f} tok/s",
                  flush=True)
    steady = {side: [t.steady_tokens_per_s(warmup) for t in runs[side]] for side in sides}
    e2e = {side: [t.end_to_end_tokens_per_s() for t in runs[side]] for side in sides}
    return {
        "setup": {
            "model": str(config.model.name_or_path), "parameters": _parameter_count(config), "steps": steps,
            "warmup_steps": warmup, "repeats": repeats,
            "batch_size": plan.per_device_batch_size, "max_seq_length": config.data.max_seq_length,
            "packing": config.training.packing, "optim_project": plan.optim, "optim_hand": "torch.optim.AdamW",
            "optim_option": adamw_plan.optim,
            "attn_implementation": packing_attention(plan) if config.training.packing else "sdpa",
            "compute_dtype": plan.compute_dtype, "lora_r": config.lora.r, "train_rows": len(splits.train),
        },
        "project_tokens_per_s": summarize(steady["project"]),
        "hand_tokens_per_s": summarize(steady["hand"]),
        "project_adamw_tokens_per_s": summarize(steady["project_adamw"]),
        "ratio": paired_ratios(steady["project"], steady["hand"]),
        "adamw_ratio": paired_ratios(steady["project_adamw"], steady["hand"]),
        "project_s_per_step": summarize([t.steady_s_per_step(warmup) for t in runs["project"]]),
        "hand_s_per_step": summarize([t.steady_s_per_step(warmup) for t in runs["hand"]]),
        "project_adamw_s_per_step": summarize([t.steady_s_per_step(warmup) for t in runs["project_adamw"]]),
        "project_end_to_end_tokens_per_s": summarize(e2e["project"]),
        "hand_end_to_end_tokens_per_s": summarize(e2e["hand"]),
        "end_to_end_ratio": paired_ratios(e2e["project"], e2e["hand"]),
        "target": 1.0 if model_dir is None else 0.97,
    }


def write_mixed_length_data(path: Path, rows: int, seed: int, min_words: int, max_words: int) -> None:
    """Demo-style rows whose sentence length is uniform in [min_words, max_words] (token lengths ~10x apart)."""
    rng = random.Random(seed)
    lexicon = zorbish_lexicon(0)  # the demo's own mapping, so the demo base model can learn it
    lines = []
    for index in range(rows):
        words = [rng.choice(SOURCE_WORDS) for _ in range(rng.randint(min_words, max_words))]
        sentence = " ".join(words)
        lines.append(json.dumps({"instruction": INSTRUCTIONS[index % len(INSTRUCTIONS)],
                                 "input": f"{sentence} ({index})",  # unique prompts: no duplicates, no leakage
                                 "output": " ".join(lexicon[w] for w in words)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def padding_share(lengths: list[int], batch_size: int, seed: int) -> float:
    """Share of pad tokens in right-padded batches of randomly ordered rows (what padding wastes)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded


PACKING_VARIANTS = ("padded", "flattened", "flattened_dense_mask")


def dense_mask_attention(plan: TrainingPlan) -> str:
    """Stand-in for `tasks.train.packing_attention` in the `flattened_dense_mask` variant: plain SDPA over
    the flattened row, i.e. a (tokens x tokens) block-diagonal mask, as the pipeline did before the fix."""
    return "sdpa"


def packing_benchmark(assets: DemoAssets, work: Path, steps: int, warmup: int, repeats: int, rows: int,
                      max_words: int, eval_rows: int = 32) -> dict[str, Any]:
    """Benchmark 2: the same rows in the same order, padded (`training.packing=false`) or flattened; real
    tokens/s, and the loss after the same real tokens.

    `flattened` is the pipeline's packing as it is: `DataCollatorWithFlattening` plus attention per
    packed sequence (`tasks.modeling.packing_attention`: flash-attn varlen on CUDA when installed, else
    `packed_sdpa`). `flattened_dense_mask` is the same with plain SDPA over the whole packed row, which
    is what packing did before that fix: kept as the evidence of why it exists.

    The three variants see identical examples at every step (same data, seed and sampler), so they
    process the same real tokens (checked: the Trainer's non-padding token counts are equal).
    """
    data_path = work / "mixed.jsonl"
    write_mixed_length_data(data_path, rows, seed=7, min_words=2, max_words=max_words)
    max_len = 256  # the demo model's max_position_embeddings
    overrides = [f"data.path={data_path}", f"data.max_seq_length={max_len}", "data.eval_fraction=0.05",
                 f"training.max_steps={steps}", "training.warmup_ratio=0.0", "training.logging_steps=1000"]
    configs = {variant: demo_config(assets, work / f"packing-{variant}",
                                    overrides + [f"training.packing={variant != 'padded'}"])
               for variant in PACKING_VARIANTS}
    splits = load_splits(configs["padded"].data)
    with_eval = replace(splits, eval=splits.eval[:eval_rows])
    without_eval = replace(splits, eval=[])
    _, plan = check_gpu(configs["padded"])
    from tasks.modeling import load_tokenizer

    tokenizer = load_tokenizer(configs["padded"])
    lengths = [len(tokenize_example(tokenizer, e, max_len)["input_ids"]) for e in splits.train]
    runs: dict[str, list[RunTiming]] = {variant: [] for variant in PACKING_VARIANTS}
    for repeat in range(repeats):
        order = PACKING_VARIANTS if repeat % 2 == 0 else tuple(reversed(PACKING_VARIANTS))
        for variant in order:
            data = with_eval if repeat == 0 else without_eval  # losses once; timing excludes eval anyway
            if variant == "flattened_dense_mask":
                with patch("tasks.train.packing_attention", dense_mask_attention):
                    runs[variant].append(run_project(configs[variant], plan, data))
            else:
                runs[variant].append(run_project(configs[variant], plan, data))
            print(f"  [2] repeat {repeat + 1}/{repeats} {variant}: "
                  f"{runs[variant][-1].steady_s_per_step(warmup):.3f} s/step", flush=True)
    tokens_per_s = {v: [t.steady_tokens_per_s(warmup) for t in runs[v]] for v in PACKING_VARIANTS}
    sorted_lengths = sorted(lengths)
    twentieth = max(1, len(lengths) // 20)
    return {
        "setup": {
            "model": str(configs["padded"].model.name_or_path), "rows": len(splits.train), "eval_rows": eval_rows,
            "steps": steps, "warmup_steps": warmup, "repeats": repeats, "batch_size": plan.per_device_batch_size,
            "max_seq_length": max_len, "token_length_min": sorted_lengths[0],
            "token_length_median": sorted_lengths[len(lengths) // 2], "token_length_max": sorted_lengths[-1],
            "token_length_p5_p95": [sorted_lengths[twentieth], sorted_lengths[-twentieth]],
            "pad_share_of_padded_batches": padding_share(lengths, plan.per_device_batch_size, seed=0),
            "attn_implementation": {"padded": "sdpa", "flattened": packing_attention(plan),
                                    "flattened_dense_mask": "sdpa"},
        },
        "real_tokens_per_s": {v: summarize(tokens_per_s[v]) for v in PACKING_VARIANTS},
        "ratio": paired_ratios(tokens_per_s["flattened"], tokens_per_s["padded"]),
        "dense_mask_ratio": paired_ratios(tokens_per_s["flattened_dense_mask"], tokens_per_s["padded"]),
        "speedup_over_dense_mask": paired_ratios(tokens_per_s["flattened"], tokens_per_s["flattened_dense_mask"]),
        "real_tokens_seen": {v: runs[v][0].extra["train_tokens"] for v in PACKING_VARIANTS},
        "train_loss": {v: summarize([t.extra["train_loss"] for t in runs[v]]) for v in PACKING_VARIANTS},
        "eval_loss_after": {v: runs[v][0].extra["eval_loss_after"] for v in PACKING_VARIANTS},
        "target": 1.5,
    }


def compile_benchmark(assets: DemoAssets, work: Path, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """`training.compile` (torch.compile through TrainingArguments.torch_compile) against eager, paired.

    The compiled side's first steps include the compilation; steady state is read after `warmup` steps,
    when the compiled graphs exist (packing changes the batch length each step, so dynamo recompiles
    until it marks the length dynamic or reaches its recompile limit and runs those frames eagerly).
    """
    eager = demo_config(assets, work / "eager", [f"training.max_steps={steps}"])
    compiled = demo_config(assets, work / "compiled", [f"training.max_steps={steps}", "training.compile=true"])
    splits = replace(load_splits(eager.data), eval=[])
    _, plan = check_gpu(eager)
    sides = {"eager": eager, "compiled": compiled}
    runs: dict[str, list[RunTiming]] = {side: [] for side in sides}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for side in order:
            runs[side].append(run_project(sides[side], plan, splits))
            print(f"  [compile] repeat {repeat + 1}/{repeats} {side}: "
                  f"{runs[side][-1].steady_tokens_per_s(warmup):.0f} tok/s", flush=True)
    steady = {side: [t.steady_tokens_per_s(warmup) for t in runs[side]] for side in sides}
    return {
        "setup": {"model": str(eager.model.name_or_path), "steps": steps, "warmup_steps": warmup, "repeats": repeats,
                  "batch_size": plan.per_device_batch_size, "packing": eager.training.packing,
                  "compute_dtype": plan.compute_dtype, "device": plan.device},
        "eager_tokens_per_s": summarize(steady["eager"]),
        "compiled_tokens_per_s": summarize(steady["compiled"]),
        "ratio": paired_ratios(steady["compiled"], steady["eager"]),
        "warmup_s": {side: summarize([t.marks[warmup - 1][0] for t in runs[side]]) for side in sides},
        "train_loss": {side: summarize([t.extra["train_loss"] for t in runs[side]]) for side in sides},
        "target": 1.0,
    }
