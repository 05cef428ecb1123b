"""RESULTS.md from the results dict: machine, command, a summary table with verdicts, one section per
benchmark, the GPU section (from gpu_results.json when an H200 run exists) and the hand-written analysis
(bench/NOTES.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import MIB, fmt_range

NOTES_FILE = Path(__file__).resolve().parent / "NOTES.md"
SECTION_TITLES = {
    "training": "1. Training throughput: `tasks.train.train` vs a hand-written loop",
    "training_step": "1b. Training throughput on a representative step (8 layers x 512 hidden)",
    "compile": "1c. `training.compile` (torch.compile) vs eager",
    "packing": "2. Packing: padding-free batches vs padded batches on mixed-length data",
    "memory": "3. Memory: NF4 + double quantization vs bf16",
    "evaluation": "4. Evaluation: batched generation vs one prompt at a time",
    "orchestration": "5. Orchestration overhead of the demo flow",
    "gpu": "6. GPU (H200): QLoRA vs bf16 LoRA on a 1B-class Llama",
    "warm_start": "7. Incremental training: warm start from the champion vs a fresh LoRA",
}


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure that has a target: (figure, median (min–max), target, verdict)."""
    rows: list[dict[str, Any]] = []

    def add(key: str, figure: str, stats: dict[str, Any], target: float, higher: bool, unit: str = "x") -> None:
        if unit == "%":
            value, goal = f"{stats['median']:.1%}", f"{target:.0%}"
        else:
            value, goal = fmt_range(stats, 2, unit), f"{target:g}{unit}"
        rows.append({"section": key, "figure": figure, "value": value, "target": f"{'≥' if higher else '≤'} {goal}",
                     "verdict": verdict(stats["median"], target, higher)})

    training = results.get("training", {})
    if "ratio" in training:
        add("training", "tokens/s, project ÷ hand-written (steady state)", training["ratio"], training["target"], True)
        optim = training["setup"].get("optim_option", "adamw_torch")
        add("training", f"tokens/s, project with training.optim={optim} (CPU option) ÷ hand-written",
            training["adamw_ratio"], training["target"], True)
    step = results.get("training_step", {})
    if "ratio" in step:
        s_per_step = step["project_s_per_step"]["median"]
        add("training_step", f"tokens/s, project ÷ hand-written, {step['setup']['parameters'] / 1e6:.0f}M-parameter "
            f"model ({s_per_step:.2f} s/step)", step["ratio"], step["target"], True)
    compiled = results.get("compile", {})
    if "ratio" in compiled:
        add("compile", "tokens/s after warm-up, training.compile=true ÷ eager (demo model, CPU)", compiled["ratio"],
            compiled["target"], True)
    packing = results.get("packing", {})
    if "ratio" in packing:
        add("packing", "real tokens/s, pipeline packing (flattened, per-sequence attention) ÷ padded",
            packing["ratio"], packing["target"], True)
    memory = results.get("memory", {})
    if "weights" in memory:
        w = memory["weights"]
        single = {"median": w["ratio_to_bf16"], "min": w["ratio_to_bf16"], "max": w["ratio_to_bf16"]}
        add("memory", f"linear weight bytes, NF4+DQ ÷ bf16 ({w['shape']}, {w['bits_per_param']:.3f} bits/param)",
            single, memory["target"], False)
    evaluation = results.get("evaluation", {})
    if "ratio" in evaluation:
        figure = f"samples/s, batched ÷ one at a time (outputs equal: {evaluation['outputs_equal_share']:.0%})"
        add("evaluation", figure, evaluation["ratio"], evaluation["target"], True)
    flow = results.get("orchestration", {})
    if "overhead_share" in flow:
        share = flow["overhead_share"]
        add("orchestration", "flow overhead ÷ stage compute (server running, store exists)",
            {"median": share, "min": share, "max": share}, flow["target"], False, "%")
    warm = results.get("warm_start", {})
    if "curves" in warm:
        reached, steps = warm["steps_to_champion_bleu"], warm["setup"]["steps"]
        fresh = reached["fresh"] if reached["fresh"] is not None else f"not within {steps}"
        ok = reached["warm"] is not None and (reached["fresh"] is None or reached["warm"] < reached["fresh"])
        share = warm.get("reached_share", 1.0)
        figure = f"steps to {share:.0%} of the champion's BLEU ({warm['champion_bleu']:.1f}), warm start vs fresh LoRA"
        rows.append({"section": "warm_start", "figure": figure, "value": f"{reached['warm']} vs {fresh}",
                     "target": "warm < fresh", "verdict": "PASS" if ok else "MISS"})
    return rows


