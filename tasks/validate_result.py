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
    """The suite's verdict: machine-readable (`to_dict`, read back by `from_json`) and for people (`markdown`).

    With `data.sources` the suite runs once per source: `sections` holds each source's own result
    (with its `weight`, and `row_counts["mixed"]`, its rows in the mixed train set), and the result
    itself is the mix's: its fingerprint and row counts as training loads it, passed when every
    source passed.
    """

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
    weight: float | None = None  # a section's: its source's weight in data.sources
    sections: list[ValidationResult] = field(default_factory=list)  # one per data.sources entry

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationResult:
        sections = [cls.from_dict(section) for section in data.get("sections") or []]
        return cls(**{**data, "sections": sections})

    def failed_names(self) -> list[str]:
        """Failed checks; a source's are named `<source path>: <check>`."""
        own = [e["name"] for e in self.expectations if not e["success"]]
        return own + [f"{section.sources[0]}: {name}" for section in self.sections for name in section.failed_names()]

    def expectation(self, name: str) -> dict[str, Any]:
        for item in self.expectations:
            if item["name"] == name:
                return item
        raise KeyError(f"no expectation named {name!r}; have {[e['name'] for e in self.expectations]}")

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def markdown(self) -> str:
        if self.sections:
            return self._mixed_markdown()
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
            *self._table(),
        ]
        if self.data_docs:
            lines += ["", f"Great Expectations Data Docs: {self.data_docs}"]
        return "\n".join(lines)

    def _table(self) -> list[str]:
        lines = ["| check | result | observed | expected | examples |", "|---|---|---|---|---|"]
        for item in self.expectations:
            examples = "; ".join(_example_text(example) for example in item["examples"])
            cells = [f"`{item['name']}`", "pass" if item["success"] else "**FAIL**", item["observed"],
                     item["expected"], examples]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        return lines

    def _mixed_markdown(self) -> str:
        """The mix in one line, then each source's section: its verdict, counts, fingerprint and checks."""
        failing = [section.sources[0] for section in self.sections if not section.success]
        verdict = "passed" if self.success else \
            f"FAILED ({len(failing)} of {len(self.sections)} sources: {', '.join(f'`{s}`' for s in failing)})"
        shares = ", ".join(f"`{part.sources[0]}` {part.row_counts.get('mixed', '?')}" for part in self.sections)
        lines = [
            f"### Data contract {verdict}",
            "",
            f"{len(self.sections)} sources mixed by weight · format `{self.format}` · train rows "
            f"{self.row_counts.get('train', 0)} ({shares}), eval rows {self.row_counts.get('eval', 0)} · "
            f"fingerprint `{self.fingerprint}`",
        ]
        for number, section in enumerate(self.sections, start=1):
            failed = section.failed_names()
            result = "passed" if section.success else f"FAILED ({len(failed)} of {len(section.expectations)} checks)"
            lines += [
                "",
                f"#### Source {number} of {len(self.sections)}: `{section.sources[0]}` (weight {section.weight:g}) "
                f"{result}",
                "",
                f"data: {', '.join(f'`{s}`' for s in section.sources)} · format `{section.format}` · rows: "
                f"{section.row_counts.get('rows', 0)} (train {section.row_counts.get('train', 0)}, eval "
                f"{section.row_counts.get('eval', 0)}) · fingerprint `{section.fingerprint}`",
                "",
                *section._table(),
            ]
        docs = next((section.data_docs for section in self.sections if section.data_docs), None)
        if docs:
            lines += ["", f"Great Expectations Data Docs: {docs}"]
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
