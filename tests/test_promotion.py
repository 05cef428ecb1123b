"""The promotion rule (tasks.promotion), table-tested on constructed evaluation reports.

Each row is one situation a registration meets: the report's numbers (tests.conftest.make_eval_report:
base BLEU 2, adapter BLEU 80 and a significant paired comparison unless a row says otherwise), whether
a champion holds the alias and which version, the registry settings, and the verdict with its reason.
"""

from __future__ import annotations

import pytest

from configs.schema import RegistryConfig
from tasks.promotion import compared_champion_version, decide_promotion
from tests.conftest import make_eval_report

CHAMPION_V3_FOLDER = {"champion_adapter": "/out/champion/demo-qlora-adapter-v3"}
CHAMPION_V3_URI = {"champion_adapter": "models:/demo-qlora-adapter/3"}

# id: (report numbers, other report fields, has champion, champion version now, registry settings,
#      promote?, a reason that must be given)
CASES = {
    "first version beats base significantly": (
        {}, {}, False, None, {}, True, "bleu beats base by +78.00 points (p=0.0010, significant at 0.05)"),
    "first version: only the base counts": (
        {}, {}, False, None, {}, True, "no champion yet: the first promotion needs only to beat the base"),
    "gain over base not significant": ({"significant": False}, {}, False, None, {}, False, "is not significant"),
    "worse than base": ({"adapter": 1.5}, {}, False, None, {}, False, "bleu does not beat base: -0.50 points"),
    "guard drops beyond its tolerance": (
        {"rouge_drop": 80.0}, {}, False, None, {}, False, "guard rougeL drops 2.00 points vs base (tolerance 1.0)"),
    "guard drop exactly at the tolerance holds": (
        {"rouge_drop": 79.0}, {}, False, None, {"guard_metrics": {"rougeL": 1.0}}, True, "bleu beats base"),
    "guard drop beyond a tighter configured tolerance": (
        {"rouge_drop": 79.0}, {}, False, None, {"guard_metrics": {"rougeL": 0.5}}, False,
        "guard rougeL drops 1.00 points vs base (tolerance 0.5)"),
    "primary metric the evaluation did not compare": (
        {}, {}, False, None, {"primary_metric": "rouge1"}, False,
        "no paired comparison adapter vs base on rouge1"),
    "champion beaten": ({"champion": 70.0}, {}, True, "1", {}, True, "bleu beats champion by +10.00 points"),
    "champion not beaten": ({"champion": 85.0}, {}, True, "1", {}, False, "bleu does not beat champion: -5.00"),
    "champion beaten, not significantly": (
        {"champion": 79.0, "significant_vs_champion": False}, {}, True, "1", {}, False,
        "bleu gain over champion (+1.00 points) is not significant"),
    "guard drops against the champion": (
        {"champion": 70.0, "rouge_drop": 12.0}, {}, True, "1", {}, False,
        "guard rougeL drops 2.00 points vs champion"),
    "champion exists but was not compared": (
        {"champion": 70.0, "vs_champion": False}, {}, True, "1", {}, False,
        "a champion exists but the evaluation did not compare against it"),
    "champion compared is the current one (downloaded folder)": (
        {"champion": 60.0}, CHAMPION_V3_FOLDER, True, "3", {}, True, "bleu beats champion"),
    "stale champion version (downloaded folder)": (
        {"champion": 60.0}, CHAMPION_V3_FOLDER, True, "4", {}, False,
        "the evaluation compared against version 3, but the champion is now version 4"),
    "stale champion version (registry URI)": (
        {"champion": 60.0}, CHAMPION_V3_URI, True, "4", {}, False, "compared against version 3"),
    "champion version the evaluation does not name: judged on the numbers": (
        {"champion": 60.0}, {}, True, "4", {}, True, "bleu beats champion"),
    "runaway share above the limit": (
        {"runaway": 0.10}, {}, False, None, {}, False,
        "runaway answers: 10.0% of the adapter's answers hit max_new_tokens without a stop token "
        "(limit registry.max_runaway_share = 5.0%)"),
    "runaway share at the limit holds": ({"runaway": 0.05}, {}, False, None, {}, True, "bleu beats base"),
    "runaway share under a looser configured limit": (
        {"runaway": 0.10}, {}, False, None, {"max_runaway_share": 0.2}, True, "bleu beats base"),
    "runaway share worse than the champion's": (
        {"champion": 70.0, "runaway": 0.04, "champion_runaway": 0.01}, {}, True, "1", {}, False,
        "worse than the champion's 1.0%"),
    "runaway share equal to the champion's holds": (
        {"champion": 70.0, "runaway": 0.02, "champion_runaway": 0.02}, {}, True, "1", {}, True,
        "bleu beats champion"),
    "forgetting: general-text loss rises beyond its tolerance": (
        {"general_text_loss": (2.0, 2.5)}, {}, False, None, {"guard_metrics": {"forgetting": 0.1}}, False,
        "guard forgetting: general_text_loss rises 0.5000 vs base (2.0000 -> 2.5000; tolerance 0.1)"),
    "forgetting: a loss increase within the tolerance holds": (
        {"general_text_loss": (2.0, 2.05)}, {}, False, None, {"guard_metrics": {"forgetting": 0.1}}, True,
        "guard forgetting: general_text_loss changes +0.0500 vs base (tolerance 0.1)"),
    "forgetting: a lower loss is never a failure (lower is better)": (
        {"general_text_loss": (2.0, 1.2)}, {}, False, None, {"guard_metrics": {"forgetting": 0.0}}, True,
        "general_text_loss changes -0.8000 vs base"),
    "forgetting guard without a general-text loss": (
        {"general_text_loss": None}, {}, False, None, {"guard_metrics": {"forgetting": 0.1}}, False,
        "guard forgetting: no general_text_loss for adapter vs base"),
    "forgetting against the champion": (
        {"champion": 70.0, "general_text_loss": (2.0, 2.05), "champion_general_text_loss": 1.9}, {}, True, "1",
        {"guard_metrics": {"forgetting": 0.1}}, False, "general_text_loss rises 0.1500 vs champion"),
    "a canary fails": ({"canary_failures": 1}, {}, False, None, {}, False, "1 of 3 canaries failed: 'canary 0'"),
    "every canary passes": ({}, {}, False, None, {}, True, "all 3 canaries passed"),
    "chrF as the primary metric": ({}, {}, False, None, {"primary_metric": "chrf"}, False,
                                   "no paired comparison adapter vs base on chrf"),
    "exact match as a guard": (
        {"adapter": 70.0}, {}, False, None, {"guard_metrics": {"exact_match": 1.0}}, True, "bleu beats base"),
}