def _skipped(section: dict[str, Any]) -> str | None:
    if "skipped" in section:
        return f"Not run: {section['skipped']}"
    if "error" in section:
        return f"**Failed:** `{section['error']}`"
    return None


def _measured(section: dict[str, Any]) -> str:
    """When this section was measured, and the load then (sections keep their own date: `--sections`)."""
    measured = section.get("measured") or {}
    if not measured.get("date"):
        return ""
    load = f", load average {measured['loadavg_start']} at start" if measured.get("loadavg_start") else ""
    return f"*Measured {measured['date']}{load}.*\n\n"


def _setup(setup: dict[str, Any]) -> str:
    return "Setup: " + ", ".join(f"{k} `{v}`" for k, v in setup.items())


def training_md(r: dict[str, Any]) -> str:
    return "\n".join([
        "| figure | median (min–max) |", "|---|---|",
        f"| project `train()` tokens/s, steady state | {fmt_range(r['project_tokens_per_s'], 0)} |",
        f"| hand-written loop tokens/s, steady state | {fmt_range(r['hand_tokens_per_s'], 0)} |",
        f"| **ratio project ÷ hand** (paired) | **{fmt_range(r['ratio'])}** |",
        f"| project with `training.optim=adamw_torch` (the CPU option) tokens/s "
        f"| {fmt_range(r['project_adamw_tokens_per_s'], 0)} |",
        f"| **ratio project with adamw_torch ÷ hand** (paired) | **{fmt_range(r['adamw_ratio'])}** |",
        f"| s/step: project / hand / project with adamw_torch | {fmt_range(r['project_s_per_step'], 4)} / "
        f"{fmt_range(r['hand_s_per_step'], 4)} / {fmt_range(r['project_adamw_s_per_step'], 4)} |",
        f"| end to end (model load, tokenization, Trainer set-up, adapter save) tokens/s, project "
        f"| {fmt_range(r['project_end_to_end_tokens_per_s'], 0)} |",
        f"| end to end tokens/s, hand | {fmt_range(r['hand_end_to_end_tokens_per_s'], 0)} |",
        f"| end-to-end ratio (paired) | {fmt_range(r['end_to_end_ratio'])} |",
        "", _setup(r["setup"]),
    ])


def training_step_md(r: dict[str, Any]) -> str:
    return "\n".join([
        "The same paired measurement as benchmark 1 on a model whose step is long enough for the Trainer's fixed "
        "cost per step not to dominate.",
        "",
        "| figure | median (min–max) |", "|---|---|",
        f"| project `train()` tokens/s, steady state | {fmt_range(r['project_tokens_per_s'], 0)} |",
        f"| hand-written loop tokens/s, steady state | {fmt_range(r['hand_tokens_per_s'], 0)} |",
        f"| **ratio project ÷ hand** (paired) | **{fmt_range(r['ratio'])}** (target ≥ {r['target']}) |",
        f"| project with `training.optim=adamw_torch` tokens/s | {fmt_range(r['project_adamw_tokens_per_s'], 0)} |",
        f"| ratio project with adamw_torch ÷ hand (paired) | {fmt_range(r['adamw_ratio'])} |",
        f"| s/step: project / hand / project with adamw_torch | {fmt_range(r['project_s_per_step'], 3)} / "
        f"{fmt_range(r['hand_s_per_step'], 3)} / {fmt_range(r['project_adamw_s_per_step'], 3)} |",
        "", _setup(r["setup"]),
    ])


def compile_md(r: dict[str, Any]) -> str:
    warm, loss = r["warmup_s"], r["train_loss"]
    return "\n".join([
        "| figure | eager | compiled |", "|---|---|---|",
        f"| tokens/s after the warm-up steps | {fmt_range(r['eager_tokens_per_s'], 0)} "
        f"| {fmt_range(r['compiled_tokens_per_s'], 0)} |",
        f"| seconds to the end of the warm-up steps (compilation included) | {fmt_range(warm['eager'], 1)} "
        f"| {fmt_range(warm['compiled'], 1)} |",
        f"| train loss | {loss['eager']['median']:.4f} | {loss['compiled']['median']:.4f} |",
        "",
        f"- **compiled ÷ eager, steady state (paired): {fmt_range(r['ratio'])}**",
        "", _setup(r["setup"]),
    ])


