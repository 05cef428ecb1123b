"""The promotion rule: does a newly registered adapter take the `champion` alias? Pure: numbers in, verdict out.

The adapter must beat the base on `registry.primary_metric` with the paired bootstrap saying
significant, and no guard may fail against the base: a text metric (BLEU, ROUGE, chrF, exact match;
higher is better) may drop by at most its tolerance in points, and `forgetting` (the mean token loss
on the general text, lower is better) may rise by at most its tolerance. When a champion exists it
must also beat the champion the same way, using the evaluation's `adapter_vs_champion` comparison;
an evaluation that did not compare against the champion cannot promote. An evaluation that provably
compared against another version than the one holding the champion alias now is stale and cannot
promote either.

Two more gates, whatever the metrics say: the adapter's runaway share (answers that hit
max_new_tokens without a stop token) must be at most `registry.max_runaway_share` and no worse than
the champion's, and every canary check the evaluation ran must pass.

Every reason, for or against, is kept in the decision: registration writes them into the version's
tags and model card.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from configs.schema import LOSS_GUARDS, RegistryConfig
from tasks.formatting import format_p_value


@dataclass
class PromotionDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_finite(value: Any) -> float | None:
    """The value as a float when it is a finite number (not a bool, a string, NaN or infinity), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _significant(comparison: dict[str, Any], level: float) -> bool:
    if "significant" in comparison and comparison["significant"] is not None:
        return bool(comparison["significant"])
    p_value = as_finite(comparison.get("p_value"))
    return p_value is not None and p_value < level


def _beats(label: str, comparison: dict[str, Any] | None, metric: str, level: float,
           numbers: dict[str, Any], reasons: list[str]) -> bool:
    """Does the adapter beat `label` on `metric`, significantly? Records the numbers and the why."""
    if not comparison:
        reasons.append(f"the evaluation has no paired comparison adapter vs {label} on {metric}; cannot promote")
        return False
    delta = as_finite(comparison.get("delta"))
    p_value = as_finite(comparison.get("p_value"))
    numbers[f"{metric}_delta_vs_{label}"] = delta
    numbers[f"{metric}_p_value_vs_{label}"] = p_value
    for bound in ("ci_low", "ci_high"):
        numbers[f"{metric}_{bound}_vs_{label}"] = as_finite(comparison.get(bound))
    significant = _significant(comparison, level)
    if delta is None:
        reasons.append(f"{metric} delta vs {label} is missing or not a number; cannot promote")
        return False
    if delta <= 0:
        reasons.append(f"{metric} does not beat {label}: {delta:+.2f} points")
        return False
    if not significant:
        reasons.append(f"{metric} gain over {label} ({delta:+.2f} points) is not significant "
                       f"(p={format_p_value(p_value)}, level {level})")
        return False
    reasons.append(f"{metric} beats {label} by {delta:+.2f} points (p={format_p_value(p_value)}, "
                   f"significant at {level})")
    return True


def _guards_hold(label: str, adapter: dict[str, Any], other: dict[str, Any] | None,
                 comparisons: dict[str, Any], guards: dict[str, float], numbers: dict[str, Any],
                 reasons: list[str]) -> bool:
    """No guard worse than `label` by more than its tolerance (a missing score fails the guard).

    Text metrics are higher-is-better: the guard fails when the adapter drops more than `tolerance`
    points. Loss guards (`LOSS_GUARDS`, e.g. forgetting) are lower-is-better: the guard fails when the
    adapter's loss rises more than `tolerance`."""
    ok = True
    for metric, tolerance in guards.items():
        if metric in LOSS_GUARDS:
            ok = _loss_guard_holds(label, metric, LOSS_GUARDS[metric], tolerance, adapter, other, numbers,
                                   reasons) and ok
            continue
        delta = None
        mine, theirs = as_finite(adapter.get(metric)), as_finite((other or {}).get(metric))
        if mine is not None and theirs is not None:
            delta = mine - theirs
        elif isinstance(comparisons.get(metric), dict):
            delta = as_finite(comparisons[metric].get("delta"))
        numbers[f"guard_{metric}_delta_vs_{label}"] = delta
        if delta is None:
            reasons.append(f"guard {metric}: no score for adapter vs {label}; cannot promote")
            ok = False
        elif delta < -tolerance:
            reasons.append(f"guard {metric} drops {-delta:.2f} points vs {label} (tolerance {tolerance})")
            ok = False
    return ok


def _loss_guard_holds(label: str, guard: str, score: str, tolerance: float, adapter: dict[str, Any],
                      other: dict[str, Any] | None, numbers: dict[str, Any], reasons: list[str]) -> bool:
    """A lower-is-better guard: the adapter's `score` may exceed `label`'s by at most `tolerance`."""
    mine, theirs = as_finite(adapter.get(score)), as_finite((other or {}).get(score))
    increase = mine - theirs if mine is not None and theirs is not None else None
    numbers[f"guard_{guard}_increase_vs_{label}"] = increase
    if increase is None:
        reasons.append(f"guard {guard}: no {score} for adapter vs {label} (set evaluation.general_text); "
                       "cannot promote")
        return False
    if increase > tolerance:
        reasons.append(f"guard {guard}: {score} rises {increase:.4f} vs {label} ({theirs:.4f} -> {mine:.4f}; "
                       f"tolerance {tolerance})")
        return False
    reasons.append(f"guard {guard}: {score} changes {increase:+.4f} vs {label} (tolerance {tolerance})")
    return True