@pytest.mark.parametrize(("numbers", "fields", "has_champion", "champion_version", "settings", "promote", "reason"),
                         list(CASES.values()), ids=list(CASES))
def test_promotion_rule(numbers, fields, has_champion, champion_version, settings, promote, reason) -> None:
    report = {**make_eval_report(**numbers), **fields}
    registry = RegistryConfig(**settings)
    decision = decide_promotion(report, registry, has_champion=has_champion, champion_version=champion_version)
    assert decision.promote is promote, decision.reasons
    assert any(reason in r for r in decision.reasons), decision.reasons
    # the numbers behind the verdict are recorded with it (they become the version's decision.* tags)
    assert decision.numbers["primary_metric"] == registry.primary_metric
    assert decision.numbers["has_champion"] is has_champion
    comparison = report["comparisons"]["adapter_vs_base"].get(registry.primary_metric)
    if comparison:
        assert decision.numbers[f"{registry.primary_metric}_delta_vs_base"] == comparison["delta"]


def test_exact_match_guard_drop_is_caught() -> None:
    report = make_eval_report()
    report["systems"]["adapter"]["exact_match"] = report["systems"]["base"]["exact_match"] - 5.0
    decision = decide_promotion(report, RegistryConfig(guard_metrics={"exact_match": 1.0}), has_champion=False)
    assert not decision.promote
    assert "guard exact_match drops 5.00 points vs base (tolerance 1.0)" in decision.reasons


def test_chrf_and_exact_match_can_be_the_primary_metric() -> None:
    for metric in ("chrf", "exact_match"):
        report = make_eval_report()
        report["comparisons"]["adapter_vs_base"][metric] = {"delta": 30.0, "ci_low": 20.0, "ci_high": 40.0,
                                                            "p_value": 0.001, "significant": True}
        decision = decide_promotion(report, RegistryConfig(primary_metric=metric), has_champion=False)
        assert decision.promote, decision.reasons
        assert f"{metric} beats base by +30.00 points (p=0.0010, significant at 0.05)" in decision.reasons


def test_guard_metrics_are_checked_by_the_schema() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="guard_metrics"):
        RegistryConfig(guard_metrics={"rouge_l": 1.0})
    with pytest.raises(ValidationError, match="must be >= 0"):
        RegistryConfig(guard_metrics={"forgetting": -0.1})
    with pytest.raises(ValidationError, match="primary_metric"):
        RegistryConfig(primary_metric="forgetting")


def test_a_report_without_scores_never_promotes() -> None:
    for report in ({}, {"systems": {}}, {"systems": {"adapter": {"bleu": 90.0}}}):
        decision = decide_promotion(report, RegistryConfig(), has_champion=False)
        assert not decision.promote and "no base and adapter scores" in decision.reasons[0]


def test_a_number_that_is_not_finite_never_promotes() -> None:
    report = make_eval_report()
    report["comparisons"]["adapter_vs_base"]["bleu"]["delta"] = float("nan")
    decision = decide_promotion(report, RegistryConfig(), has_champion=False)
    assert not decision.promote and any("not a number" in r for r in decision.reasons)


@pytest.mark.parametrize(("source", "version"), [
    ("/out/champion/demo-qlora-adapter-v3", "3"),
    ("/out/champion/demo-qlora-adapter-v12/", "12"),
    ("models:/demo-qlora-adapter/7", "7"),
    ("models:/demo-qlora-adapter@champion", None),  # an alias names no version
    ("/some/adapter", None),
    (None, None),
])
def test_the_compared_champion_version_is_read_from_the_report(source, version) -> None:
    assert compared_champion_version({"champion_adapter": source}) == version
