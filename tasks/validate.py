"""The data contract: a Great Expectations suite over the instruction data, run before any GPU time.

The data is read exactly as training reads it (the functions of `tasks.data`, the real tokenizer, the
same stable-hash split), turned into one pandas table with a row per example and derived columns, and
checked by ONE GX 1.x suite of built-in expectations:

- a derived column per row-level check (`parse_ok`, `fields_ok`, `roles_ok`, `token_length`, ...),
  checked by built-ins such as `ExpectColumnValuesToBeInSet`; a null value there means "does not
  apply to this row" (GX skips nulls), so one bad row is reported by the check it breaks, not by all;
- tolerated shares from `data.validation` become GX's `mostly`;
- per-split row counts are `ExpectTableRowCountToBeBetween` with a row condition on the split.

GX is imported lazily (a slow import) with analytics off, in an ephemeral context; Data Docs HTML
is written when `data.validation.data_docs_dir` is set.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, PipelineConfig
from tasks.data import (
    FORMAT_FIELDS,
    IGNORE_INDEX,
    LOCAL_SUFFIXES,
    VALID_ROLES,
    DataError,
    Example,
    TypeProblem,
    detect_format,
    detect_row_format,
    fingerprint,
    in_eval_split,
    is_json_file,
    is_local_path,
    read_json_records,
    read_rows,
    render_prompt,
    text_type_problems,
    to_example,
    tokenize_example,
)

SUITE_NAME = "instruction-data-contract"
UNREADABLE = "unreadable"
UNKNOWN_FORMAT = "unknown"
SNIPPET = 60


class DataValidationError(DataError):
    """The data contract failed; the message names the failed expectations and holds the summary."""

    def __init__(self, result: ValidationResult):
        self.result = result
        failed = ", ".join(result.failed_names()) or "none"
        super().__init__(f"data validation failed: {failed}\n\n{result.markdown()}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by Prefect with the failed state: rebuild from the result
        return (type(self), (self.result,))


@dataclass
class ValidationResult:
    """The suite's verdict: machine-readable (`to_dict`) and for people (`markdown`)."""

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
        return _plain(asdict(self))

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


# --------------------------------------------------------------------------- reading


@dataclass
class _Record:
    """One row of a data file as read, before any check: the row as training gets it, or why it did not parse.

    `exact` marks a row read from JSON text (`tasks.data.read_json_records`, training's own reader of
    JSON files): it tells an explicit `null` from an absent key. Rows that `datasets` reads (CSV,
    Parquet, hub) have every absent key filled with None.
    """

    source: str
    line: int | None
    data: dict[str, Any] | None = None
    error: str | None = None
    exact: bool = False


def _read_records(path: str, hub_split: str) -> list[_Record]:
    """Rows as training reads them (`tasks.data`); parse failures become records, not raises.

    JSON files are read record by record, so every broken line is reported with its number. A missing
    file or an unknown hub id is a ConfigError and propagates: that is not a data problem.
    """
    if is_local_path(path) and not Path(path).exists():
        raise ConfigError(f"data file {path} does not exist; point data.path (or DATA_PATH) at a data file")
    if is_local_path(path) and Path(path).suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"unsupported data file type '{Path(path).suffix}'; use one of {sorted(LOCAL_SUFFIXES)}")
    if is_json_file(path):
        records = [_Record(path, r.line, r.row, r.error, exact=True) for r in read_json_records(path)]
        return records or [_Record(path, None, error="the file holds no rows")]
    try:
        rows = read_rows(path, hub_split)
    except DataError as exc:
        cause = exc.__cause__ or exc
        return [_Record(path, None, error=f"`datasets` cannot read the file: {type(cause).__name__}: {cause}")]
    return [_Record(path, None, data=row) for row in rows]


# --------------------------------------------------------------------------- derived columns


def _candidates(data: dict[str, Any]) -> list[str]:
    return [name for name, keys in FORMAT_FIELDS.items() if all(data.get(k) is not None for k in keys)]


def _row_format(data: dict[str, Any], file_format: str | None) -> str | None:
    """The format a row looks like; None when it looks like none (required_fields reports that)."""
    found = _candidates(data)
    if file_format in found:
        return file_format
    if not found:
        return None
    return "+".join(found)


def _text(value: Any) -> str | None:
    return None if value is None else str(value).strip()


