"""Instruction data: reading, format detection, the train/eval split, prompts and tokenization.

Validation, training and evaluation all go through these functions so that the data contract checks
exactly what training will see. Every supported format is turned into one canonical shape: the
conversation up to the answer (`prompt_messages`) and the answer itself (`response`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, DataConfig

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
VALID_ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
# Used when a tokenizer has no chat template: the Alpaca prompt most base models have seen.
FALLBACK_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


class DataError(ValueError):
    """The data cannot be read as instruction data; the message says which file/row and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One training example in canonical form; `row` is the 0-based row in its source file."""

    prompt_messages: tuple[dict[str, str], ...]
    response: str
    row: int
    source: str

    @property
    def prompt_key(self) -> str:
        """Normalised prompt text: what duplicates, leakage and the split are decided on."""
        return normalize_text(" ".join(m["content"] for m in self.prompt_messages))


@dataclass
class DatasetSplits:
    train: list[Example]
    eval: list[Example]
    format: str
    fingerprint: str
    sources: list[str] = field(default_factory=list)


def normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def is_local_path(path: str) -> bool:
    return Path(path).exists() or Path(path).suffix in LOCAL_SUFFIXES


def check_data_files(config: DataConfig) -> None:
    """Fail now on a data file that is not there, before a flow run or a schedule starts."""
    for key, path in (("data.path", config.path), ("data.eval_path", config.eval_path)):
        if path and is_local_path(path) and not Path(path).is_file():
            raise ConfigError(f"{key}: file {path} does not exist; point it at a .jsonl/.csv/.parquet file")


def _local_read_options(file: Path, builder: str) -> dict[str, Any]:
    """`load_dataset` options that keep every value exactly as the file holds it.

    JSON: `datasets` fixes column types from the first `chunksize` bytes (10 MB). A later value of
    another type is then cast, or the rest of the column is re-encoded as JSON text (measured with
    datasets 5.2: a string column becomes `'"text"'` with quotes, a number `7` becomes `'7'`), so a
    wrong type would be trained silently. One chunk for the whole file lets `datasets` see every
    value and keep mixed columns as its `Json` type, the real values.

    CSV: a cell is text; pandas would guess types (`4` becomes 4.0, `1.50` becomes 1.5) and read
    `None`/`NA` as missing. Every column is read as a string, and only an empty cell is missing.
    """
    if builder == "json":
        return {"chunksize": max(file.stat().st_size + 1, 10 << 20)}
    if builder == "csv":
        import datasets
        import pandas as pd

        columns = pd.read_csv(file, nrows=0).columns  # the header, parsed as `datasets` will parse it
        return {"features": datasets.Features({str(name): datasets.Value("string") for name in columns}),
                "keep_default_na": False, "na_values": [""]}
    return {}


def read_failure_hint(path: str, error: BaseException) -> str:
    """Why `datasets` may refuse a valid JSON Lines file, and the fix; empty when that is not the case.

    datasets 5.2 parses every line with ujson to handle a field whose JSON type varies (an id that
    is sometimes a number, sometimes a string), and a blank line (even a trailing one) makes that
    parse fail with "Expected object or value". Measured; pyarrow alone skips blank lines.
    """
    file = Path(path)
    if "Expected object or value" not in str(error) or LOCAL_SUFFIXES.get(file.suffix) != "json" \
            or not file.is_file():
        return ""
    raw = file.read_bytes().removeprefix(codecs.BOM_UTF8)
    if raw.lstrip()[:1] == b"[" or all(line.strip() for line in raw.splitlines()):  # datasets reads an array whole
        return ""
    return " `datasets` cannot read JSON Lines with blank lines if a field's JSON type varies: delete the blank lines."


def read_rows(path: str, hub_split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local file or hub dataset as plain dicts, read with `datasets`, values as the file holds them."""
    import datasets

    datasets.disable_progress_bars()
    if is_local_path(path):
        file = Path(path)
        if not file.exists():
            raise ConfigError(f"data.path: file {path} does not exist; point it at a .jsonl/.csv/.parquet file")
        builder = LOCAL_SUFFIXES.get(file.suffix)
        if builder is None:
            raise ConfigError(f"data.path: unsupported file type '{file.suffix}'; use one of {sorted(LOCAL_SUFFIXES)}")
        try:
            options = _local_read_options(file, builder)
            dataset = datasets.load_dataset(builder, data_files=str(file), split="train", **options)
        except Exception as exc:  # datasets wraps parser errors in several exception types
            raise DataError(
                f"could not read {path}: {exc.__class__.__name__}: {exc}.{read_failure_hint(path, exc)} "
                "Run `qlora validate` for the line numbers of broken rows."
            ) from exc
    else:
        try:
            dataset = datasets.load_dataset(path, split=hub_split)
        except Exception as exc:
            raise ConfigError(f"data.path: '{path}' is neither a local file nor a loadable hub dataset: {exc}") from exc
    return dataset.to_list()


