"""The data contract's table: the data read exactly as training reads it, one row per record.

Every record becomes a row of derived columns (`parse_ok`, `fields_ok`, `types_ok`, `roles_ok`,
`token_length`, ...) through the functions of `tasks.data`, the real tokenizer and the same
stable-hash split; `tasks.validate_suite` checks those columns with GX. A null in a column means
"does not apply to this row", so one bad row is reported by the check it breaks, not by all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, PipelineConfig
from tasks.chat import IGNORE_INDEX, chat_format, termination_problem
from tasks.data import (
    FORMAT_FIELDS,
    LOCAL_SUFFIXES,
    VALID_ROLES,
    DataError,
    Example,
    TypeProblem,
    detect_format,
    detect_row_format,
    encode_example,
    fingerprint,
    in_eval_split,
    is_json_file,
    is_local_path,
    read_json_records,
    read_rows,
    render_prompt,
    text_type_problems,
    to_example,
)

UNREADABLE = "unreadable"  # the fingerprint where training could not load the data


# --------------------------------------------------------------------------- reading


@dataclass
class Record:
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


def read_records(path: str, hub_split: str) -> list[Record]:
    """Rows as training reads them (`tasks.data`); parse failures become records, not raises.

    JSON files are read record by record, so every broken line is reported with its number. A missing
    file or an unknown hub id is a ConfigError and propagates: that is not a data problem.
    """
    if is_local_path(path) and not Path(path).exists():
        raise ConfigError(f"data file {path} does not exist; point data.path or data.sources (or DATA_PATH) at a "
                          "data file")
    if is_local_path(path) and Path(path).suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"unsupported data file type '{Path(path).suffix}'; use one of {sorted(LOCAL_SUFFIXES)}")
    if is_json_file(path):
        records = [Record(path, r.line, r.row, r.error, exact=True) for r in read_json_records(path)]
        return records or [Record(path, None, error="the file holds no rows")]
    try:
        rows = read_rows(path, hub_split)
    except DataError as exc:
        cause = exc.__cause__ or exc
        return [Record(path, None, error=f"`datasets` cannot read the file: {type(cause).__name__}: {cause}")]
    return [Record(path, None, data=row) for row in rows]


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


def _type_problems(record: Record, fmt: str | None) -> list[TypeProblem]:
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


def _tokens(tokenizer: Any, example: Example, config: PipelineConfig) -> dict[str, Any]:
    """Template, full token length, loss-token share and whether every trained turn ends with a stop
    token, through training's own encoding (`tasks.data.encode_example`)."""
    try:
        prompt = render_prompt(tokenizer, example.prompt_messages)
        if not prompt.strip():
            raise ValueError("the template rendered an empty prompt")
        encoded = encode_example(tokenizer, example, config.data.train_on)
    except Exception as exc:  # jinja raises anything (raise_exception, TypeError, UndefinedError...)
        return {"template_ok": False, "template_error": f"{type(exc).__name__}: {exc}"}
    max_seq_length = config.data.max_seq_length
    labels = encoded.features(max_seq_length)["labels"]
    share = sum(label != IGNORE_INDEX for label in labels) / len(labels) if labels else 0.0
    problem = termination_problem(tokenizer, encoded, max_seq_length)
    return {"template_ok": True, "template_error": "", "token_length": float(len(encoded.input_ids)),
            "loss_share": share, "stops_ok": problem is None, "stop_error": problem or ""}


@dataclass
class Table:
    """What the suite runs on: the derived-column frame, the file's format, the fingerprint and row counts."""

    frame: Any  # pandas.DataFrame, one row per record
    file_format: str | None
    fingerprint: str
    row_counts: dict[str, int]
    stop_tokens: list[str]  # what generation stops at (the template's end-of-turn token, eos)


def build_table(config: PipelineConfig, files: dict[str, list[Record]], tokenizer: Any) -> Table:
    """One row per record of every file ("train", "eval"), with the split training would put it in."""
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
            row.update(_tokens(tokenizer, example, config))

    for row in rows:
        key = row.get("prompt_key")
        row["train_prompt_key"] = key if row["split"] == "train" else None
        row["leaked"] = (key in train_keys) if row["split"] == "eval" else None

    columns = ["rid", "source", "file", "line", "row", "split", "parse_ok", "parse_error", "format", "fields_ok",
               "missing", "types_ok", "type_error", "prompt_text", "response_text", "roles", "roles_ok", "alternates",
               "ends_assistant", "template_ok", "template_error", "token_length", "loss_share", "stops_ok",
               "stop_error", "prompt_key", "train_prompt_key", "leaked"]
    frame = pd.DataFrame.from_records(rows, columns=columns)
    for column in ("token_length", "loss_share"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("line", "row"):  # nullable ints stay objects: no 1.0-style line numbers in reports
        frame[column] = frame[column].astype("object").where(frame[column].notna(), None)

    digest = _fingerprint(config, files, examples)
    counts = {"rows": len(frame), "train": len(examples["train"]), "eval": len(examples["eval"])}
    stop_tokens = tokenizer.convert_ids_to_tokens(list(chat_format(tokenizer).stop_ids))
    return Table(frame, file_format, digest, counts, stop_tokens)


def _fingerprint(config: PipelineConfig, files: dict[str, list[Record]], examples: dict[str, list[Example]]) -> str:
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