def _conversation(messages: list[Any]) -> dict[str, Any]:
    """Role checks of a message list; alternation and ending only apply when the roles are valid."""
    roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
    roles_ok = all(isinstance(m, dict) and m.get("role") in VALID_ROLES for m in messages)
    out: dict[str, Any] = {"roles": " > ".join(str(r) for r in roles), "roles_ok": roles_ok,
                           "alternates": None, "ends_assistant": None}
    if roles_ok:
        turns = roles[1:] if roles[:1] == ["system"] else roles
        out["alternates"] = bool(turns) and all(
            role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns)
        )
        out["ends_assistant"] = roles[-1] == "assistant"
    return out


def _type_problems(record: _Record, fmt: str | None) -> list[TypeProblem]:
    """Text fields that are not strings; a row read from JSON text tells `"output": null` (a wrong
    type) from an absent key (a missing field)."""
    if fmt is None or record.data is None:
        return []
    return text_type_problems(record.data, fmt, null_is_missing=not record.exact)


def _row_checks(data: dict[str, Any], fmt: str | None, problems: list[TypeProblem]) -> dict[str, Any]:
    """Field, type, emptiness and role columns of one parsed row for the file's format.

    A row whose text fields have the wrong type is reported by the type check alone: its text and
    roles are not derived, so one wrong value does not also fail the emptiness or chat checks.
    """
    out: dict[str, Any] = {"fields_ok": True, "missing": "", "types_ok": None, "type_error": "",
                           "prompt_text": None, "response_text": None, "roles": "", "roles_ok": None,
                           "alternates": None, "ends_assistant": None}
    if fmt is None:
        needs = ", ".join(f"{'+'.join(keys)} ({name})" for name, keys in FORMAT_FIELDS.items())
        return {**out, "fields_ok": False, "missing": f"no known format; rows need {needs}"}
    mistyped = {problem.field.split("[")[0].split(".")[0] for problem in problems}
    missing = [key for key in FORMAT_FIELDS[fmt] if data.get(key) is None and key not in mistyped]
    if missing:
        out.update(fields_ok=False, missing=f"missing {', '.join(missing)} ({fmt})")
    out.update(types_ok=not problems, type_error="; ".join(str(problem) for problem in problems))
    if problems:
        return out
    if fmt == "alpaca":
        if data.get("instruction") is not None:
            extra = data.get("input")
            out["prompt_text"] = _text(f"{data['instruction']}\n\n{extra}" if extra else data["instruction"])
        out["response_text"] = _text(data.get("output"))
        return out
    if fmt == "prompt_completion" and not isinstance(data.get("prompt"), list):
        out["prompt_text"] = _text(data.get("prompt"))
        out["response_text"] = _text(data.get("completion"))
        return out
    if fmt == "prompt_completion":  # conversational (TRL style): prompt is a message list
        completion = data.get("completion")
        turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        messages, prompt_messages = [*data["prompt"], *turns], data["prompt"]
    else:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            if not missing:
                out.update(fields_ok=False, missing="messages must be a non-empty list of {role, content}")
            return out
        prompt_messages = messages[:-1]
    out.update(_conversation(messages))
    if out["roles_ok"] and out["ends_assistant"]:
        out["prompt_text"] = _text(" ".join(str(m.get("content") or "") for m in prompt_messages))
        out["response_text"] = _text(messages[-1].get("content"))
    return out


def _flagged(checks: dict[str, Any]) -> bool:
    return (
        checks["fields_ok"] is False
        or checks["types_ok"] is False
        or False in (checks["roles_ok"], checks["ends_assistant"])
        or "" in (checks["prompt_text"], checks["response_text"])
    )


def _tokens(tokenizer: Any, example: Example, max_seq_length: int) -> dict[str, Any]:
    """Template, full token length and loss-token share, through training's own tokenize_example."""
    try:
        prompt = render_prompt(tokenizer, example.prompt_messages)
        if not prompt.strip():
            raise ValueError("the template rendered an empty prompt")
        ids = tokenize_example(tokenizer, example, sys.maxsize)
    except Exception as exc:  # jinja raises anything (raise_exception, TypeError, UndefinedError...)
        return {"template_ok": False, "template_error": f"{type(exc).__name__}: {exc}"}
    labels = ids["labels"][:max_seq_length]
    share = sum(label != IGNORE_INDEX for label in labels) / len(labels) if labels else 0.0
    return {"template_ok": True, "template_error": "", "token_length": float(len(ids["input_ids"])),
            "loss_share": share}


