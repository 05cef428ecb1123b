"""The data contract's verdict: `ValidationResult` (machine-readable and a markdown report) and the gate.

Kept apart from the reading and the GX suite so that the flow, the CLI and tests can hold, pickle and
print a result without importing pandas or GX.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.data import DataError
from tasks.json_values import JsonDataclass


class DataValidationError(DataError):
    """The data contract failed; the message names the failed expectations and holds the summary."""

    def __init__(self, result: ValidationResult):
        self.result = result
        failed = ", ".join(result.failed_names()) or "none"
        super().__init__(f"data validation failed: {failed}\n\n{result.markdown()}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by Prefect with the failed state: rebuild from the result
        return (type(self), (self.result,))


@dataclass
class ValidationResult(JsonDataclass):
    """The suite's verdict: machine-readable (`to_dict`, read back by `from_json`) and for people (`markdown`)."""

    READ_ERROR = DataError
    WRITTEN_BY = "qlora validate --json > FILE"

    success: bool
    fingerprint: str
    format: str
    row_counts: dict[str, int]
    expectations: list[dict[str, Any]]
    sources: list[str] = field(default_factory=list)
    data_docs: str | None = None
    duration_s: float = 0.0
    gx_version: str = ""

    def failed_names(self) -> list[str]:
        return [e["name"] for e in self.expectations if not e["success"]]

    def expectation(self, name: str) -> dict[str, Any]:
        for item in self.expectations:
            if item["name"] == name:
                return item
        raise KeyError(f"no expectation named {name!r}; have {[e['name'] for e in self.expectations]}")

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def markdown(self) -> str:
        failed = self.failed_names()
        verdict = "passed" if self.success else f"FAILED ({len(failed)} of {len(self.expectations)} checks)"
        counts = f"{self.row_counts.get('rows', 0)} (train {self.row_counts.get('train', 0)}, " \
                 f"eval {self.row_counts.get('eval', 0)})"
        lines = [
            f"### Data contract {verdict}",
            "",
            f"data: {', '.join(f'`{s}`' for s in self.sources)} · format `{self.format}` · rows: {counts} · "
            f"fingerprint `{self.fingerprint}`",
            "",
            "| check | result | observed | expected | examples |",
            "|---|---|---|---|---|",
        ]
        for item in self.expectations:
            examples = "; ".join(_example_text(example) for example in item["examples"])
            cells = [f"`{item['name']}`", "pass" if item["success"] else "**FAIL**", item["observed"],
                     item["expected"], examples]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if self.data_docs:
            lines += ["", f"Great Expectations Data Docs: {self.data_docs}"]
        return "\n".join(lines)


def require_valid(result: ValidationResult) -> ValidationResult:
    """The gate: the result itself when the suite passed, else DataValidationError."""
    if not result.success:
        raise DataValidationError(result)
    return result



def json_safe(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN to None, paths to str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _example_text(example: dict[str, Any]) -> str:
    where = f"line {example['line']}" if example.get("line") is not None else f"row {example.get('row')}"
    if example.get("row") is None and example.get("line") is None:
        where = Path(str(example.get("source"))).name
    return f"{where}: {example['detail']}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
