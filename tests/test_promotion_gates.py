"""The promotion gates end to end, on the demo's own general text, canaries and tolerance.

The shared short run trains on the Zorbish rows alone (`data.path`): the narrow variant of the demo, which
drops the demo config's replay of the base's copy task. Its real adapter really wins BLEU over the base,
really raises the loss on the general text (held-out copy conversations) above the demo's tolerance and
really breaks the copy canary the base passes; evaluated by the real evaluation stage and registered into a
real sqlite MLflow store, it becomes challenger only, and the decision and the model card name the reason.
The demo as configured (with the replay) keeps the skill and passes both gates.

The rule itself (numbers in, verdict out) is table-tested in tests/test_promotion.py with fabricated
reports; here every number comes from the model. Each test also shows that the same evaluation would
have promoted the adapter without the failing gate, so it fails for that reason and no other.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.schema import load_config
from tasks.demo_assets import COPY_CANARY_SENTENCE
from tests.conftest import DEMO_CONFIG, SHORT_TRAINING

COPY_CANARY = "still repeats a sentence when asked"  # the demo canary of the base's own skill
DEMO_FORGETTING = load_config(DEMO_CONFIG).registry.guard_metrics["forgetting"]


@pytest.fixture(scope="module")
def gate_reports(trained, demo_assets, tmp_path_factory):
    """The shared adapter evaluated twice on the demo eval rows and the demo general text: without canaries,
    and with two of the demo's canaries, the copy canary and one the short run passes (160 steps do not
    teach it every Zorbish word the others ask for). {"plain": report, "canaries": report}."""
    import yaml

    from tasks.evaluate import evaluate_adapter

    config, plan, splits, result = trained
    kept = [c for c in yaml.safe_load(demo_assets.canaries_path.read_text())
            if c["name"] in (COPY_CANARY, "answers in Zorbish, not English")]
    assert len(kept) == 2
    canaries = tmp_path_factory.mktemp("gates") / "canaries.yaml"
    canaries.write_text(yaml.safe_dump(kept))
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
    assert increase > DEMO_FORGETTING, "the narrow adapter must really forget more than the demo tolerates"

    # Under the demo's own tolerance: blocked, and named.
    result, version, config = register_as(registry_config, report, forgetting=DEMO_FORGETTING)
    assert (result.version, result.promoted, result.aliases) == ("1", False, ["challenger"])
    assert aliases(config) == {"challenger": "1"}, "no champion may appear"
    (reason,) = [r for r in result.decision["reasons"] if r.startswith("guard forgetting")]
    assert f"general_text_loss rises {increase:.4f} vs base" in reason
    assert version.tags["decision"] == "keep challenger" and reason in version.tags["decision.reasons"]
    assert float(version.tags["decision.guard_forgetting_increase_vs_base"]) == pytest.approx(increase, rel=1e-4)
    card = version.description
    assert "**challenger** only (not promoted)" in card and f"  - {reason}" in card
    assert f"- **Forgetting:** mean token loss on `{report.general_text['path']}` (100 conversations, loss on " \
           "the responses)" in card
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
    broken = results[COPY_CANARY]
    assert not broken["passed"] and broken["output"] != COPY_CANARY_SENTENCE
    assert all(r["passed"] for name, r in results.items() if name != COPY_CANARY), results
    # the canary asks for what the base does: it is the adapter that broke it
    config, plan, _, _ = trained
    tokenizer = load_tokenizer(config)
    base = load_base_model(config, plan)
    try:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": broken["prompt"]}])
        (base_answer,) = generate(base, tokenizer, [prompt], config.evaluation.max_new_tokens)
    finally:
        base = None
        release_memory()
    assert base_answer == COPY_CANARY_SENTENCE

    # The forgetting guard holds (twice the real rise tolerated): the canary alone blocks promotion.
    total = len(results)
    result, version, config = register_as(registry_config, report, forgetting=2 * general_text_increase(report))
    assert (result.version, result.promoted, result.aliases) == ("1", False, ["challenger"])
    assert aliases(config) == {"challenger": "1"}
    assert f"1 of {total} canaries failed: '{COPY_CANARY}'" in result.decision["reasons"]
    assert not any(r.startswith("guard forgetting: general_text_loss rises") for r in result.decision["reasons"])
    assert version.tags["decision"] == "keep challenger" and version.tags["eval.canaries_failed"] == "1"
    card = version.description
    assert "**challenger** only (not promoted)" in card
    assert f"  - 1 of {total} canaries failed: '{COPY_CANARY}'" in card
    assert f"{total - 1} of {total} passed; failed:" in card
    assert f"- {COPY_CANARY}: expected exact `{COPY_CANARY_SENTENCE}`, got `" in card

    # The same adapter, the same answers, evaluated without canaries, under the same gates: promoted.
    assert gate_reports["plain"].outputs == report.outputs
    counterfactual = decide_promotion(gate_reports["plain"].to_dict(), config.registry, has_champion=False)
    assert counterfactual.promote, counterfactual.reasons


def test_the_demo_with_its_replay_keeps_the_skill_and_passes_both_gates(demo_assets, gate_reports,
                                                                        tmp_path) -> None:
    """The demo config as shipped (Zorbish plus a quarter of copy replay), trained as long as the shared run:
    it wins BLEU, its general-text loss stays within the demo's tolerance and the same two canaries pass, so
    the gate promotes it. The narrow run above differs only in leaving out the replay. (`make demo`'s 400
    steps also pass the two word canaries: README, "Evaluation".)"""
    from tasks.data import load_splits
    from tasks.evaluate import evaluate_adapter
    from tasks.gpu import check_gpu
    from tasks.promotion import decide_promotion
    from tasks.train import train

    assets = demo_assets.data_path.parent.resolve()
    config = load_config(DEMO_CONFIG, [
        f"data.sources=[{{path: {assets / 'demo.jsonl'}, weight: 3}}, "
        f"{{path: {assets / 'replay.jsonl'}, weight: 1, eval_fraction: 0}}]",
        f"model.name_or_path={demo_assets.model_dir.resolve()}", f"training.output_dir={tmp_path / 'out'}",
        f"evaluation.general_text={demo_assets.general_text_path.resolve()}",
        f"evaluation.canaries={gate_reports['canaries'].canaries['path']}", *SHORT_TRAINING])
    splits = load_splits(config.data)
    assert {e.source for e in splits.eval} == {str(assets / "demo.jsonl")}, "the replay only trains"
    _, plan = check_gpu(config)
    result = train(config, plan, splits)
    report = evaluate_adapter(config, plan, splits, result.adapter_dir)

    assert_wins_bleu(report)
    assert general_text_increase(report) < DEMO_FORGETTING, report.forgetting_markdown()
    assert report.canaries["failed"] == 0, report.canaries
    decision = decide_promotion(report.to_dict(), config.registry, has_champion=False)
    assert decision.promote, decision.reasons