def detect_row_format(row: dict[str, Any]) -> str | None:
    present = {key for key, value in row.items() if value is not None}
    matches = [name for name, fields in FORMAT_FIELDS.items() if set(fields) <= present]
    return matches[0] if len(matches) == 1 else None


def detect_format(rows: list[dict[str, Any]], declared: str = "auto") -> str:
    """The file's format; a file mixing formats is an error because each needs different handling."""
    if declared != "auto":
        return declared
    seen: dict[str, int] = {}
    for row in rows:
        fmt = detect_row_format(row)
        if fmt:
            seen[fmt] = seen.get(fmt, 0) + 1
    if not seen:
        raise DataError(
            "cannot detect the data format: rows need fields "
            + ", ".join(f"{name} ({'+'.join(fields)})" for name, fields in FORMAT_FIELDS.items())
        )
    if len(seen) > 1:
        raise DataError(f"the file mixes formats {seen}; keep one format per file or set data.format")
    return next(iter(seen))


def json_type(value: Any) -> str:
    """A value's type in JSON's words ("a JSON number"), for messages about the data file."""
    if value is None:
        return "a JSON null"
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a JSON number"
    if isinstance(value, str):
        return "a JSON string"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, (list, tuple)):
        return "a JSON array"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class TypeProblem:
    """A text field holding something other than text: `field` is a path such as `messages[2].content`."""

    field: str
    found: str
    expected: str

    def __str__(self) -> str:
        return f"field '{self.field}' is {self.found}, expected {self.expected}"


MESSAGE_LIST = "a string or an array of {role, content} objects"


def _message_problems(messages: Any, name: str) -> list[TypeProblem]:
    """Every message must be an object whose role and content are strings."""
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(TypeProblem(f"{name}[{i}]", json_type(message), "an object with role and content"))
            continue
        for key in ("role", "content"):
            if key not in message:
                problems.append(TypeProblem(f"{name}[{i}].{key}", "missing", "a string"))
            elif not isinstance(message[key], str):
                problems.append(TypeProblem(f"{name}[{i}].{key}", json_type(message[key]), "a string"))
    return problems


def text_type_problems(row: dict[str, Any], fmt: str, null_is_missing: bool = True) -> list[TypeProblem]:
    """Text fields of `row` (for format `fmt`) that hold something other than a string.

    Text is never coerced: `str(42)` or `str(["a"])` would train the model on a Python repr. An
    absent top-level field is not a type problem (a missing field is reported as such). Rows read
    by `datasets` fill absent keys with None, so there None counts as absent; rows parsed straight
    from the JSON text pass `null_is_missing=False`, and an explicit `null` in a required field is
    then reported as a JSON null. Metadata fields outside the format are not checked.
    """
    def required(key: str, expected: str = "a string", lists: bool = False) -> list[TypeProblem]:
        if key not in row or (row[key] is None and null_is_missing):
            return []
        value = row[key]
        if isinstance(value, str):
            return []
        if lists and isinstance(value, list):
            return _message_problems(value, key)
        return [TypeProblem(key, json_type(value), expected)]

    if fmt == "alpaca":
        extra = row.get("input")
        optional = [] if extra is None or isinstance(extra, str) else [
            TypeProblem("input", json_type(extra), "a string or null")]
        return [*required("instruction"), *optional, *required("output")]
    if fmt == "prompt_completion":
        conversational = isinstance(row.get("prompt"), list)  # TRL style: message lists
        completion_expected = MESSAGE_LIST if conversational else "a string (as the prompt is one)"
        return [*required("prompt", MESSAGE_LIST, lists=True),
                *required("completion", completion_expected, lists=conversational)]
    if fmt == "chat":
        messages = row.get("messages")
        if isinstance(messages, list):
            return _message_problems(messages, "messages")
        if messages is None and ("messages" not in row or null_is_missing):
            return []
        return [TypeProblem("messages", json_type(messages), "an array of {role, content} objects")]
    return []


