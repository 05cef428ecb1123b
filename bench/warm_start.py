"""Benchmark 7: incremental nightly training, a warm start from the champion against a fresh LoRA.

The nightly scenario of `training.init_adapter` + `data.sources`: the champion was trained on
yesterday's rows (the first part of the demo data); tonight's run trains on the new rows mixed with a
replay of the old ones. Two runs with the same config, data mix and steps differ only in where the
LoRA starts: fresh (the default) or from the champion's weights. A Trainer callback scores BLEU on
the same eval rows every `every` optimizer steps (and before the first), with the pipeline's own
`generate` and BLEU metric, so the curves are on evaluation's scale. Reported: both curves, the
champion's own BLEU on those rows, and the first scored step at which each run reaches it.
Run it with `python -m bench.run --sections warm_start` (sizes: bench.run.FULL).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from bench.training import demo_config
from configs.schema import PipelineConfig
from tasks.data import load_splits, render_prompt
from tasks.demo_assets import DemoAssets
from tasks.evaluate import eval_examples
from tasks.generation import generate
from tasks.gpu import check_gpu
from tasks.metrics import SacreBleuMetric
from tasks.train import train


class BleuCurve(TrainerCallback):
    """BLEU of the model being trained on fixed eval rows, before training and every `every` steps."""

    def __init__(self, config: PipelineConfig, examples: list[Any], every: int) -> None:
        self.config, self.examples, self.every = config, examples, every
        self.points: list[dict[str, float]] = []

    def score(self, model: Any, tokenizer: Any, step: int) -> None:
        ev = self.config.evaluation
        prompts = [render_prompt(tokenizer, e.prompt_messages) for e in self.examples]
        outputs = generate(model, tokenizer, prompts, ev.max_new_tokens, ev.batch_size)
        bleu = SacreBleuMetric().compute(predictions=outputs, references=[e.response for e in self.examples])
        self.points.append({"step": step, "bleu": bleu["score"]})
        print(f"    step {step}: BLEU {bleu['score']:.1f}", flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.score(kwargs["model"], kwargs["processing_class"], state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            self.score(kwargs["model"], kwargs["processing_class"], state.global_step)


def split_demo_data(assets: DemoAssets, work: Path, new_rows: int) -> tuple[Path, Path]:
    """Yesterday's rows (all but the last `new_rows`) and tonight's (the last `new_rows`), as two files."""
    lines = [line for line in assets.data_path.read_text().splitlines() if line.strip()]
    work.mkdir(parents=True, exist_ok=True)
    old, new = work / "yesterday.jsonl", work / "tonight.jsonl"
    old.write_text("\n".join(lines[:-new_rows]) + "\n")
    new.write_text("\n".join(lines[-new_rows:]) + "\n")
    return old, new


REACHED_SHARE = 0.95  # "reaches the champion's BLEU": at least this share of it, after training started


def first_reaching(points: list[dict[str, float]], target: float) -> int | None:
    """The first scored step after step 0 at or above REACHED_SHARE of `target` (step 0 of the warm run is
    the champion itself: counting it would make the comparison trivial)."""
    return next((int(p["step"]) for p in points if p["step"] > 0 and p["bleu"] >= REACHED_SHARE * target), None)


def warm_start_benchmark(assets: DemoAssets, work: Path, champion_steps: int, steps: int, every: int,
                         eval_rows: int, new_rows: int, new_weight: float, old_weight: float) -> dict[str, Any]:
    old, new = split_demo_data(assets, work / "data", new_rows)
    started = time.perf_counter()
    champion = demo_config(assets, work / "champion", [f"training.max_steps={champion_steps}", f"data.path={old}"])
    _, plan = check_gpu(champion)
    champion_result = train(champion, plan, load_splits(champion.data))
    champion_s = time.perf_counter() - started

    mix = ["data.path=null",
           f"data.sources=[{{path: {new}, weight: {new_weight}}}, {{path: {old}, weight: {old_weight}}}]",
           f"training.max_steps={steps}", f"evaluation.max_rows={eval_rows}"]
    configs = {
        "fresh": demo_config(assets, work / "fresh", mix),
        "warm": demo_config(assets, work / "warm", [*mix, f"training.init_adapter={champion_result.adapter_dir}"]),
    }
    splits = load_splits(configs["fresh"].data)
    examples = eval_examples(configs["fresh"], splits)
    curves: dict[str, list[dict[str, float]]] = {}
    wall: dict[str, float] = {}
    for name, config in configs.items():
        print(f"  [warm_start] {name} run, {steps} steps", flush=True)
        curve = BleuCurve(config, examples, every)
        started = time.perf_counter()
        train(config, plan, splits, callbacks=[curve])
        wall[name] = time.perf_counter() - started
        curves[name] = curve.points
    champion_bleu = curves["warm"][0]["bleu"]  # step 0 of the warm run is the champion itself
    return {
        "setup": {"champion_steps": champion_steps, "steps": steps, "score_every": every, "eval_rows": len(examples),
                  "tonight_rows": new_rows, "weights_tonight_replay": [new_weight, old_weight],
                  "learning_rate": configs["fresh"].training.learning_rate,
                  "train_rows_in_mix": len(splits.train), "batch_size": plan.per_device_batch_size},
        "champion_bleu": champion_bleu,
        "curves": curves,
        "reached_share": REACHED_SHARE,
        "steps_to_champion_bleu": {name: first_reaching(points, champion_bleu) for name, points in curves.items()},
        "wall_s": {"champion": champion_s, **wall},
    }