def packing_md(r: dict[str, Any]) -> str:
    s = r["setup"]
    tps = r["real_tokens_per_s"]
    loss = r["train_loss"]
    labels = {"padded": "padded (`training.packing=false`)",
              "flattened": "flattened: the pipeline's packing (per-sequence attention)",
              "flattened_dense_mask": "flattened, plain SDPA over a dense block mask (packing before the fix)"}
    return "\n".join([
        f"Mixed-length data: token lengths {s['token_length_min']}–{s['token_length_max']} "
        f"(p5–p95 {s['token_length_p5_p95'][0]}–{s['token_length_p5_p95'][1]}, median {s['token_length_median']}); "
        f"random batches of {s['batch_size']} padded to their longest row are "
        f"{s['pad_share_of_padded_batches']:.0%} pad tokens.",
        "",
        "| variant | real tokens/s | train loss (same rows, same order) | eval loss after |", "|---|---|---|---|",
        *(f"| {labels.get(v, v)} | {fmt_range(tps[v], 0)} | {loss[v]['median']:.5f} "
          f"| {r['eval_loss_after'][v]:.5f} |" for v in tps),
        "",
        f"- **the pipeline's packing (`DataCollatorWithFlattening` + `tasks.modeling.packing_attention`, here "
        f"`{s['attn_implementation']['flattened']}`) ÷ padded: {fmt_range(r['ratio'])}**",
        f"- before the fix, flattened with a dense block mask ÷ padded: {fmt_range(r['dense_mask_ratio'])}; "
        f"the fix's own gain (flattened ÷ dense mask): {fmt_range(r['speedup_over_dense_mask'])}",
        f"- real tokens seen after {s['steps']} steps: {r['real_tokens_seen']} (identical by construction)",
        "", _setup(s),
    ])


def _mib(stats: dict[str, Any]) -> str:
    return fmt_range({k: stats[k] / MIB for k in ("median", "min", "max")}, 0, " MiB")


def memory_md(r: dict[str, Any]) -> str:
    w, step = r["weights"], r["step"]
    lines = [
        f"**(a) Linear weights of a {w['shape']} shape** ({w['linear_layers']} linears, "
        f"{w['linear_params'] / 1e6:.1f}M of its {w['total_params'] / 1e6:.1f}M parameters; embeddings are not "
        "quantized), random init, quantized layer by layer with `bitsandbytes.nn.Params4bit`:",
        "",
        "| | bytes | bits/param |", "|---|---|---|",
        f"| bf16 | {w['bf16_bytes'] / MIB:.1f} MiB | 16 |",
        f"| NF4 + double quant (codes + 8-bit absmax + fp32 second-level absmax + codebooks) "
        f"| {w['nf4_dq_bytes'] / MIB:.1f} MiB | {w['bits_per_param']:.4f} |",
        f"| QLoRA paper | | {r['qlora_paper_bits_per_param']:.4f} |",
        "",
        f"Ratio NF4+DQ ÷ bf16: **{w['ratio_to_bf16']:.4f}** (target ≤ {r['target']}); first layer dequantized "
        f"max error {w['first_layer_max_rel_error']:.3f} of its largest weight; built in {w['build_s']:.0f} s with "
        f"peak RSS {w['peak_rss_bytes'] / MIB:.0f} MiB.",
        "",
        f"**(b) Peak RSS of one training step** ({step['shape']}, batch {step['batch']} × {step['seq']} tokens, "
        f"forward + backward + AdamW under bf16 autocast, LoRA r=16 all-linear; each run in its own process "
        "with glibc set to hand freed memory back at once, freed memory trimmed after loading, peak mark reset "
        "before the step):",
        "",
        "| mode | weights in memory | peak RSS | peak RSS above the imports |", "|---|---|---|---|",
    ]
    labels = {"qlora": "QLoRA (pipeline: embeddings and lm_head kept in the load dtype, norms fp32)",
              "lora_bf16": "bf16 LoRA (pipeline, load_in_4bit=false)",
              "qlora_peft_upcast": "QLoRA with peft's full fp32 upcast (before the fix)"}
    for mode, label in labels.items():
        peak, above = _mib(step["peak_rss"][mode]), _mib(step["peak_rss_above_imports"][mode])
        lines.append(f"| {label} | {step['weight_bytes'][mode] / MIB:.1f} MiB | {peak} | {above} |")
    lines += [
        "",
        f"- weights QLoRA ÷ bf16 LoRA: {step['weight_bytes_ratio']:.3f} (before the fix: "
        f"{step['peft_upcast_weight_bytes_ratio']:.3f})",
        f"- peak RSS QLoRA ÷ bf16 LoRA: {fmt_range(step['peak_rss_ratio'], 3)} (before the fix: "
        f"{fmt_range(step['peft_upcast_peak_rss_ratio'], 3)}); above the imports: "
        f"{fmt_range(step['peak_above_imports_ratio'], 3)} (before the fix: "
        f"{fmt_range(step['peft_upcast_peak_above_imports_ratio'], 3)})",
    ]
    return "\n".join(lines)


