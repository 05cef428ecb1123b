"""The benchmark harness cannot rot: a quick run of every CPU benchmark and a CPU dry run of the GPU script.

No timing assertions: the figures of a quick run on tiny sizes mean nothing; what is checked is that
every benchmark runs through the real code paths and writes the JSON keys and RESULTS.md sections
the full run writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from tests.conftest import REPO_ROOT

SECTION_KEYS = {
    "training": {"project_tokens_per_s", "hand_tokens_per_s", "ratio", "adamw_ratio", "end_to_end_ratio", "setup",
                 "target"},
    "training_step": {"project_tokens_per_s", "hand_tokens_per_s", "ratio", "project_s_per_step", "setup", "target"},
    "warm_start": {"champion_bleu", "curves", "steps_to_champion_bleu", "setup", "measured"},
    "packing": {"real_tokens_per_s", "ratio", "dense_mask_ratio", "speedup_over_dense_mask", "train_loss",
                "eval_loss_after", "real_tokens_seen"},
    "memory": {"weights", "step", "qlora_paper_bits_per_param", "target"},
    "evaluation": {"batched_samples_per_s", "single_samples_per_s", "ratio", "outputs_equal_share"},
}
HEADINGS = ["## Summary", "## 1. Training throughput", "## 1b. Training throughput on a representative step",
            "## 1c. `training.compile`", "## 2. Packing", "## 3. Memory", "## 4. Evaluation",
            "## 5. Orchestration overhead", "## 6. GPU (H200)", "## 7. Incremental training"]


def bench_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def quick_run(demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=REPO_ROOT,
                          env=bench_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text()), (out / "RESULTS.md").read_text()


def test_quick_run_writes_every_figure(quick_run) -> None:
    _, results, _ = quick_run
    assert results["quick"] is True and results["machine"]["cpu_cores"] >= 1
    for section, keys in SECTION_KEYS.items():
        assert "error" not in results[section], results[section]
        assert keys <= set(results[section]), (section, keys - set(results[section]))
    packing = results["packing"]
    assert set(packing["real_tokens_per_s"]) == {"padded", "flattened", "flattened_dense_mask"}
    assert packing["setup"]["attn_implementation"]["flattened"] == "packed_sdpa"  # the pipeline's, on a CPU
    seen = packing["real_tokens_seen"]
    assert seen["padded"] == seen["flattened"] == seen["flattened_dense_mask"] > 0  # same rows, same order
    losses = packing["eval_loss_after"]
    for variant in ("flattened", "flattened_dense_mask"):  # same maths, other kernels
        assert losses[variant] == pytest.approx(losses["padded"], rel=1e-4), variant
    weights = results["memory"]["weights"]
    assert weights["nf4_dq_bytes"] < weights["bf16_bytes"] and weights["linear_layers"] > 0
    step = results["memory"]["step"]
    assert set(step["peak_rss"]) == {"qlora", "lora_bf16", "qlora_peft_upcast"}
    assert step["weight_bytes"]["qlora"] < step["weight_bytes"]["qlora_peft_upcast"]  # the landed dtype fix
    assert all(run["peak_reset_worked"] for runs in step["runs"].values() for run in runs)
    assert results["evaluation"]["outputs_equal_share"] == 1.0
    assert "skipped" in results["orchestration"]  # the flow runs in the full configuration only
    assert "skipped" in results["compile"]  # compiling takes minutes: full configuration only
    assert results["training_step"]["setup"]["parameters"] > 0
    warm = results["warm_start"]
    assert [p["step"] for p in warm["curves"]["fresh"]] == [0, 1, 2] == [p["step"] for p in warm["curves"]["warm"]]
    assert [row["section"] for row in results["summary"]] == ["training", "training", "training_step", "packing",
                                                              "memory", "evaluation", "warm_start"]


def test_results_md_has_every_section(quick_run) -> None:
    _, results, text = quick_run
    for heading in HEADINGS:
        assert heading in text, heading
    assert results["machine"]["cpu_model"] in text and "Machine load caveat" in text
    assert "QUICK smoke configuration" in text and "PROPOSED" not in text
    assert text.count("| **PASS** |") + text.count("| **MISS** |") == len(results["summary"])


def test_stage_timers_wrap_functions_in_place() -> None:
    from bench.orchestration import instrument

    module = types.SimpleNamespace(train=lambda x: x + 1, other=3)
    totals: dict[str, float] = {"train": 0.0}
    assert instrument(module, ("train", "missing", "other"), totals) == ["train"]  # type: ignore[arg-type]
    assert module.train(1) == 2 and totals["train"] > 0

    class Tracker:  # the flow's tracker: a classmethod constructor and instance methods
        def __init__(self, run_id: str) -> None:
            self.run_id = run_id

        @classmethod
        def start(cls, run_id: str) -> Tracker:
            return cls(run_id)

        def log_plan(self, plan: str) -> str:
            return f"{self.run_id}:{plan}"

    timed = {"start": 0.0, "log_plan": 0.0}
    assert instrument(Tracker, ("start", "log_plan"), timed) == ["start", "log_plan"]
    assert Tracker.start("r1").log_plan("p") == "r1:p" and timed["start"] > 0 and timed["log_plan"] > 0


def test_gpu_script_syntax_and_cpu_dry_run(tmp_path) -> None:
    subprocess.run(["bash", "-n", str(REPO_ROOT / "bench" / "gpu.sh")], check=True)
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env={**bench_env(), "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    assert result["dry_run"] and set(result["modes"]) == {"qlora", "lora_bf16"} and not result["errors"]
    assert result["flops_per_token"]["total"] > 0 and "989" in result["flops_formula"]
    for mode in result["modes"].values():
        assert mode["tokens_per_s"]["median"] > 0 and mode["mfu"]["median"] > 0


def test_gpu_flops_formula_for_the_1b_shape() -> None:
    from bench.common import LLAMA_1B
    from bench.gpu_bench import flops_per_token

    flops = flops_per_token(LLAMA_1B, seq=2048, lora_r=64, targets=["q_proj", "v_proj"])
    # Llama-3.2-1B: 16 layers x 60.8M linear params + a 128256 x 2048 lm_head = 1.236B matmul params
    assert flops["n_mm"] == pytest.approx(1.2358e9, rel=1e-3)
    assert flops["base_fwd_and_act_grad"] == 4 * flops["n_mm"]
    assert flops["attention"] == 12 * 16 * 2048 * 2048
