"""Every valid way to write the same data passes the contract and trains on exactly the same rows.

Each case writes the same rows another way (BOM and CRLF as Windows tools write them, raw UTF-8, a
JSON array, CSV, blank lines, no final newline) and checks two things against the plain JSONL
equivalent (ASCII-escaped JSON, LF, one object per line): the real GX contract passes, and
`load_splits` gives the same examples and the same fingerprint.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable
from itertools import cycle
from pathlib import Path

import pytest

from tasks.data import DataError, DatasetSplits, load_splits, read_rows
from tasks.demo_assets import generate_rows
from tasks.validate import validate_data

GOOD = generate_rows(0, 16)
# Thresholds the 16 rows clear; a longer max_seq_length as the byte-level demo tokenizer spends several
# tokens per emoji or CJK character (length is not what these tests are about).
SMALL = ["data.format=auto", "data.validation.min_train_rows=5", "data.validation.min_eval_rows=2",
         "data.max_seq_length=128"]
# Non-ASCII text of several scripts, emoji (outside the BMP), a U+2028 line separator inside a
# string (a line break to str.splitlines, plain text to JSON) and characters CSV must quote.
UNICODE = ["café naïve", "东京 上海", "😀 🚀", "Ünïcödé “quoted”", "a\u2028b", 'comma, "quote"']
NUMBER_LIKE = ["4", "1.50", "None", "NA", "007", "true", "null"]  # answers a CSV reader could mistake


def with_unicode(rows: list[dict]) -> list[dict]:
    return [{**row, "input": f"{row['input']} {text}", "output": f"{row['output']} {text}"}
            for row, text in zip(rows, cycle(UNICODE), strict=False)]


def with_number_like_answers(rows: list[dict]) -> list[dict]:
    return [{**row, "output": text} for row, text in zip(rows, cycle(NUMBER_LIKE), strict=False)]


def jsonl(rows: list[dict], newline: str = "\n", bom: bool = False, tail: str = "\n") -> bytes:
    """Raw UTF-8 JSON lines (as editors write them), with the given line ending and file ending."""
    text = newline.join(json.dumps(row, ensure_ascii=False) for row in rows) + tail
    return (codecs.BOM_UTF8 if bom else b"") + text.encode()


def json_array(rows: list[dict], newline: str = "\n", bom: bool = False) -> bytes:
    text = json.dumps(rows, ensure_ascii=False, indent=2).replace("\n", newline)
    return (codecs.BOM_UTF8 if bom else b"") + text.encode()


def csv_file(rows: list[dict], newline: str = "\n", bom: bool = False) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["instruction", "input", "output"], lineterminator=newline)
    writer.writeheader()
    writer.writerows(rows)
    return (codecs.BOM_UTF8 if bom else b"") + buffer.getvalue().encode()


Writer = Callable[[list[dict]], bytes]
CASES: dict[str, tuple[str, Callable[[list[dict]], list[dict]], Writer]] = {
    # id: (file suffix, the rows, how they are written)
    "jsonl-bom-crlf": (".jsonl", list, lambda rows: jsonl(rows, "\r\n", bom=True, tail="\r\n")),
    "jsonl-bom-crlf-unicode": (".jsonl", with_unicode, lambda rows: jsonl(rows, "\r\n", bom=True, tail="\r\n")),
    "jsonl-bom-only": (".jsonl", list, lambda rows: jsonl(rows, bom=True)),
    "jsonl-crlf-only": (".jsonl", list, lambda rows: jsonl(rows, "\r\n", tail="\r\n")),
    "jsonl-unicode-utf8": (".jsonl", with_unicode, jsonl),
    "jsonl-trailing-blank-lines": (".jsonl", list, lambda rows: jsonl(rows, tail="\n\n\n")),
    "jsonl-trailing-blank-lines-crlf": (".jsonl", list, lambda rows: jsonl(rows, "\r\n", tail="\r\n\r\n  \r\n")),
    "jsonl-blank-lines-between-rows": (".jsonl", list, lambda rows: jsonl(rows, "\n\n")),
    "jsonl-no-final-newline": (".jsonl", list, lambda rows: jsonl(rows, tail="")),
    "json-array-unicode": (".json", with_unicode, json_array),
    "json-array-bom-crlf": (".json", list, lambda rows: json_array(rows, "\r\n", bom=True)),
    "csv-unicode": (".csv", with_unicode, csv_file),
    "csv-bom-crlf": (".csv", list, lambda rows: csv_file(rows, "\r\n", bom=True)),
    "csv-number-like-answers": (".csv", with_number_like_answers, csv_file),
}


def plain_jsonl(rows: list[dict]) -> bytes:
    """The reference: ASCII-escaped JSON, one object per LF-terminated line."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def content(splits: DatasetSplits) -> dict[str, list]:
    """What training sees of each split: row number, prompt messages and response, in order."""
    return {name: [(e.row, e.prompt_messages, e.response) for e in examples]
            for name, examples in (("train", splits.train), ("eval", splits.eval))}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_valid_file_passes_the_contract_and_loads_like_plain_jsonl(case, make_config, tmp_path) -> None:
    suffix, make_rows, write = CASES[case]
    train_rows, eval_rows = make_rows(GOOD[:12]), make_rows(GOOD[12:])

    def config_for(name: str, writer: Writer, file_suffix: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"train{file_suffix}").write_bytes(writer(train_rows))
        (folder / f"eval{file_suffix}").write_bytes(writer(eval_rows))
        return make_config(*SMALL, f"data.path={folder / f'train{file_suffix}'}",
                           f"data.eval_path={folder / f'eval{file_suffix}'}")

    variant = config_for("variant", write, suffix)
    reference = config_for("plain", plain_jsonl, ".jsonl")
    assert Path(variant.data.path).read_bytes() != Path(reference.data.path).read_bytes()  # really another file

    result = validate_data(variant)
    assert result.success, result.markdown()
    assert result.row_counts == {"rows": len(train_rows) + len(eval_rows), "train": len(train_rows),
                                 "eval": len(eval_rows)}

    expected = load_splits(reference.data)
    loaded = load_splits(variant.data)
    assert content(loaded) == content(expected)
    assert loaded.format == expected.format == "alpaca"
    assert result.fingerprint == loaded.fingerprint == expected.fingerprint


