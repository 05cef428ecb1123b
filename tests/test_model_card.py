"""The model card shows p-values exactly as the evaluation report (the Prefect artifact) does.

The p-value comes from the real paired bootstrap (sacrebleu), whose p-values are multiples of
1/(resamples + 1): printed raw they read 0.000999000999000999.
"""

from __future__ import annotations

import re

from tests.conftest import DEMO_CONFIG, make_eval_report


def test_model_card_prints_p_values_as_the_evaluation_report_does(tmp_path) -> None:
    from configs.schema import load_config
    from tasks.evaluate import EvalReport
    from tasks.formatting import format_p_value
    from tasks.metrics import paired_bootstrap_bleu
    from tasks.promotion import decide_promotion
    from tasks.register import model_card

    references = [f"zel vobip {word} ka" for word in ("red", "blue", "cat", "dog", "runs", "sleeps", "big", "old")]
    base_outputs = [f"the {word} one" for word in ("red", "blue", "cat", "dog", "runs", "sleeps", "big", "old")]
    comparison = paired_bootstrap_bleu(references, base_outputs, references, resamples=1000).to_dict()
    p_value = comparison["p_value"]
    assert comparison["significant"] and str(p_value) != format_p_value(p_value), "needs a p-value with many digits"

    report = make_eval_report()
    report["generation"]["batch_size"] = 32  # EvalReport.markdown shows it; the registry never reads it
    report["comparisons"]["adapter_vs_base"]["bleu"] = comparison
    config = load_config(DEMO_CONFIG, [f"training.output_dir={tmp_path / 'out'}"])
    decision = decide_promotion(report, config.registry, has_champion=False)
    reference = {"path": "/models/demo", "sha256": "0" * 64,
                 "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True}}
    tags = {"base_model": "/models/demo@sha256:" + "0" * 64, "dataset_fingerprint": "f" * 16,
            "validation_success": "true", "lora": "r=16 alpha=32", "git_commit": "unknown",
            "config_hash": config.config_hash()}
    card = model_card(config, reference, tags, report, decision, tmp_path)

    report_markdown = EvalReport.from_dict(report).markdown()
    bleu_row = next(line for line in report_markdown.splitlines() if line.startswith("| adapter vs base | BLEU |"))
    shown_in_report = bleu_row.split("|")[5].strip()
    assert shown_in_report == format_p_value(p_value)
    assert f"(p={shown_in_report}, significant at" in card
    assert str(p_value) not in card
    assert all(len(p.split(".")[1]) == 4 for p in re.findall(r"p=([0-9.]+)", card)), card


def test_model_card_and_report_show_forgetting_runaway_and_failed_canaries(tmp_path) -> None:
    from configs.schema import load_config
    from tasks.evaluate import EvalReport
    from tasks.promotion import decide_promotion
    from tasks.register import model_card

    report = make_eval_report(runaway=0.25, general_text_loss=(2.0, 2.75), canary_failures=1)
    report["generation"]["batch_size"] = 32
    config = load_config(DEMO_CONFIG, [f"training.output_dir={tmp_path / 'out'}",
                                       "registry.guard_metrics={rougeL: 1.0, forgetting: 0.5}"])
    decision = decide_promotion(report, config.registry, has_champion=False)
    assert not decision.promote
    tags = {"base_model": "/models/demo@sha256:" + "0" * 64, "dataset_fingerprint": "f" * 16,
            "validation_success": "true", "lora": "r=16 alpha=32", "git_commit": "unknown",
            "config_hash": config.config_hash()}
    card = model_card(config, {"quantization": {}}, tags, report, decision, tmp_path)
    assert "- **Forgetting:** mean token loss on `general.txt` (100 passages): base 2.0000, adapter 2.7500, " \
           "delta +0.7500 (lower is better)" in card
    assert "| runaway_share | 0.0% | 25.0% | +25.0% |" in card
    assert "**Canaries** (`canaries.yaml`): 2 of 3 passed; failed:" in card
    assert "  - canary 0: expected contains `zel`, got `red`" in card
    assert "guard forgetting: general_text_loss rises 0.7500 vs base" in card
    assert "runaway answers: 25.0% of the adapter's answers hit max_new_tokens" in card
    assert "1 of 3 canaries failed: 'canary 0'" in card

    markdown = EvalReport.from_dict(report).markdown()  # the Prefect artifact `evaluation-report`
    assert "**Forgetting:** mean token loss on `general.txt` (100 passages): base 2.0000, adapter 2.7500, " \
           "delta +0.7500 (lower is better); guard `registry.guard_metrics.forgetting`." in markdown
    assert "- canary 0: expected contains `zel`, got `red`" in markdown
    assert "| adapter |" in markdown and "| 25.0% | 2.7500 |" in markdown
