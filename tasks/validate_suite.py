"""The data contract's GX suite: one built-in expectation per check over the derived-column table.

- a row-level check is a built-in such as `ExpectColumnValuesToBeInSet` on its derived column (GX
  skips nulls, the rows a check does not apply to);
- tolerated shares from `data.validation` become GX's `mostly`;
- per-split row counts are `ExpectTableRowCountToBeBetween` with a row condition on the split.

GX is imported lazily (a slow import) with analytics off, in an ephemeral context; Data Docs HTML
is written when `data.validation.data_docs_dir` is set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import PipelineConfig
from tasks.data import FORMAT_FIELDS
from tasks.validate_result import json_safe

SUITE_NAME = "instruction-data-contract"
UNKNOWN_FORMAT = "unknown"
SNIPPET = 60


@dataclass(frozen=True)
class Check:
    """One named check of the contract: its GX expectation and the words the report uses for it."""

    name: str
    expected: str
    expectation: Any  # a gx.expectations.Expectation
    detail: str | None = None  # how an offending row is described in examples


def suite_checks(config: PipelineConfig, file_format: str | None, stop_tokens: list[str] | None = None) -> list[Check]:
    """The suite's checks for this config, in report order; thresholds from `data.validation`.

    `stop_tokens` are the tokens generation stops at (the template's end of turn, eos), for the report.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    thresholds = config.data.validation
    max_len = config.data.max_seq_length
    fmt = file_format or UNKNOWN_FORMAT
    how = "declared" if config.data.format != "auto" else "detected"
    fields = "+".join(FORMAT_FIELDS.get(fmt, ("a known format's fields",)))

    def share(value: float) -> str:
        return f"{100 * value:g}%"

    def in_set(column: str, values: list[Any], mostly: float = 1.0) -> Any:
        return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=values, mostly=mostly)

    return [
        Check("rows_parse", "every row reads (JSON: one object per line)", in_set("parse_ok", [True]), "parse"),
        Check("format_consistent", f"every row in format `{fmt}` ({how}); no mixed formats",
               in_set("format", [fmt]), "format"),
        Check("required_fields", f"fields {fields} present", in_set("fields_ok", [True]), "missing"),
        Check("text_fields_are_strings",
               "every text field is a JSON string (prompt/completion may be {role, content} message lists)",
               in_set("types_ok", [True]), "types"),
        Check("no_empty_prompt", "prompt not empty",
               gxe.ExpectColumnValueLengthsToBeBetween(column="prompt_text", min_value=1), "empty_prompt"),
        Check("no_empty_response", "response not empty",
               gxe.ExpectColumnValueLengthsToBeBetween(column="response_text", min_value=1), "empty_response"),
        Check("chat_roles_valid", "message roles in system/user/assistant", in_set("roles_ok", [True]), "roles"),
        Check("chat_alternates", "user/assistant alternate (after an optional system turn)",
               in_set("alternates", [True]), "roles"),
        Check("ends_with_assistant", "conversation ends with an assistant turn",
               in_set("ends_assistant", [True]), "roles"),
        Check("template_renders", "the tokenizer's chat template renders every prompt",
               in_set("template_ok", [True]), "template"),
        Check("length_within_max_seq_length",
               f"<= {max_len} tokens; over it at most {share(thresholds.max_overlong_share)} of rows",
               gxe.ExpectColumnValuesToBeBetween(column="token_length", max_value=max_len,
                                                 mostly=1.0 - thresholds.max_overlong_share), "tokens"),
        Check("turns_end_with_stop_token",
               f"every trained assistant turn ({config.data.train_on}) ends with a token generation stops at "
               f"({', '.join(stop_tokens or []) or 'none'}), within data.max_seq_length; otherwise at most "
               f"{share(thresholds.max_unterminated_share)} of rows",
               in_set("stops_ok", [True], mostly=1.0 - thresholds.max_unterminated_share), "stops"),
        Check("loss_token_share", f"mean share of tokens carrying loss >= {thresholds.min_loss_token_share:g}",
               gxe.ExpectColumnMeanToBeBetween(column="loss_share", min_value=thresholds.min_loss_token_share),
               "loss"),
        Check("no_duplicates_in_train",
               f"duplicated train prompts at most {share(thresholds.max_duplicate_share)} of train rows",
               gxe.ExpectColumnValuesToBeUnique(column="train_prompt_key",
                                                mostly=1.0 - thresholds.max_duplicate_share), "prompt"),
        Check("no_eval_leakage", f"eval prompts also in train at most {share(thresholds.max_leaked_share)}",
               in_set("leaked", [False], mostly=1.0 - thresholds.max_leaked_share), "prompt"),
        Check("train_row_count", f">= {thresholds.min_train_rows} train rows",
               gxe.ExpectTableRowCountToBeBetween(min_value=thresholds.min_train_rows,
                                                  row_condition=Column("split") == "train")),
        Check("eval_row_count", f">= {thresholds.min_eval_rows} eval rows",
               gxe.ExpectTableRowCountToBeBetween(min_value=thresholds.min_eval_rows,
                                                  row_condition=Column("split") == "eval")),
    ]