def evaluation_md(r: dict[str, Any]) -> str:
    lines = [
        "| figure | median (min–max) |", "|---|---|",
        f"| batched (batch_size {r['setup']['batch_size']}) samples/s | {fmt_range(r['batched_samples_per_s'], 1)} |",
        f"| one at a time samples/s | {fmt_range(r['single_samples_per_s'], 1)} |",
        f"| **ratio** (paired) | **{fmt_range(r['ratio'], 1)}** |",
        f"| identical outputs | {r['outputs_equal_share']:.0%} of {r['setup']['rows']} rows |",
        "", _setup(r["setup"]),
    ]
    if r.get("first_mismatch"):
        lines += ["", f"First mismatch: `{r['first_mismatch']}`"]
    return "\n".join(lines)


def orchestration_md(r: dict[str, Any]) -> str:
    parts = r["overhead_parts_s"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
    return "\n".join([
        "| figure | seconds |", "|---|---|",
        f"| flow wall time | {r['flow_wall_s']:.1f} |",
        f"| sum of stage compute ({stages}) | {r['stage_compute_s']:.1f} |",
        f"| overhead inside the flow | {r['overhead_s']:.1f} |",
        f"| … MLflow logging ({', '.join(f'{k} {v:.2f}' for k, v in r['mlflow_s'].items())}) "
        f"| {parts['mlflow_logging']:.1f} |",
        f"| … Prefect artifacts | {parts['prefect_artifacts']:.1f} |",
        f"| … Prefect task runs, states, results, cache keys, logs | {parts['prefect_bookkeeping']:.1f} |",
        f"| temporary Prefect server start (before the flow; none with a running server) "
        f"| {r['server_start_s']:.1f} |",
        f"| new MLflow store's schema (first use of a store only) | {r['mlflow_store_init_s']:.1f} |",
        f"| importing the flow module (prefect, mlflow, transformers…) | {r['import_s']:.1f} |",
        "",
        f"- **overhead ÷ stage compute, server running and store existing: {r['overhead_share']:.1%}** "
        f"(target ≤ {r['target']:.0%})",
        f"- cold (temporary server started and new store created by this run): {r['overhead_share_cold']:.1%}",
        f"- Prefect server: {r['prefect_server']}; overrides: `{r['overrides']}`",
    ])


def gpu_md(r: dict[str, Any]) -> str:
    flops = r.get("flops_per_token", {}).get("total", 0.0)
    lines = [
        *(["**DRY RUN on the CPU (tiny model): checks the script, these are not GPU figures.**", ""]
          if r.get("dry_run") else []),
        f"Hardware: {r.get('device', '?')}; torch {r.get('torch')}, bitsandbytes {r.get('bitsandbytes')}; "
        f"shape {r.get('shape')}, batch {r.get('batch')} × {r.get('seq')} tokens, LoRA r={r.get('lora_r')}.",
        "",
        f"FLOPs per token: {flops / 1e9:.2f} GFLOP = {r.get('flops_formula', '')}",
        "",
        "| mode | tokens/s median (min–max) | peak VRAM | MFU vs 989 TFLOP/s |", "|---|---|---|---|",
    ]
    for mode, m in r.get("modes", {}).items():
        lines.append(f"| {mode} | {fmt_range(m['tokens_per_s'], 0)} | {m['peak_vram_bytes'] / 2**30:.2f} GiB "
                     f"| {m['mfu']['median']:.1%} |")
    if "ratios" in r:
        lines += ["", ", ".join(f"{k}: {v:.3f}" for k, v in r["ratios"].items())]
    return "\n".join(lines)


def warm_start_md(r: dict[str, Any]) -> str:
    s, curves = r["setup"], r["curves"]
    steps = [int(p["step"]) for p in curves["fresh"]]
    by_step = {name: {int(p["step"]): p["bleu"] for p in points} for name, points in curves.items()}
    reached = r["steps_to_champion_bleu"]
    return "\n".join([
        f"The champion: the demo config trained {s['champion_steps']} steps on yesterday's rows (the demo data "
        f"without its last {s['tonight_rows']} rows). Tonight: `data.sources` = tonight's {s['tonight_rows']} rows "
        f"and a replay of yesterday's, weights {s['weights_tonight_replay'][0]:g}:{s['weights_tonight_replay'][1]:g} "
        f"({s['train_rows_in_mix']} train rows in the mix), {s['steps']} steps at learning rate "
        f"{s['learning_rate']:g}, once from a fresh LoRA and once with `training.init_adapter` = the champion. "
        f"BLEU on the same {s['eval_rows']} eval rows every {s['score_every']} steps (step 0: before training).",
        "",
        "| step | " + " | ".join(str(step) for step in steps) + " |",
        "|---|" + "---:|" * len(steps),
        *(f"| {name} | " + " | ".join(f"{by_step[name].get(step, float('nan')):.1f}" for step in steps) + " |"
          for name in ("fresh", "warm")),
        "",
        f"- the champion's BLEU on these rows: {r['champion_bleu']:.1f}",
        f"- first scored step after step 0 at or above {r.get('reached_share', 1.0):.0%} of it: warm start "
        f"{reached['warm']}, fresh {reached['fresh'] if reached['fresh'] is not None else 'not reached'}",
        f"- wall time (s): champion {r['wall_s']['champion']:.0f}, fresh {r['wall_s']['fresh']:.0f}, "
        f"warm {r['wall_s']['warm']:.0f} (BLEU scoring included)",
    ])


RENDERERS = {"training": training_md, "training_step": training_step_md, "compile": compile_md,
             "packing": packing_md, "memory": memory_md, "evaluation": evaluation_md,
             "orchestration": orchestration_md, "gpu": gpu_md, "warm_start": warm_start_md}


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    load_start, load_end = m.get("loadavg_1_5_15", []), results.get("loadavg_end", [])
    configuration = ("QUICK smoke configuration: sizes too small for the verdicts to mean anything"
                     if results["quick"] else "full configuration")
    out = [
        "# Benchmark results",
        "",
        "Written by `python -m bench.run` (`make bench`); the JSON beside "
        "this file (`results.json`) holds every repeat. A run of some sections (`--sections`) keeps the other "
        "sections' earlier figures: each section says when it was measured.",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM; {m['platform']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)}",
        f"- command: `{results['command']}` ({configuration}, "
        f"torch threads {results['threads']}, {results['wall_s'] / 60:.1f} min)",
        f"- load average (1/5/15 min) at start {load_start}, at end {load_end}",
        "",
        "> **Machine load caveat.** The CPU figures were measured on a shared machine while other work ran "
        "(see the load averages). Absolute speeds are noisy; the ratios are measured side by side (A and B "
        "alternate inside one process, pair by pair) and are the figures to read. Each figure is the median "
        "of the paired repeats with their min–max.",
        "",
        "## Summary",
        "",
        "| # | figure | median (min–max) | target | verdict |", "|---|---|---|---|---|",
    ]
    numbers = {key: title.split(".")[0] for key, title in SECTION_TITLES.items()}
    for row in summary_rows(results):
        out.append(f"| {numbers[row['section']]} | {row['figure']} | {row['value']} | {row['target']} "
                   f"| **{row['verdict']}** |")
    for key, title in SECTION_TITLES.items():
        section = results.get(key, {"skipped": "not in this run"})
        out += ["", f"## {title}", "", _skipped(section) or _measured(section) + RENDERERS[key](section)]
    if NOTES_FILE.exists():
        out += ["", NOTES_FILE.read_text().strip()]
    return "\n".join(out) + "\n"