@dataclass
class _Table:
    frame: Any  # pandas.DataFrame, one row per record
    file_format: str | None
    fingerprint: str
    row_counts: dict[str, int]


def _build_table(config: PipelineConfig, files: dict[str, list[_Record]], tokenizer: Any) -> _Table:
    import pandas as pd

    data_cfg = config.data
    parsed = [r.data for records in files.values() for r in records if r.data is not None]
    if data_cfg.format != "auto":
        file_format: str | None = data_cfg.format
    else:
        seen = Counter(f for f in (detect_row_format(d) for d in parsed) if f)
        file_format = seen.most_common(1)[0][0] if seen else None

    rows: list[dict[str, Any]] = []
    examples: dict[str, list[Example]] = {"train": [], "eval": []}
    train_keys: set[str] = set()
    for role, records in files.items():
        index = 0
        for record in records:
            row: dict[str, Any] = {"rid": len(rows), "source": record.source, "file": role, "line": record.line,
                                   "row": None, "split": None, "parse_ok": record.error is None,
                                   "parse_error": record.error or "", "format": None, "fields_ok": None}
            rows.append(row)
            if record.data is None:
                continue
            row.update(row=index, format=_row_format(record.data, file_format))
            index += 1
            checks = _row_checks(record.data, file_format, _type_problems(record, file_format))
            row.update(checks)
            try:
                example = to_example(record.data, file_format, row["row"], record.source) if file_format else None
            except Exception as exc:  # the same conversion training does; KeyError/TypeError on odd rows
                example = None
                if not _flagged(checks):
                    row.update(fields_ok=False, missing=f"cannot be converted: {exc}")
            if example is None:
                continue
            if role == "eval" or (data_cfg.eval_path is None and in_eval_split(example, data_cfg.eval_fraction)):
                row["split"] = "eval"
            else:
                row["split"] = "train"
                train_keys.add(example.prompt_key)
            examples[row["split"]].append(example)
            row["prompt_key"] = example.prompt_key
            row.update(_tokens(tokenizer, example, data_cfg.max_seq_length))

    for row in rows:
        key = row.get("prompt_key")
        row["train_prompt_key"] = key if row["split"] == "train" else None
        row["leaked"] = (key in train_keys) if row["split"] == "eval" else None

    columns = ["rid", "source", "file", "line", "row", "split", "parse_ok", "parse_error", "format", "fields_ok",
               "missing", "types_ok", "type_error", "prompt_text", "response_text", "roles", "roles_ok", "alternates",
               "ends_assistant", "template_ok", "template_error", "token_length", "loss_share", "prompt_key",
               "train_prompt_key", "leaked"]
    frame = pd.DataFrame.from_records(rows, columns=columns)
    for column in ("token_length", "loss_share"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("line", "row"):  # nullable ints stay objects: no 1.0-style line numbers in reports
        frame[column] = frame[column].astype("object").where(frame[column].notna(), None)

    digest = _fingerprint(config, files, examples)
    counts = {"rows": len(frame), "train": len(examples["train"]), "eval": len(examples["eval"])}
    return _Table(frame, file_format, digest, counts)


def _fingerprint(config: PipelineConfig, files: dict[str, list[_Record]], examples: dict[str, list[Example]]) -> str:
    """tasks.data.fingerprint of exactly what load_splits would return; UNREADABLE where it would raise."""
    if any(r.data is None for records in files.values() for r in records):
        return UNREADABLE
    try:
        formats = {detect_format([r.data for r in records], config.data.format) for records in files.values()}
    except DataError:
        return UNREADABLE
    total = sum(len(records) for records in files.values())
    if len(formats) != 1 or len(examples["train"]) + len(examples["eval"]) != total:
        return UNREADABLE
    return fingerprint(examples["train"] + examples["eval"], formats.pop())


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class _Check:
    name: str
    expected: str
    expectation: Any  # a gx.expectations.Expectation
    detail: str | None = None  # how an offending row is described in examples


def _checks(config: PipelineConfig, file_format: str | None) -> list[_Check]:
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
        _Check("rows_parse", "every row reads (JSON: one object per line)", in_set("parse_ok", [True]), "parse"),
        _Check("format_consistent", f"every row in format `{fmt}` ({how}); no mixed formats",
               in_set("format", [fmt]), "format"),
        _Check("required_fields", f"fields {fields} present", in_set("fields_ok", [True]), "missing"),
        _Check("text_fields_are_strings",
               "every text field is a JSON string (prompt/completion may be {role, content} message lists)",
               in_set("types_ok", [True]), "types"),
        _Check("no_empty_prompt", "prompt not empty",
               gxe.ExpectColumnValueLengthsToBeBetween(column="prompt_text", min_value=1), "empty_prompt"),
        _Check("no_empty_response", "response not empty",
               gxe.ExpectColumnValueLengthsToBeBetween(column="response_text", min_value=1), "empty_response"),
        _Check("chat_roles_valid", "message roles in system/user/assistant", in_set("roles_ok", [True]), "roles"),
        _Check("chat_alternates", "user/assistant alternate (after an optional system turn)",
               in_set("alternates", [True]), "roles"),
        _Check("ends_with_assistant", "conversation ends with an assistant turn",
               in_set("ends_assistant", [True]), "roles"),
        _Check("template_renders", "the tokenizer's chat template renders every prompt",
               in_set("template_ok", [True]), "template"),
        _Check("length_within_max_seq_length",
               f"<= {max_len} tokens; over it at most {share(thresholds.max_overlong_share)} of rows",
               gxe.ExpectColumnValuesToBeBetween(column="token_length", max_value=max_len,
                                                 mostly=1.0 - thresholds.max_overlong_share), "tokens"),
        _Check("loss_token_share", f"mean share of tokens carrying loss >= {thresholds.min_loss_token_share:g}",
               gxe.ExpectColumnMeanToBeBetween(column="loss_share", min_value=thresholds.min_loss_token_share),
               "loss"),
        _Check("no_duplicates_in_train",
               f"duplicated train prompts at most {share(thresholds.max_duplicate_share)} of train rows",
               gxe.ExpectColumnValuesToBeUnique(column="train_prompt_key",
                                                mostly=1.0 - thresholds.max_duplicate_share), "prompt"),
        _Check("no_eval_leakage", f"eval prompts also in train at most {share(thresholds.max_leaked_share)}",
               in_set("leaked", [False], mostly=1.0 - thresholds.max_leaked_share), "prompt"),
        _Check("train_row_count", f">= {thresholds.min_train_rows} train rows",
               gxe.ExpectTableRowCountToBeBetween(min_value=thresholds.min_train_rows,
                                                  row_condition=Column("split") == "train")),
        _Check("eval_row_count", f">= {thresholds.min_eval_rows} eval rows",
               gxe.ExpectTableRowCountToBeBetween(min_value=thresholds.min_eval_rows,
                                                  row_condition=Column("split") == "eval")),
    ]