def test_wrong_type_in_a_file_with_blank_lines_and_a_bom_is_named_with_its_line(make_config, tmp_path) -> None:
    """Blank lines and the BOM do not shift line numbers: the contract names the real line and type,
    nothing else fails, and training refuses the same row."""
    rows = [*GOOD[:12]]
    rows[4] = {**rows[4], "output": 5}
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(rows, "\r\n\r\n", bom=True))  # row 4 is on line 9
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_bytes(plain_jsonl(GOOD[12:]))
    config = make_config(*SMALL, f"data.path={train}", f"data.eval_path={eval_path}")

    result = validate_data(config)
    assert result.failed_names() == ["text_fields_are_strings"], result.markdown()
    (example,) = result.expectation("text_fields_are_strings")["examples"]
    assert (example["line"], example["row"]) == (9, 4)
    assert example["detail"] == "field 'output' is a JSON number, expected a string"
    with pytest.raises(DataError, match="train.jsonl row 4: field 'output' is a JSON number"):
        load_splits(config.data)


def test_blank_lines_with_a_mixed_type_metadata_field_pass_and_load_every_value_as_written(
        make_config, tmp_path) -> None:
    """A metadata field whose JSON type varies (ids 1 and "b-2") plus blank lines, even a trailing
    one, is valid JSON Lines (datasets 5.2 could not read it, measured): the contract passes,
    training loads the same examples as without the blank lines, and every id keeps its type."""
    rows = [{**row, "id": i if i % 2 else f"b-{i}"} for i, row in enumerate(GOOD[:12])]
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(rows, "\n\n", tail="\n\n"))
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_bytes(plain_jsonl(GOOD[12:]))
    config = make_config(*SMALL, f"data.path={train}", f"data.eval_path={eval_path}")

    result = validate_data(config)
    assert result.success, result.markdown()
    assert read_rows(str(train)) == rows  # 1 stays a number and "b-2" a string
    loaded = load_splits(config.data)
    assert [e.response for e in loaded.train] == [row["output"] for row in rows]

    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(plain_jsonl(rows))
    expected = load_splits(config.data.model_copy(update={"path": str(plain)}))
    assert content(loaded) == content(expected)
    assert result.fingerprint == loaded.fingerprint == expected.fingerprint


def test_a_wrong_type_after_the_first_10_mb_is_refused_not_cast(make_config, tmp_path, monkeypatch) -> None:
    """`datasets` fixes column types from its first 10 MB chunk. Loaded that way, a number further on
    came back as the string '7' and every later string of the column as JSON text with its quotes
    (measured with datasets 5.2); training must see the real values and refuse the row."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep 10 MB out of ~/.cache
    template = GOOD[0]
    line_bytes = len(json.dumps(template)) + 8
    count = (10 << 20) // line_bytes + 1_000  # just past the first chunk
    rows = [{**template, "input": f"{template['input']} {i}"} for i in range(count)]
    rows[-1] = {**rows[-1], "output": 7}
    train = tmp_path / "big.jsonl"
    train.write_bytes(plain_jsonl(rows))
    assert train.stat().st_size > 10 << 20
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_bytes(plain_jsonl(GOOD[12:]))
    config = make_config(*SMALL, f"data.path={train}", f"data.eval_path={eval_path}")
    with pytest.raises(DataError, match=rf"big.jsonl row {count - 1}: field 'output' is a JSON number"):
        load_splits(config.data)
