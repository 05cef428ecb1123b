"""Evaluation on the real demo: a real 4-bit base, the adapter from the shared short training run."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace

import pytest

from configs.schema import ConfigError
from tasks.data import DataError, render_prompt
from tasks.evaluate import evaluate_adapter
from tasks.generation import generate

SYSTEM_KEYS = {"bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "chrf", "exact_match", "eval_loss", "perplexity",
               "runaway_share", "samples_per_s", "wall_time_s"}
COMPARISON_KEYS = {"delta", "ci_low", "ci_high", "p_value", "significant"}


def test_adapter_beats_base_with_significance(evaluated):
    _, _, report, _ = evaluated
    base, adapter = report.systems["base"], report.systems["adapter"]
    # The shared run is short (160 steps): the adapter has learnt the vocabulary more than the mapping,
    # so BLEU rises by a few points and ROUGE-L by tens; both must be beyond bootstrap noise.
    assert adapter["bleu"] > base["bleu"]
    assert adapter["rougeL"] > base["rougeL"] + 10
    for metric in ("bleu", "rougeL"):
        comparison = report.comparisons["adapter_vs_base"][metric]
        assert comparison["delta"] == pytest.approx(adapter[metric] - base[metric])
        assert comparison["significant"] and comparison["p_value"] < report.significance_level
        assert 0 < comparison["ci_low"] <= comparison["delta"] <= comparison["ci_high"]
    assert adapter["eval_loss"] < base["eval_loss"]
    assert adapter["perplexity"] == pytest.approx(math.exp(adapter["eval_loss"]))


def test_report_json_shape_and_files(evaluated, trained):
    from tasks.evaluate import EvalReport

    config, result, report, paths = evaluated
    data = json.loads(paths["report"].read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    # what `qlora register --report` reads back: the same report, typed, with the data's fingerprint for lineage
    restored = EvalReport.from_json(paths["report"])
    assert restored.to_dict() == data and restored.dataset_fingerprint == trained[2].fingerprint
    assert {"n_samples", "generation", "bleu_signature", "systems", "comparisons", "significance_level", "samples",
            "wall_time_s"} <= set(data)
    assert data["n_samples"] == config.evaluation.max_rows == 64
    assert data["generation"] == {"batch_size": config.evaluation.batch_size,
                                  "max_new_tokens": config.evaluation.max_new_tokens,
                                  "do_sample": False, "temperature": config.evaluation.temperature}
    assert data["bleu_signature"].startswith("nrefs:1|") and "tok:13a" in data["bleu_signature"]
    assert set(data["systems"]) == {"base", "adapter"}  # no champion given
    for scores in data["systems"].values():
        assert set(scores) >= SYSTEM_KEYS
        assert scores["samples_per_s"] > 0 and scores["wall_time_s"] > 0
        assert all(0 <= scores[k] <= 100 for k in ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "chrf",
                                                   "exact_match"))
        assert 0.0 <= scores["runaway_share"] <= 1.0
    assert set(data["comparisons"]) == {"adapter_vs_base"}
    assert set(data["comparisons"]["adapter_vs_base"]) == {"bleu", "rougeL", "chrf", "exact_match"}
    assert all(set(c) == COMPARISON_KEYS for c in data["comparisons"]["adapter_vs_base"].values())
    assert data["wall_time_s"] >= sum(s["wall_time_s"] for s in data["systems"].values())

    samples = json.loads(paths["samples"].read_text())
    assert samples == data["samples"] and len(samples) == config.evaluation.num_sample_rows
    assert set(samples[0]) == {"prompt", "reference", "base", "adapter"}
    assert all(s["adapter"] for s in samples) and any(s["adapter"] != s["base"] for s in samples)
    assert [s["reference"] for s in samples] == [e.response for e in trained_eval_rows(config)]

    summary = paths["summary"].read_text()
    assert summary.strip() == report.markdown().strip()
    assert "| adapter |" in summary and "| base |" in summary and "ROUGE-L" in summary
    assert "adapter vs base" in summary and data["bleu_signature"] in summary


def trained_eval_rows(config):
    from tasks.data import load_splits

    return load_splits(config.data).eval[:config.evaluation.num_sample_rows]


def test_adapter_against_itself_as_champion(trained):
    config, plan, splits, result = trained
    small = config.model_copy(deep=True)
    small.evaluation.max_rows = 24
    report = evaluate_adapter(small, plan, splits, result.adapter_dir, champion_adapter=result.adapter_dir)
    assert set(report.systems) == {"base", "adapter", "champion"}
    assert report.outputs["champion"] == report.outputs["adapter"]
    for metric in ("bleu", "rougeL", "chrf", "exact_match"):
        comparison = report.comparisons["adapter_vs_champion"][metric]
        assert comparison["delta"] == 0.0
        assert comparison["p_value"] == pytest.approx(1.0)
        assert not comparison["significant"]
    assert set(report.samples[0]) == {"prompt", "reference", "base", "adapter", "champion"}
    assert report.n_samples == 24


def test_batched_and_one_at_a_time_greedy_outputs_are_identical(trained):
    from peft import PeftModel

    from tasks.modeling import load_base_model, load_tokenizer, release_memory

    config, plan, splits, result = trained
    tokenizer = load_tokenizer(config)
    # Prompts of different lengths, so the batch really is left-padded.
    by_length = sorted(splits.eval[:64], key=lambda e: len(render_prompt(tokenizer, e.prompt_messages)))
    examples = by_length[::8]
    prompts = [render_prompt(tokenizer, e.prompt_messages) for e in examples]
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1

    model = load_base_model(config, plan)
    speeds = {}
    try:
        for name in ("base", "adapter"):
            if name == "adapter":
                model = PeftModel.from_pretrained(model, str(result.adapter_dir), is_trainable=False)
            started = time.perf_counter()
            batched = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=len(prompts))
            middle = time.perf_counter()
            single = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=1)
            ended = time.perf_counter()
            assert batched == single, name
            assert all(batched), name  # no empty answers: only the new tokens were decoded, and some were made
            speeds[name] = (len(prompts) / (middle - started), len(prompts) / (ended - middle))
    finally:
        model = None
        release_memory()
    print("samples/s batched vs one-at-a-time:", {k: f"{b:.1f} vs {s:.1f}" for k, (b, s) in speeds.items()})


def test_adapter_targeting_a_module_the_base_lacks_is_refused(trained, tmp_path):
    config, plan, splits, result = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(result.adapter_dir, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["target_modules"] = [*adapter_config["target_modules"], "wqkv_fused"]
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ConfigError, match=r"target modules \['wqkv_fused'\] not found") as caught:
        evaluate_adapter(config, plan, splits, adapter)
    assert "q_proj" in str(caught.value)  # lists what the base does have


def test_adapter_with_other_shapes_is_refused(trained, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    config, plan, splits, result = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(result.adapter_dir, adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] * 2)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj \(adapter input size \d+, base \d+\)"):
        evaluate_adapter(config, plan, splits, adapter)


def test_adapter_of_another_base_is_refused(trained, tmp_path):
    config, plan, splits, result = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(result.adapter_dir, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ConfigError, match="trained on base 'meta-llama/Llama-3.2-1B'"):
        evaluate_adapter(config, plan, splits, adapter)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        evaluate_adapter(config, plan, splits, tmp_path)


def test_empty_eval_split_is_a_clear_error(trained):
    config, plan, splits, result = trained
    with pytest.raises(DataError, match="eval split is empty"):
        evaluate_adapter(config, plan, replace(splits, eval=[]), result.adapter_dir)
