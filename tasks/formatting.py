"""How statistics are shown to people: one format for every report, card and message.

The evaluation report (Prefect artifact, eval_report.md), the model card and the promotion reasons
print the same p-values; with one formatter they cannot drift apart (a raw float such as
0.000999000999000999 in one and 0.0010 in the other). Kept free of heavy imports so the registry
code can use it without loading the metric libraries.
"""

from __future__ import annotations

P_VALUE_FORMAT = ".4f"  # bootstrap p-values are multiples of 1/(resamples + 1): four places show them


def format_p_value(p_value: float | None) -> str:
    """A p-value for a report: four decimals (0.0010), or "n/a" when there is none."""
    return "n/a" if p_value is None else format(p_value, P_VALUE_FORMAT)