def run_suite(config: PipelineConfig, frame: Any, checks: list[Check]) -> tuple[Any, str | None]:
    """Run the suite on the table in an ephemeral context; returns (suite result, Data Docs index or None)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("instruction-data").add_dataframe_asset("rows")
             .add_batch_definition_whole_dataframe("all-rows"))
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for check in checks:
        check.expectation.meta = {"name": check.name}
        check.expectation.description = f"{check.name}: {check.expected}"
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=SUITE_NAME, data=batch, suite=suite))
    result_format = {"result_format": "SUMMARY", "unexpected_index_column_names": ["rid"],
                     "partial_unexpected_count": max(config.data.validation.max_examples, 1)}
    docs_dir = config.data.validation.data_docs_dir
    if docs_dir is None:
        return definition.run(batch_parameters={"dataframe": frame}, result_format=result_format), None
    docs_dir = Path(docs_dir).resolve()
    context.add_data_docs_site("qlora", {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    })
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=SUITE_NAME, validation_definitions=[definition], result_format=result_format,
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs", site_names=["qlora"])],
    ))
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (suite_result,) = outcome.run_results.values()
    return suite_result, str(docs_dir / "index.html")


def _snippet(value: Any, size: int = SNIPPET) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= size else text[: size - 3] + "..."


def _detail(kind: str | None, row: Any) -> str:
    if kind == "parse":
        return _snippet(row["parse_error"], 2 * SNIPPET)
    if kind == "format":
        return f"looks like {row['format']}"
    if kind == "missing":
        return _snippet(row["missing"])
    if kind == "types":
        return _snippet(row["type_error"], 2 * SNIPPET)
    if kind in ("empty_prompt", "empty_response"):
        return f"{kind.removeprefix('empty_')} is empty"
    if kind == "roles":
        return _snippet(f"roles: {row['roles']}")
    if kind == "template":
        return _snippet(row["template_error"])
    if kind == "tokens":
        return f"{int(row['token_length'])} tokens"
    if kind == "stops":
        return _snippet(row["stop_error"], 3 * SNIPPET)
    if kind == "loss":
        return f"loss share {row['loss_share']:.2f}"
    return _snippet(f'prompt "{row["prompt_key"]}"')


def _example(frame: Any, rid: int, kind: str | None) -> dict[str, Any]:
    row = frame.loc[int(rid)]
    return {"source": row["source"], "line": row["line"], "row": row["row"], "split": row["split"],
            "detail": _detail(kind, row)}


def summarise(check: Check, evr: Any, frame: Any, max_examples: int) -> dict[str, Any]:
    """One expectation's entry: name, GX type, success, observed value and offending examples."""
    result = dict(evr.result or {})
    info = evr.exception_info or {}
    errors = [v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    if info.get("raised_exception"):
        errors.append(info.get("exception_message"))
    examples: list[dict[str, Any]] = []
    if errors:
        observed = f"error: {_snippet(errors[0])}"
    elif "unexpected_count" in result:
        considered = result.get("element_count", 0) - result.get("missing_count", 0)
        bad = result["unexpected_count"]
        percent = f"{100 * bad / considered:.2f}".rstrip("0").rstrip(".") if bad else ""
        observed = f"{bad} of {considered} rows" + (f" ({percent}%)" if bad else "")
        if considered == 0:
            observed = "no rows it applies to"
        if check.name == "length_within_max_seq_length" and frame["token_length"].notna().any():
            observed += f"; longest {int(frame['token_length'].max())} tokens"
        for item in result.get("partial_unexpected_index_list") or []:
            examples.append(_example(frame, item["rid"], check.detail))
    else:
        value = result.get("observed_value")
        if check.name == "loss_token_share":
            observed = "no rows" if value is None or (isinstance(value, float) and math.isnan(value)) \
                else f"{value:.3f}"
            if not evr.success and frame["loss_share"].notna().any():
                lowest = frame.nsmallest(max_examples, "loss_share")
                examples = [_example(frame, rid, check.detail) for rid in lowest["rid"]]
        else:
            observed = f"{value} rows"
    return json_safe({
        "name": check.name,
        "expectation_type": evr.expectation_config.type,
        "success": bool(evr.success),
        "observed": observed,
        "expected": check.expected,
        "unexpected_count": result.get("unexpected_count"),
        "element_count": result.get("element_count"),
        "observed_value": result.get("observed_value"),
        "examples": examples[:max_examples],
    })