def _runaway_ok(adapter: dict[str, Any], champion: dict[str, Any] | None, has_champion: bool, limit: float,
                numbers: dict[str, Any], reasons: list[str]) -> bool:
    """At most `limit` of the adapter's answers ran into max_new_tokens, and no more than the champion's."""
    share = as_finite(adapter.get("runaway_share"))
    numbers["runaway_share_adapter"] = share
    numbers["max_runaway_share"] = limit
    if share is None:
        reasons.append("the evaluation has no runaway share for the adapter; cannot promote")
        return False
    if share > limit:
        reasons.append(f"runaway answers: {share:.1%} of the adapter's answers hit max_new_tokens without a stop "
                       f"token (limit registry.max_runaway_share = {limit:.1%})")
        return False
    champion_share = as_finite((champion or {}).get("runaway_share")) if has_champion else None
    numbers["runaway_share_champion"] = champion_share
    if champion_share is not None and share > champion_share:
        reasons.append(f"runaway answers: {share:.1%} of the adapter's answers hit max_new_tokens, worse than the "
                       f"champion's {champion_share:.1%}")
        return False
    return True


def _canaries_pass(canaries: dict[str, Any] | None, numbers: dict[str, Any], reasons: list[str]) -> bool:
    """Every canary check the evaluation ran passed (no canaries configured: nothing to fail)."""
    results = (canaries or {}).get("results") or []
    failed = [r for r in results if not r.get("passed")]
    numbers["canaries_run"] = len(results)
    numbers["canaries_failed"] = len(failed)
    if failed:
        shown = "; ".join(f"{r.get('name') or r.get('prompt')!r}" for r in failed[:5])
        reasons.append(f"{len(failed)} of {len(results)} canaries failed: {shown}")
        return False
    if results:
        reasons.append(f"all {len(results)} canaries passed")
    return True


def compared_champion_version(eval_report: dict[str, Any]) -> str | None:
    """Which registered version the evaluation compared against, when its champion path says so:
    `<...>/<name>-v<N>` (tasks.registry.download_adapter's folder) or `models:/<name>/<N>`."""
    source = str(eval_report.get("champion_adapter") or "")
    match = re.search(r"-v(\d+)/?$", source) or re.match(r"^models:/[^/@]+/(\d+)/?$", source)
    return match.group(1) if match else None


def decide_promotion(eval_report: dict[str, Any], registry_config: RegistryConfig,
                     has_champion: bool, champion_version: str | None = None) -> PromotionDecision:
    """Promote when the adapter significantly beats base (and the champion, if one exists) on the
    primary metric, no guard fails, its runaway share is within limits and every canary passed.

    `champion_version`, when given, is the version holding the champion alias now; an evaluation that
    provably compared against another version is stale and cannot promote."""
    primary = registry_config.primary_metric
    guards = dict(registry_config.guard_metrics)
    level = as_finite(eval_report.get("significance_level"))
    level = 0.05 if level is None else level
    systems = eval_report.get("systems") or {}
    comparisons = eval_report.get("comparisons") or {}
    adapter, base, champion = systems.get("adapter"), systems.get("base"), systems.get("champion")
    numbers: dict[str, Any] = {"primary_metric": primary, "significance_level": level, "has_champion": has_champion}
    reasons: list[str] = []
    if not adapter or not base:
        return PromotionDecision(False, ["the evaluation report has no base and adapter scores; cannot promote"],
                                 numbers)
    for label, scores in (("base", base), ("adapter", adapter), ("champion", champion)):
        if scores:
            numbers[f"{primary}_{label}"] = as_finite(scores.get(primary))

    vs_base = comparisons.get("adapter_vs_base") or {}
    ok = _beats("base", vs_base.get(primary), primary, level, numbers, reasons)
    ok = _guards_hold("base", adapter, base, vs_base, guards, numbers, reasons) and ok
    ok = _runaway_ok(adapter, champion, has_champion, registry_config.max_runaway_share, numbers, reasons) and ok
    ok = _canaries_pass(eval_report.get("canaries"), numbers, reasons) and ok
    if has_champion:
        vs_champion = comparisons.get("adapter_vs_champion")
        if not vs_champion:
            reasons.append("a champion exists but the evaluation did not compare against it; not promoted "
                           "(evaluate with the champion adapter, which the flow does by default)")
            ok = False
        else:
            ok = _beats("champion", vs_champion.get(primary), primary, level, numbers, reasons) and ok
            ok = _guards_hold("champion", adapter, champion, vs_champion, guards, numbers, reasons) and ok
            compared = compared_champion_version(eval_report)
            if champion_version is not None and compared is not None and compared != str(champion_version):
                reasons.append(f"the evaluation compared against version {compared}, but the champion is now "
                               f"version {champion_version}; not promoted (evaluate against the current champion)")
                ok = False
    else:
        reasons.append("no champion yet: the first promotion needs only to beat the base")
    return PromotionDecision(ok, reasons, numbers)
