"""Canaries: a few fixed prompts with a known good answer, checked on every candidate adapter.

A metric averaged over hundreds of rows can rise while the one answer everybody relies on breaks.
A canary file (`evaluation.canaries`, YAML) lists such prompts and what the answer must be:

    - name: red cat            # optional; the prompt is shown when absent
      prompt: "Rewrite this in Zorbish.\\n\\nred cat"
      expect: {exact: "zel vobip"}        # or {contains: "..."} or {regex: "..."} (re.search)

The prompt is a user message, rendered with the adapter's chat template and answered by the one
`tasks.generation.generate` (evaluation's settings), so a canary sees what serving would answer. Any
failure blocks promotion (`tasks.promotion`); the results go into the evaluation report, its Prefect
artifact and the model card.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from configs.schema import ConfigError


class Expectation(BaseModel):
    """Exactly one of: the whole answer (whitespace-trimmed), a substring, or a regular expression."""

    model_config = ConfigDict(extra="forbid")
    exact: str | None = None
    contains: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Expectation:
        given = [key for key in ("exact", "contains", "regex") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"expect needs exactly one of exact, contains, regex; got {given or 'none'}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"expect.regex {self.regex!r} is not a valid regular expression: {exc}") from exc
        return self

    @property
    def kind(self) -> str:
        return next(key for key in ("exact", "contains", "regex") if getattr(self, key) is not None)

    def matches(self, answer: str) -> bool:
        if self.exact is not None:
            return answer.strip() == self.exact.strip()
        if self.contains is not None:
            return self.contains in answer
        return re.search(str(self.regex), answer) is not None

    def describe(self) -> str:
        return f"{self.kind} {getattr(self, self.kind)!r}"


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    prompt: str
    expect: Expectation

    @property
    def label(self) -> str:
        return self.name or self.prompt


def load_canaries(path: str | Path) -> list[Canary]:
    """The canaries of a YAML file; a file that is not a valid list of canaries raises ConfigError naming it."""
    path = Path(path)
    fix = "see tasks/canaries.py for the format, or unset evaluation.canaries"
    if not path.is_file():
        raise ConfigError(f"evaluation.canaries: file {path} not found; {fix}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"evaluation.canaries: {path} is not valid YAML ({exc}); {fix}") from exc
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"evaluation.canaries: {path} must hold a non-empty list of {{prompt, expect}} entries; "
                          f"{fix}")
    canaries = []
    for index, item in enumerate(raw, start=1):
        try:
            canaries.append(Canary.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            raise ConfigError(f"evaluation.canaries: entry {index} of {path}: {problems}; {fix}") from exc
    return canaries


def check_canaries(canaries: list[Canary], answers: list[str], path: str | Path) -> dict[str, Any]:
    """The report section: each canary with its answer and verdict (answers in the canaries' order)."""
    results = [{"name": c.label, "prompt": c.prompt, "expect": c.expect.model_dump(exclude_none=True),
                "output": answer, "passed": c.expect.matches(answer)}
               for c, answer in zip(canaries, answers, strict=True)]
    return {"path": str(path), "results": results, "failed": sum(not r["passed"] for r in results)}


def canary_failures_markdown(canaries: dict[str, Any] | None) -> list[str]:
    """Markdown lines: a summary, then one line per failed canary (prompt label, expectation, answer)."""
    results = (canaries or {}).get("results") or []
    if not results:
        return []
    failed = [r for r in results if not r["passed"]]
    lines = [f"**Canaries** (`{canaries['path']}`): {len(results) - len(failed)} of {len(results)} passed"
             + ("." if not failed else "; failed:")]
    for r in failed:
        kind, value = next(iter(r["expect"].items()))
        lines.append(f"- {_one_line(r['name'])}: expected {kind} `{_one_line(value)}`, got `{_one_line(r['output'])}`")
    return lines


def _one_line(text: str) -> str:
    return str(text).replace("\n", "\\n").replace("|", "\\|").replace("`", "'")
