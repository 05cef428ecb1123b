"""The promotion gates end to end: the real adapter of the shared short run really wins BLEU over the
base, really raises the general-text loss and really breaks a canary the base passes; evaluated by the
real evaluation stage and registered into a real sqlite MLflow store, it becomes challenger only, and
the decision and the model card name the reason.

The rule itself (numbers in, verdict out) is table-tested in tests/test_promotion.py with fabricated
reports; here every number comes from the model. Each test also shows that the same evaluation would
have promoted the adapter without the failing gate, so it fails for that reason and no other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.demo_assets import COPY_INSTRUCTION

# The demo base was pretrained to repeat a sentence when asked (tasks.demo_assets.pretrain_copying);
# the adapter, trained only to translate into Zorbish, answers that request in Zorbish too.
COPY_SENTENCE = "king child white"
COPY_CANARY = {"name": "still repeats a sentence when asked", "prompt": f"{COPY_INSTRUCTION}\n\n{COPY_SENTENCE}",
               "expect": {"exact": COPY_SENTENCE}}


@pytest.fixture(scope="module")
def gate_reports(trained, demo_assets, tmp_path_factory):
    """The shared adapter evaluated twice on the demo eval rows and the demo general text: without canaries,
    and with the copy canary plus a demo canary it passes. {"plain": report, "canaries": report}."""
    from tasks.evaluate import evaluate_adapter

    config, plan, splits, result = trained
    folder = tmp_path_factory.mktemp("gates")
    passing = {"name": "answers in Zorbish, not English", "prompt": "Rewrite this in Zorbish.\n\nthe red cat runs",
               "expect": {"regex": r"^(?!.*\b(the|red|cat|runs)\b)\S"}}
    canaries = folder / "canaries.yaml"
    canaries.write_text(json.dumps([COPY_CANARY, passing]))  # JSON is YAML
    reports = {}
    for name, canary_file in (("plain", None), ("canaries", canaries)):
        eval_config = config.model_copy(deep=True)
        eval_config.evaluation.general_text = demo_assets.general_text_path
        eval_config.evaluation.canaries = canary_file
        reports[name] = evaluate_adapter(eval_config, plan, splits, result.adapter_dir)
    return reports


def general_text_increase(report) -> float:
    return report.systems["adapter"]["general_text_loss"] - report.systems["base"]["general_text_loss"]


def assert_wins_bleu(report) -> None:
    bleu = report.comparisons["adapter_vs_base"]["bleu"]
    assert bleu["delta"] > 0 and bleu["significant"], f"the adapter must really win BLEU: {bleu}"


def register_as(registry_config, report, forgetting: float):
    """Register the shared adapter with `report` under a forgetting tolerance; (result, version, config)."""
    from mlflow import MlflowClient

    from tasks.register import register_adapter

    config = registry_config
    config.registry.log_input_example = False  # test_register's fresh-process test covers loading
    config.registry.guard_metrics = {**config.registry.guard_metrics, "forgetting": forgetting}
    result = register_adapter(config, Path(report.adapter_dir), report)
    uri = config.registry.tracking_uri
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(result.name, result.version)
    return result, version, config


def aliases(config) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = config.registry.tracking_uri
    model = MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model(config.registry.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_an_adapter_that_wins_bleu_but_forgets_general_text_stays_challenger(gate_reports, registry_config):
    from tasks.promotion import decide_promotion

    report = gate_reports["plain"]
    assert_wins_bleu(report)
    increase = general_text_increase(report)
    assert increase > 0, "the adapter must really raise the loss on the general text for this test to mean anything"

    # Tolerating half the rise it really has: blocked, and named.
    result, version, config = register_as(registry_config, report, forgetting=increase / 2)
    assert (result.version, result.promoted, result.aliases) == ("1", False, ["challenger"])
    assert aliases(config) == {"challenger": "1"}, "no champion may appear"
    (reason,) = [r for r in result.decision["reasons"] if r.startswith("guard forgetting")]
    assert f"general_text_loss rises {increase:.4f} vs base" in reason
    assert version.tags["decision"] == "keep challenger" and reason in version.tags["decision.reasons"]
    assert float(version.tags["decision.guard_forgetting_increase_vs_base"]) == pytest.approx(increase, rel=1e-4)
    card = version.description
    assert "**challenger** only (not promoted)" in card and f"  - {reason}" in card
    assert f"- **Forgetting:** mean token loss on `{report.general_text['path']}`" in card
    assert f"delta {increase:+.4f} (lower is better)" in card

    # The same evaluation, tolerating twice the rise: every other gate holds, so it is promoted.
    config.registry.guard_metrics["forgetting"] = 2 * increase
    counterfactual = decide_promotion(report.to_dict(), config.registry, has_champion=False)
    assert counterfactual.promote, counterfactual.reasons


def test_an_adapter_that_wins_bleu_but_breaks_a_canary_stays_challenger(gate_reports, trained, registry_config):
    from tasks.data import render_prompt
    from tasks.generation import generate
    from tasks.modeling import load_base_model, load_tokenizer, release_memory
    from tasks.promotion import decide_promotion

    report = gate_reports["canaries"]
    assert_wins_bleu(report)
    results = {r["name"]: r for r in report.canaries["results"]}
    broken = results[COPY_CANARY["name"]]
    assert not broken["passed"] and broken["output"] != COPY_SENTENCE
    assert all(r["passed"] for name, r in results.items() if name != COPY_CANARY["name"])
    # the canary asks for what the base does: it is the adapter that broke it
    config, plan, _, _ = trained
    tokenizer = load_tokenizer(config)
    base = load_base_model(config, plan)
    try:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": COPY_CANARY["prompt"]}])
        (base_answer,) = generate(base, tokenizer, [prompt], config.evaluation.max_new_tokens)
    finally:
        base = None
        release_memory()
    assert base_answer == COPY_SENTENCE

    # The forgetting guard holds (twice the real rise tolerated): the canary alone blocks promotion.
    result, version, config = register_as(registry_config, report, forgetting=2 * general_text_increase(report))
    assert (result.version, result.promoted, result.aliases) == ("1", False, ["challenger"])
    assert aliases(config) == {"challenger": "1"}
    assert f"1 of 2 canaries failed: '{COPY_CANARY['name']}'" in result.decision["reasons"]
    assert not any(r.startswith("guard forgetting: general_text_loss rises") for r in result.decision["reasons"])
    assert version.tags["decision"] == "keep challenger" and version.tags["eval.canaries_failed"] == "1"
    card = version.description
    assert "**challenger** only (not promoted)" in card
    assert f"  - 1 of 2 canaries failed: '{COPY_CANARY['name']}'" in card
    assert "1 of 2 passed; failed:" in card
    assert f"- {COPY_CANARY['name']}: expected exact `{COPY_SENTENCE}`, got `" in card

    # The same adapter, the same answers, evaluated without canaries, under the same gates: promoted.
    assert gate_reports["plain"].outputs == report.outputs
    counterfactual = decide_promotion(gate_reports["plain"].to_dict(), config.registry, has_champion=False)
    assert counterfactual.promote, counterfactual.reasons