def to_example(row: dict[str, Any], fmt: str, index: int, source: str) -> Example:
    """Canonical form of one row. Raises DataError for a row that lacks what its format needs.

    A text field that is not a string (a number, a list...) is refused, never turned into its
    `str()` form: the model would learn the Python repr.
    """
    problems = text_type_problems(row, fmt)
    if problems:
        listed = "; ".join(str(problem) for problem in problems)
        raise DataError(
            f"{source} row {index}: {listed}. Write text fields as JSON strings (quote numbers, join lists); "
            "`qlora validate` lists every such row with its line number"
        )

    def text(key: str) -> str:
        value = row.get(key)
        if value is None or not value.strip():
            raise DataError(f"{source} row {index}: field '{key}' is missing, null or empty")
        return value

    if fmt == "alpaca":
        prompt = text("instruction")
        if row.get("input"):
            prompt = f"{prompt}\n\n{row['input']}"
        return Example(({"role": "user", "content": prompt},), text("output"), index, source)
    if fmt == "prompt_completion":
        prompt_value = row.get("prompt")
        if isinstance(prompt_value, list):  # conversational prompt/completion (TRL style)
            messages = tuple({"role": m["role"], "content": m["content"]} for m in prompt_value)
            completion = row.get("completion")
            response = completion[-1]["content"] if isinstance(completion, list) and completion else completion
            if not response or not response.strip():
                raise DataError(f"{source} row {index}: field 'completion' is missing, null or empty")
            return Example(messages, response, index, source)
        return Example(({"role": "user", "content": text("prompt")},), text("completion"), index, source)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source} row {index}: field 'messages' must be a non-empty list")
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise DataError(f"{source} row {index}: the conversation must end with a non-empty assistant turn")
    prompt_messages = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    return Example(prompt_messages, last["content"], index, source)


def in_eval_split(example: Example, eval_fraction: float) -> bool:
    """Stable hash split: a prompt always falls on the same side, whatever the row order or machine."""
    digest = hashlib.sha256(example.prompt_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < round(eval_fraction * 10_000)


def fingerprint(examples: list[Example], fmt: str) -> str:
    """Content hash of the data as training sees it; order matters because it changes the run."""
    digest = hashlib.sha256(fmt.encode())
    for example in examples:
        digest.update(json.dumps([example.prompt_messages, example.response], sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def load_examples(path: str, fmt: str, hub_split: str = "train") -> tuple[list[Example], str]:
    rows = read_rows(path, hub_split)
    fmt = detect_format(rows, fmt)
    return [to_example(row, fmt, index, path) for index, row in enumerate(rows)], fmt


def load_splits(config: DataConfig) -> DatasetSplits:
    """Train and eval examples as configured: a separate eval file, or a hash split of one file."""
    examples, fmt = load_examples(config.path, config.format, config.hub_split)
    sources = [config.path]
    if config.eval_path:
        eval_examples, eval_fmt = load_examples(config.eval_path, config.format, config.hub_split)
        if eval_fmt != fmt:
            raise DataError(f"data.eval_path is in format '{eval_fmt}' but data.path is '{fmt}'; use one format")
        train_examples = examples
        sources.append(config.eval_path)
    else:
        train_examples = [e for e in examples if not in_eval_split(e, config.eval_fraction)]
        eval_examples = [e for e in examples if in_eval_split(e, config.eval_fraction)]
    digest = fingerprint(train_examples + eval_examples, fmt)
    return DatasetSplits(train_examples, eval_examples, fmt, digest, sources)


def render_prompt(tokenizer: Any, prompt_messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    """The text the model sees before its answer: the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(prompt_messages), tokenize=False, add_generation_prompt=True)
    prompt = "\n\n".join(m["content"] for m in prompt_messages)
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def tokenize_example(tokenizer: Any, example: Example, max_seq_length: int) -> dict[str, list[int]]:
    """input_ids and labels with the prompt masked, so loss falls on the response only.

    Prompt and response are tokenized separately: generation starts from exactly these prompt ids,
    so training and inference see the same token boundary.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, example.prompt_messages), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_length]
    return {"input_ids": input_ids, "labels": labels}