def _run_suite(config: PipelineConfig, frame: Any, checks: list[_Check]) -> tuple[Any, str | None]:
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
    if kind == "loss":
        return f"loss share {row['loss_share']:.2f}"
    return _snippet(f'prompt "{row["prompt_key"]}"')


def _example(frame: Any, rid: int, kind: str | None) -> dict[str, Any]:
    row = frame.loc[int(rid)]
    return {"source": row["source"], "line": row["line"], "row": row["row"], "split": row["split"],
            "detail": _detail(kind, row)}


def _summarise(check: _Check, evr: Any, frame: Any, max_examples: int) -> dict[str, Any]:
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
    return _plain({
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


# --------------------------------------------------------------------------- entry point


def validate_data(config: PipelineConfig, data_path: str | None = None) -> ValidationResult:
    """Run the data contract on the configured data (or `data_path` in place of data.path)."""
    from tasks.modeling import load_tokenizer

    started = time.perf_counter()
    if data_path is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"path": str(data_path)})})
    data_cfg = config.data
    files = {"train": _read_records(data_cfg.path, data_cfg.hub_split)}
    if data_cfg.eval_path:
        files["eval"] = _read_records(data_cfg.eval_path, data_cfg.hub_split)
    try:
        tokenizer = load_tokenizer(config)
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of '{config.model.name_or_path}': {exc}") \
            from exc
    table = _build_table(config, files, tokenizer)
    checks = _checks(config, table.file_format)
    suite_result, docs = _run_suite(config, table.frame, checks)
    by_name = {evr.expectation_config.meta["name"]: evr for evr in suite_result.results}
    max_examples = data_cfg.validation.max_examples
    expectations = [_summarise(check, by_name[check.name], table.frame, max_examples) for check in checks]

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


# --------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN to None, paths to str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
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
