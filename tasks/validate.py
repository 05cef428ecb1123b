"""The data contract: a Great Expectations suite over the instruction data, run before any GPU time.

The data is read exactly as training reads it (the functions of `tasks.data`, the real tokenizer, the
same stable-hash split), turned into one pandas table with a row per example and derived columns
(`tasks.validate_table`), and checked by ONE GX 1.x suite of built-in expectations
(`tasks.validate_suite`); the verdict is a `ValidationResult` (`tasks.validate_result`). This module
runs the three in turn and is what the flow, the CLI and tests import.
"""

from __future__ import annotations

import time

from configs.schema import ConfigError, PipelineConfig
from tasks.validate_result import DataValidationError, ValidationResult, require_valid
from tasks.validate_suite import SUITE_NAME, UNKNOWN_FORMAT, run_suite, suite_checks, summarise
from tasks.validate_table import UNREADABLE, build_table, read_records

__all__ = ["SUITE_NAME", "UNKNOWN_FORMAT", "UNREADABLE", "DataValidationError", "ValidationResult", "require_valid",
           "validate_data"]


def validate_data(config: PipelineConfig, data_path: str | None = None) -> ValidationResult:
    """Run the data contract on the configured data (or `data_path` in place of data.path)."""
    from tasks.modeling import load_tokenizer

    started = time.perf_counter()
    if data_path is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"path": str(data_path)})})
    data_cfg = config.data
    files = {"train": read_records(data_cfg.path, data_cfg.hub_split)}
    if data_cfg.eval_path:
        files["eval"] = read_records(data_cfg.eval_path, data_cfg.hub_split)
    try:
        tokenizer = load_tokenizer(config)
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of '{config.model.name_or_path}': {exc}") \
            from exc
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
