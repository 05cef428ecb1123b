"""The data contract: a Great Expectations suite over the instruction data, run before any GPU time.

The data is read exactly as training reads it (the functions of `tasks.data`, the real tokenizer, the
same stable-hash split), turned into one pandas table with a row per example and derived columns
(`tasks.validate_table`), and checked by ONE GX 1.x suite of built-in expectations
(`tasks.validate_suite`); the verdict is a `ValidationResult` (`tasks.validate_result`). This module
runs the three in turn, once per data source (`data.sources`), and is what the flow, the CLI and tests import.
"""

from __future__ import annotations

import time
from typing import Any

from configs.schema import ConfigError, PipelineConfig
from tasks.data import DataError, load_splits
from tasks.validate_result import DataValidationError, ValidationResult, require_valid
from tasks.validate_suite import SUITE_NAME, UNKNOWN_FORMAT, run_suite, suite_checks, summarise
from tasks.validate_table import UNREADABLE, build_table, read_records

__all__ = ["SUITE_NAME", "UNKNOWN_FORMAT", "UNREADABLE", "DataValidationError", "ValidationResult", "require_valid",
           "validate_data"]


def validate_data(config: PipelineConfig, data_path: str | None = None) -> ValidationResult:
    """Run the data contract on the configured data (or `data_path` alone, in place of data.path/sources).

    With `data.sources` each source is checked on its own, as `data.path: <source>` would be, and the
    result holds one section per source; it passes when every source passes.
    """
    from tasks.modeling import load_tokenizer

    started = time.perf_counter()
    if data_path is not None:
        data = config.data.model_copy(update={"path": str(data_path), "sources": None})
        config = config.model_copy(update={"data": data})
    try:
        tokenizer = load_tokenizer(config)
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of '{config.model.name_or_path}': {exc}") \
            from exc
    if config.data.sources is None:
        return _validate_one(config, tokenizer, started)
    sections = []
    for source in config.data.source_list():
        update: dict[str, Any] = {"path": source.path, "format": source.format, "eval_fraction": source.eval_fraction,
                                  "sources": None}
        if source.eval_fraction == 0 and not config.data.eval_path:  # a train-only source has no eval rows to count
            update["validation"] = config.data.validation.model_copy(update={"min_eval_rows": 0})
        data = config.data.model_copy(update=update)
        section = _validate_one(config.model_copy(update={"data": data}), tokenizer, time.perf_counter())
        section.weight = source.weight
        sections.append(section)
    return _mixed_result(config, sections, started)


def _validate_one(config: PipelineConfig, tokenizer: Any, started: float) -> ValidationResult:
    """The suite over one source: `data.path` (with `data.eval_path` when set)."""
    data_cfg = config.data
    files = {"train": read_records(data_cfg.path, data_cfg.hub_split)}
    if data_cfg.eval_path:
        files["eval"] = read_records(data_cfg.eval_path, data_cfg.hub_split)
    table = build_table(config, files, tokenizer)
    checks = suite_checks(config, table.file_format, table.stop_tokens)
    suite_result, docs = run_suite(config, table.frame, checks)
    by_name = {evr.expectation_config.meta["name"]: evr for evr in suite_result.results}
    max_examples = data_cfg.validation.max_examples
    expectations = [summarise(check, by_name[check.name], table.frame, max_examples) for check in checks]

    import great_expectations as gx

    return ValidationResult(
        success=bool(suite_result.success),
        fingerprint=table.fingerprint,
        format=table.file_format or UNKNOWN_FORMAT,
        row_counts=table.row_counts,
        expectations=expectations,
        sources=[p for p in (data_cfg.path, data_cfg.eval_path) if p],
        data_docs=docs,
        duration_s=round(time.perf_counter() - started, 3),
        gx_version=gx.__version__,
    )


def _mixed_result(config: PipelineConfig, sections: list[ValidationResult], started: float) -> ValidationResult:
    """The verdict over all sources: each source's section, and the mix as training loads it
    (`tasks.data.load_splits`: fingerprint and row counts) when every source could be read."""
    fingerprint, fmt = UNREADABLE, "+".join(dict.fromkeys(section.format for section in sections))
    counts = {key: sum(section.row_counts.get(key, 0) for section in sections) for key in ("rows", "train", "eval")}
    if all(section.fingerprint != UNREADABLE for section in sections):
        try:
            splits = load_splits(config.data)
        except DataError:
            splits = None
        if splits is not None:
            fingerprint, fmt = splits.fingerprint, splits.format
            counts.update(train=len(splits.train), eval=len(splits.eval))
            for section, stats in zip(sections, splits.mix, strict=True):
                section.row_counts["mixed"] = stats.mixed_rows
    return ValidationResult(
        success=all(section.success for section in sections) and fingerprint != UNREADABLE,
        fingerprint=fingerprint,
        format=fmt,
        row_counts=counts,
        expectations=[],
        sources=list(dict.fromkeys(path for section in sections for path in section.sources)),
        duration_s=round(time.perf_counter() - started, 3),
        gx_version=sections[0].gx_version,
        sections=sections,
    )
