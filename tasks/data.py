"""Instruction data: reading, format detection, the train/eval split, prompts and tokenization.

Validation, training and evaluation all go through these functions so that the data contract checks
exactly what training will see. Every supported format is turned into one canonical shape: the
conversation up to the answer (`prompt_messages`, earlier assistant turns included) and the answer
itself (`response`). Rendering and loss masks are `tasks.chat`'s.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, DataConfig, DataSource, TrainOn
from tasks.chat import IGNORE_INDEX as IGNORE_INDEX  # re-exported: evaluation imports it from here
from tasks.chat import EncodedConversation, encode_conversation, render

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
VALID_ROLES = ("system", "user", "assistant")


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
    def messages(self) -> tuple[dict[str, str], ...]:
        """The whole conversation, the response as its last (assistant) turn: what training renders."""
        return (*self.prompt_messages, {"role": "assistant", "content": self.response})

    @property
    def prompt_key(self) -> str:
        """Normalised prompt text: what duplicates, leakage and the split are decided on."""
        return normalize_text(" ".join(m["content"] for m in self.prompt_messages))


@dataclass
class SourceStats:
    """One data source as loaded: what the lineage records about it.

    `fingerprint` is the source's own, the one `data.path: <path>` alone gives (and its contract
    section reports); `mixed_rows` is how many rows of the mixed train set are this source's.
    """

    path: str
    weight: float
    format: str
    fingerprint: str
    train_rows: int
    eval_rows: int
    mixed_rows: int


@dataclass
class DatasetSplits:
    train: list[Example]
    eval: list[Example]
    format: str
    fingerprint: str
    sources: list[str] = field(default_factory=list)
    mix: list[SourceStats] = field(default_factory=list)  # one per data source, in config order

    def __post_init__(self) -> None:  # read back from JSON (a rank's spec file): dicts become SourceStats
        self.mix = [SourceStats(**item) if isinstance(item, dict) else item for item in self.mix]


def normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def is_local_path(path: str) -> bool:
    return Path(path).exists() or Path(path).suffix in LOCAL_SUFFIXES


def check_data_files(config: DataConfig) -> None:
    """Fail now on a data file that is not there, before a flow run or a schedule starts."""
    named = [("data.path", config.path)] if config.sources is None else [
        (f"data.sources[{i}].path", source.path) for i, source in enumerate(config.sources)]
    for key, path in (*named, ("data.eval_path", config.eval_path)):
        if path and is_local_path(path) and not Path(path).is_file():
            raise ConfigError(f"{key}: file {path} does not exist; point it at a .jsonl/.csv/.parquet file")
    if config.chat_template is not None and not Path(config.chat_template).is_file():
        raise ConfigError(f"data.chat_template: file {config.chat_template} does not exist; point it at a Jinja "
                          "chat template, or remove the key to use the tokenizer's own")


def is_json_file(path: str) -> bool:
    """A local .json/.jsonl file: read with `read_json_records`, never with `datasets`."""
    return is_local_path(path) and LOCAL_SUFFIXES.get(Path(path).suffix) == "json"


@dataclass(frozen=True)
class JsonRecord:
    """One row of a local JSON file as parsed: the object, or why it is not one.

    `line` is the 1-based line in the file (JSON Lines; None for an element of a JSON array). `row`
    holds every value with its JSON type, and a key the line does not have is absent (not None).
    """

    line: int | None
    row: dict[str, Any] | None
    error: str | None = None


def _json_error(error: ValueError) -> str:
    """Why a line is not JSON, with the fix for a file in another encoding."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error}); save the file as UTF-8"
    return f"invalid JSON: {error}"


def read_json_records(path: str | Path) -> list[JsonRecord]:
    """Rows of a local .jsonl file (one object per line) or .json file (one array of objects).

    The stdlib `json` module, not `datasets`: it keeps every value's JSON type exactly, whatever
    precedes it (`datasets` fixes column types from the first 10 MB chunk and re-encoded or cast later
    values of another type), and reads every valid file (datasets 5.2 failed on blank lines once a
    field's type varied, measured). Line by line, so a broken line is named by its number and does
    not hide the others. A leading UTF-8 BOM (Windows tools write one) is dropped; CRLF line ends and
    blank lines are fine (bytes.splitlines splits only on LF, CR and CRLF, so a U+2028 inside a
    string stays text).
    """
    raw = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    if raw.lstrip()[:1] == b"[":  # a .json file holding one array of rows
        try:
            values = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            return [JsonRecord(getattr(exc, "lineno", None), None, _json_error(exc))]
        return [JsonRecord(None, value) if isinstance(value, dict)
                else JsonRecord(None, None, f"element {i} is {json_type(value)}, not a JSON object")
                for i, value in enumerate(values)]
    records = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            records.append(JsonRecord(number, None, _json_error(exc)))
            continue
        if isinstance(value, dict):
            records.append(JsonRecord(number, value))
        else:
            records.append(JsonRecord(number, None, f"{json_type(value)}, not a JSON object"))
    return records


def _read_json_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a local JSON file; DataError naming the first broken lines when any line is not a row."""
    records = read_json_records(path)
    broken = [record for record in records if record.error]
    if broken:
        listed = "; ".join(f"line {r.line}: {r.error}" if r.line else r.error for r in broken[:3])
        more = f" (and {len(broken) - 3} more)" if len(broken) > 3 else ""
        raise DataError(f"could not read {path}: {listed}{more}. Write one JSON object a line "
                        "(or one array of objects); `qlora validate` lists every broken line")
    return [record.row for record in records]


def _csv_read_options(file: Path) -> dict[str, Any]:
    """`load_dataset` options that keep every CSV cell exactly as the file holds it.

    A cell is text; pandas would guess types (`4` becomes 4.0, `1.50` becomes 1.5) and read
    `None`/`NA` as missing. Every column is read as a string, and only an empty cell is missing.
    """
    import datasets
    import pandas as pd

    columns = pd.read_csv(file, nrows=0).columns  # the header, parsed as `datasets` will parse it
    return {"features": datasets.Features({str(name): datasets.Value("string") for name in columns}),
            "keep_default_na": False, "na_values": [""]}


def _read_hub_rows(path: str, hub_split: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(path, split=hub_split)
    except Exception as exc:
        raise ConfigError(f"data.path: '{path}' is neither a local file nor a loadable hub dataset: {exc}") from exc
    return dataset.to_list()


def read_rows(path: str, hub_split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local file or hub dataset as plain dicts, values as the file holds them.

    JSON files are read by `read_json_records` (the data contract reads them with it too); CSV,
    Parquet and hub datasets by `datasets`, which fills a key a row lacks with None. Training reads
    an absent key and a None alike (`row.get`), so both shapes give the same examples.
    """
    if not is_local_path(path):
        return _read_hub_rows(path, hub_split)
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"data.path: file {path} does not exist; point it at a .jsonl/.csv/.parquet file")
    builder = LOCAL_SUFFIXES.get(file.suffix)
    if builder is None:
        raise ConfigError(f"data.path: unsupported file type '{file.suffix}'; use one of {sorted(LOCAL_SUFFIXES)}")
    if builder == "json":
        return _read_json_rows(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        options = _csv_read_options(file) if builder == "csv" else {}
        return datasets.load_dataset(builder, data_files=str(file), split="train", **options).to_list()
    except Exception as exc:  # datasets wraps parser errors in several exception types
        raise DataError(f"could not read {path}: {exc.__class__.__name__}: {exc}") from exc


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
    by `datasets` fill absent keys with None, so by default None counts as absent (training then says
    "missing, null or empty"); the contract passes `null_is_missing=False` for rows read from JSON
    text, and an explicit `null` in a required field is then reported as a JSON null. Metadata
    fields outside the format are not checked.
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
            completion = row.get("completion")
            turns = completion[:-1] if isinstance(completion, list) else []  # earlier completion turns
            messages = tuple({"role": m["role"], "content": m["content"]} for m in [*prompt_value, *turns])
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


def prompt_hash(example: Example) -> int:
    """A stable 64-bit hash of the normalised prompt: the same on every machine and in every row order."""
    return int.from_bytes(hashlib.sha256(example.prompt_key.encode()).digest()[:8], "big")


def in_eval_split(example: Example, eval_fraction: float) -> bool:
    """Stable hash split: a prompt always falls on the same side, whatever the row order or machine."""
    return prompt_hash(example) % 10_000 < round(eval_fraction * 10_000)


def cv_folds(splits: DatasetSplits, k: int) -> list[DatasetSplits]:
    """k cross-validation splits of all rows (train and eval together), by the same stable prompt hash
    as the eval split: fold i evaluates on the prompts hashing to i and trains on the rest, so a prompt
    is never on both sides and the folds are the same on every run."""
    if k < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {k}")
    if len(splits.mix) > 1:
        raise DataError("sweep.cv_folds re-splits one data set, but data.sources mixes several (a mixed train set "
                        "may repeat rows): set sweep.cv_folds=1, or sweep on one source (data.path)")
    rows = splits.train + splits.eval
    folds = []
    for fold in range(k):
        held_out = [e for e in rows if prompt_hash(e) % k == fold]
        kept = [e for e in rows if prompt_hash(e) % k != fold]
        if not held_out or not kept:
            raise DataError(f"cv fold {fold} of {k} is empty: too few rows ({len(rows)}) for {k} folds; lower "
                            "sweep.cv_folds")
        folds.append(DatasetSplits(kept, held_out, splits.format, fingerprint(kept + held_out, splits.format),
                                   list(splits.sources), list(splits.mix)))
    return folds


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
    """Train and eval examples as configured: one source (`data.path`), or `data.sources` mixed by weight.

    Each source is read and split on its own, exactly as `data.path: <source>` alone would be (a
    separate eval file, or the stable hash split), so its fingerprint is that of the one-source load.
    The eval rows of all sources are kept (the eval file once); the train rows are interleaved by
    weight (`mix_train`). One source is the one-source load itself, unmixed.
    """
    sources = config.source_list()
    parts = [_load_source(config, source) for source in sources]
    for source, part in zip(sources, parts, strict=True):
        part.mix = [SourceStats(source.path, source.weight, part.format, part.fingerprint, len(part.train),
                                len(part.eval), len(part.train))]
    if len(parts) == 1:
        return parts[0]
    for i, part in enumerate(parts):
        if not part.train:
            raise DataError(f"data.sources[{i}] ({sources[i].path}) has no train rows ({len(part.eval)} eval rows): "
                            "add rows, lower data.eval_fraction, or remove the source")
    train = mix_train([part.train for part in parts], [s.weight for s in sources], config.mix_seed,
                      config.mix_stopping)
    evaluation = parts[0].eval if config.eval_path else [e for part in parts for e in part.eval]
    formats = list(dict.fromkeys(part.format for part in parts))
    fmt = formats[0] if len(formats) == 1 else "+".join(formats)
    mixed = {path: 0 for path in (s.path for s in sources)}
    for example in train:
        mixed[example.source] += 1
    stats = [stat for part in parts for stat in part.mix]
    for stat in stats:
        stat.mixed_rows = mixed[stat.path]
    paths = list(dict.fromkeys(path for part in parts for path in part.sources))
    return DatasetSplits(train, evaluation, fmt, fingerprint(train + evaluation, fmt), paths, stats)


def _load_source(config: DataConfig, source: DataSource) -> DatasetSplits:
    """One source's train and eval examples (`source` as resolved by `DataConfig.source_list`): a separate
    eval file, or a hash split of its rows by the source's eval fraction (0: every row trains)."""
    examples, fmt = load_examples(source.path, source.format or config.format, config.hub_split)
    sources = [source.path]
    if config.eval_path:
        eval_examples, eval_fmt = load_examples(config.eval_path, source.format or config.format, config.hub_split)
        if eval_fmt != fmt:
            raise DataError(f"data.eval_path is in format '{eval_fmt}' but {source.path} is '{fmt}'; use one format")
        train_examples = examples
        sources.append(config.eval_path)
    else:
        train_examples = [e for e in examples if not in_eval_split(e, source.eval_fraction)]
        eval_examples = [e for e in examples if in_eval_split(e, source.eval_fraction)]
    digest = fingerprint(train_examples + eval_examples, fmt)
    return DatasetSplits(train_examples, eval_examples, fmt, digest, sources)


def mix_train(parts: list[list[Example]], weights: list[float], seed: int, stopping: str) -> list[Example]:
    """The train rows of several sources interleaved by weight: `datasets.interleave_datasets` over
    (source, row) index tables, with the weights normalised to probabilities. Same seed, same order."""
    import datasets

    datasets.disable_progress_bars()
    tables = [datasets.Dataset.from_dict({"part": [i] * len(part), "row": list(range(len(part)))})
              for i, part in enumerate(parts)]
    total = sum(weights)
    mixed = datasets.interleave_datasets(tables, probabilities=[w / total for w in weights], seed=seed,
                                         stopping_strategy=stopping).to_dict()
    return [parts[part][row] for part, row in zip(mixed["part"], mixed["row"], strict=True)]


def render_prompt(tokenizer: Any, prompt_messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    """The text the model sees before its answer: the chat template (or the fallback) with the generation prompt."""
    return render(tokenizer, prompt_messages, add_generation_prompt=True)


def encode_example(tokenizer: Any, example: Example, train_on: TrainOn = "all_assistant") -> EncodedConversation:
    """The whole conversation rendered and tokenized once, with the token ranges that carry loss."""
    return encode_conversation(tokenizer, example.messages, train_on)


def tokenize_example(tokenizer: Any, example: Example, max_seq_length: int,
                     train_on: TrainOn = "all_assistant") -> dict[str, list[int]]:
    """input_ids and labels: loss on the assistant turns `train_on` names, each with its end-of-turn token.

    The conversation is rendered with the chat template as a whole, as it is served, and cut to
    max_seq_length (the data contract reports rows where that cuts a trained turn).
    """
    return encode_example(tokenizer, example, train_on).features(max_seq_length)
