"""The data contract: each kind of bad data fails its own named expectation; the demo dataset passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.data import DataError, load_splits, read_rows
from tasks.demo_assets import generate_rows
from tasks.validate import UNREADABLE, DataValidationError, ValidationResult, require_valid, validate_data
from tests.conftest import DEMO_CONFIG

# The first demo rows: short, in the demo tokenizer's vocabulary, unique prompts.
GOOD = generate_rows(0, 16)
TRAIN, EVAL = GOOD[:12], GOOD[12:]
SMALL = ["data.format=auto", "data.validation.min_train_rows=5", "data.validation.min_eval_rows=2"]


def write_jsonl(path: Path, items: list) -> Path:
    """dicts become JSON lines; strings are written as they are (for broken lines)."""
    path.write_text("".join((json.dumps(item) if isinstance(item, dict) else item) + "\n" for item in items))
    return path


def chat(row: dict, system: bool = False) -> dict:
    messages = [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                {"role": "assistant", "content": row["output"]}]
    return {"messages": ([{"role": "system", "content": "Be brief."}] if system else []) + messages}


@pytest.fixture
def check(make_config, tmp_path):
    """Validate a small train file (+ a separate eval file, so the split is exact) with overrides."""

    def run(train: list, *overrides: str, eval_rows: list | None = None) -> ValidationResult:
        train_path = write_jsonl(tmp_path / "train.jsonl", train)
        eval_path = write_jsonl(tmp_path / "eval.jsonl", EVAL if eval_rows is None else eval_rows)
        config = make_config(*SMALL, f"data.path={train_path}", f"data.eval_path={eval_path}", *overrides)
        return validate_data(config)

    return run


def failed(result: ValidationResult) -> set[str]:
    return set(result.failed_names())


def example_lines(result: ValidationResult, name: str) -> list[int]:
    return [example["line"] for example in result.expectation(name)["examples"]]


def test_demo_dataset_passes_and_fingerprints_what_training_sees(make_config) -> None:
    config = make_config()
    result = validate_data(config)
    assert result.success, result.markdown()
    assert failed(result) == set()
    splits = load_splits(config.data)
    assert result.fingerprint == splits.fingerprint
    assert result.row_counts == {"rows": 3000, "train": len(splits.train), "eval": len(splits.eval)}
    assert result.format == "alpaca"
    assert require_valid(result) is result
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["success"] is True and len(payload["expectations"]) == 17
    entry = result.expectation("length_within_max_seq_length")
    assert entry["expectation_type"] == "expect_column_values_to_be_between"
    assert "| `no_eval_leakage` | pass |" in result.markdown()


def test_broken_json_line_is_reported_with_its_line_number(check) -> None:
    lines = [*TRAIN[:5], '{"instruction": "Rewrite this in Zorbish.", "output": "tog', *TRAIN[5:]]
    result = check(lines)
    assert failed(result) == {"rows_parse"}
    assert example_lines(result, "rows_parse") == [6]
    assert "invalid JSON" in result.expectation("rows_parse")["examples"][0]["detail"]
    assert result.fingerprint == UNREADABLE  # training could not read this file
    assert "line 6" in result.markdown()
    with pytest.raises(DataError, match="train.jsonl: line 6: invalid JSON"):  # training names the same line
        read_rows(result.sources[0])


def test_missing_fields_fail_required_fields(check) -> None:
    no_output = {"instruction": "Rewrite this in Zorbish.", "input": "red cat"}
    result = check([*TRAIN[:2], no_output, *TRAIN[2:6], {"text": "no known format"}, *TRAIN[6:]])
    assert failed(result) == {"required_fields"}
    assert example_lines(result, "required_fields") == [3, 8]
    details = [e["detail"] for e in result.expectation("required_fields")["examples"]]
    assert details == ["missing output (alpaca)", "missing instruction, output (alpaca)"]


def test_empty_prompt_and_response_fail_and_the_gate_names_them(check) -> None:
    empty_response = {"instruction": "Rewrite this in Zorbish.", "input": "red cat", "output": "   "}
    empty_prompt = {"instruction": " ", "output": "tog"}
    result = check([*TRAIN[:3], empty_response, *TRAIN[3:], empty_prompt])
    assert failed(result) == {"no_empty_response", "no_empty_prompt"}
    assert example_lines(result, "no_empty_response") == [4]
    assert example_lines(result, "no_empty_prompt") == [14]
    with pytest.raises(DataValidationError) as caught:
        require_valid(result)
    assert isinstance(caught.value, DataError)  # the CLI and flow error handlers catch it
    message = str(caught.value)
    assert "no_empty_response" in message.splitlines()[0] and "no_empty_prompt" in message.splitlines()[0]
    assert "| `no_empty_response` | **FAIL** |" in message


def user(content) -> dict:
    return {"role": "user", "content": content}


def assistant(content) -> dict:
    return {"role": "assistant", "content": content}


def prompt_completion(row: dict) -> dict:
    return {"prompt": f"{row['instruction']}\n\n{row['input']}", "completion": row["output"]}


def conversational(row: dict) -> dict:
    """TRL's conversational prompt/completion: both are message lists."""
    return {"prompt": [user(f"{row['instruction']}\n\n{row['input']}")], "completion": [assistant(row["output"])]}


ROW = TRAIN[6]  # becomes line 7 of the train file, with one field of the wrong JSON type
PROMPT = f"{ROW['instruction']}\n\n{ROW['input']}"
WRONG_TYPES = {
    # id: (how every good row is written, the bad line 7, what the report must say about it)
    "alpaca-output-number": (dict, {**ROW, "output": 42}, "field 'output' is a JSON number, expected a string"),
    "alpaca-output-float": (dict, {**ROW, "output": 4.5}, "field 'output' is a JSON number, expected a string"),
    "alpaca-output-bool": (dict, {**ROW, "output": True}, "field 'output' is a JSON boolean, expected a string"),
    "alpaca-output-null": (dict, {**ROW, "output": None}, "field 'output' is a JSON null, expected a string"),
    "alpaca-output-object": (dict, {**ROW, "output": {"text": ROW["output"]}},
                             "field 'output' is a JSON object, expected a string"),
    "alpaca-output-list": (dict, {**ROW, "output": ROW["output"].split()},
                           "field 'output' is a JSON array, expected a string"),
    "alpaca-instruction-list": (dict, {**ROW, "instruction": [ROW["instruction"]]},
                                "field 'instruction' is a JSON array, expected a string"),
    "alpaca-input-number": (dict, {**ROW, "input": 7}, "field 'input' is a JSON number, expected a string or null"),
    "chat-content-number": (chat, {"messages": [user(PROMPT), assistant(42)]},
                            "field 'messages[1].content' is a JSON number, expected a string"),
    "chat-content-null": (chat, {"messages": [user(None), assistant(ROW["output"])]},
                          "field 'messages[0].content' is a JSON null, expected a string"),
    "chat-content-parts": (chat, {"messages": [user([{"type": "text", "text": PROMPT}]), assistant(ROW["output"])]},
                           "field 'messages[0].content' is a JSON array, expected a string"),
    "chat-message-string": (chat, {"messages": [user(PROMPT), ROW["output"]]},
                            "field 'messages[1]' is a JSON string, expected an object with role and content"),
    "chat-messages-string": (chat, {"messages": PROMPT},
                             "field 'messages' is a JSON string, expected an array of {role, content} objects"),
    "prompt-completion-number": (prompt_completion, {"prompt": PROMPT, "completion": 42},
                                 "field 'completion' is a JSON number, expected a string (as the prompt is one)"),
    "prompt-completion-prompt-object": (prompt_completion, {"prompt": {"text": PROMPT}, "completion": ROW["output"]},
                                        "field 'prompt' is a JSON object, expected a string or an array of"),
    "prompt-completion-list-after-text-prompt": (
        prompt_completion, {"prompt": PROMPT, "completion": [assistant(ROW["output"])]},
        "field 'completion' is a JSON array, expected a string (as the prompt is one)"),
    "conversational-content-number": (conversational, {"prompt": [user(PROMPT)], "completion": [assistant(42)]},
                                      "field 'completion[0].content' is a JSON number, expected a string"),
}


@pytest.mark.parametrize("case", WRONG_TYPES, ids=str)
def test_wrong_json_type_fails_the_contract_and_training_refuses_it(case, make_config, tmp_path) -> None:
    write_row, bad, expected = WRONG_TYPES[case]
    train = write_jsonl(tmp_path / "train.jsonl", [*map(write_row, TRAIN[:6]), bad, *map(write_row, TRAIN[7:])])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [write_row(row) for row in EVAL])
    config = make_config(*SMALL, f"data.path={train}", f"data.eval_path={eval_path}")

    result = validate_data(config)
    assert failed(result) == {"text_fields_are_strings"}, result.markdown()  # only the type check, nothing else
    entry = result.expectation("text_fields_are_strings")
    assert entry["unexpected_count"] == 1 and example_lines(result, "text_fields_are_strings") == [7]
    assert expected in entry["examples"][0]["detail"]
    assert f"line 7: {expected}" in result.markdown()
    assert result.fingerprint == UNREADABLE  # training cannot load it either

    with pytest.raises(DataError) as refused:  # training's loader refuses the row instead of training str(value)
        load_splits(config.data)
    message = str(refused.value)
    assert f"{train} row 6:" in message  # 0-based row 6 is line 7
    if bad.get("output", "") is not None:  # training reads a null like an absent key: "missing, null"
        assert expected in message
    else:
        assert "field 'output' is missing, null or empty" in message


def test_several_wrong_types_are_each_named_with_their_line(check) -> None:
    rows = [*TRAIN[:2], {**TRAIN[2], "output": 3}, *TRAIN[3:8], {**TRAIN[8], "input": ["a", "b"]}, *TRAIN[9:]]
    result = check(rows)
    assert failed(result) == {"text_fields_are_strings"}
    details = [f"line {e['line']}: {e['detail']}" for e in result.expectation("text_fields_are_strings")["examples"]]
    assert details == ["line 3: field 'output' is a JSON number, expected a string",
                       "line 9: field 'input' is a JSON array, expected a string or null"]


def test_an_absent_field_is_missing_not_a_type_problem(check) -> None:
    absent = {key: value for key, value in TRAIN[4].items() if key != "output"}
    result = check([*TRAIN[:4], absent, *TRAIN[5:]])
    assert failed(result) == {"required_fields"}
    assert result.expectation("text_fields_are_strings")["unexpected_count"] == 0


def test_chat_role_problems_fail_their_own_expectations(check) -> None:
    rows = [chat(row, system=i == 0) for i, row in enumerate(TRAIN)]
    user, assistant = {"role": "user", "content": "red cat"}, {"role": "assistant", "content": "tog"}
    rows.insert(2, {"messages": [user, user, assistant]})  # line 3: two user turns in a row
    rows.insert(5, {"messages": [user, assistant, user]})  # line 6: ends with the user
    rows.insert(8, {"messages": [user, {"role": "bot", "content": "hi"}, assistant]})  # line 9: unknown role
    result = check(rows, eval_rows=[chat(row) for row in EVAL])
    assert result.format == "chat"
    assert failed(result) == {"chat_alternates", "ends_with_assistant", "chat_roles_valid"}
    assert example_lines(result, "chat_alternates") == [3]
    assert example_lines(result, "ends_with_assistant") == [6]
    assert example_lines(result, "chat_roles_valid") == [9]
    assert "user > user > assistant" in result.expectation("chat_alternates")["examples"][0]["detail"]


def test_good_chat_data_passes(check) -> None:
    result = check([chat(row, system=i % 2 == 0) for i, row in enumerate(TRAIN)],
                   eval_rows=[chat(row) for row in EVAL])
    assert result.success, result.markdown()
    assert result.expectation("chat_alternates")["element_count"] == len(TRAIN) + len(EVAL)


def test_template_that_cannot_render_fails_template_renders(check, demo_assets, tmp_path) -> None:
    model = tmp_path / "strict-template"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(demo_assets.model_dir / name, model / name)
    template = (demo_assets.model_dir / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" + template
    )
    rows = [chat(row, system=i in (1, 4)) for i, row in enumerate(TRAIN)]
    result = check(rows, f"model.name_or_path={model}", eval_rows=[chat(row) for row in EVAL])
    assert failed(result) == {"template_renders"}
    assert example_lines(result, "template_renders") == [2, 5]
    assert "no system turns" in result.expectation("template_renders")["examples"][0]["detail"]


def test_overlong_rows_fail_above_the_tolerated_share(check) -> None:
    long_input = " ".join(["red cat runs near the old river"] * 12)
    long_row = {"instruction": "Rewrite this in Zorbish.", "input": long_input, "output": "tog " * 40}
    rows = [*TRAIN[:4], long_row, *TRAIN[4:8], {**long_row, "input": long_input + " again"}, *TRAIN[8:]]
    # 2 of 16 rows = 12.5%; cut at max_seq_length, their responses also lose their stop token
    strict = check(rows, "data.validation.max_overlong_share=0.1", "data.validation.max_unterminated_share=0.15")
    assert failed(strict) == {"length_within_max_seq_length"}
    assert example_lines(strict, "length_within_max_seq_length") == [5, 10]
    assert strict.expectation("length_within_max_seq_length")["unexpected_count"] == 2
    tolerant = check(rows, "data.validation.max_overlong_share=0.15", "data.validation.max_unterminated_share=0.15")
    assert tolerant.success, tolerant.markdown()


TEMPLATES = Path(__file__).parent / "fixtures" / "templates"


def test_a_template_without_an_end_of_turn_token_fails_the_stop_check(check) -> None:
    """Rendered with a template that ends turns with plain text, no trained response ends with a token
    generation stops at: the model would learn to run on until max_new_tokens."""
    assert check(TRAIN).success  # the same rows with the demo's template, which ends turns with <|end|>
    result = check(TRAIN, f"data.chat_template={TEMPLATES / 'no_end_of_turn.jinja'}")
    assert failed(result) == {"turns_end_with_stop_token"}, result.markdown()
    entry = result.expectation("turns_end_with_stop_token")
    assert entry["unexpected_count"] == len(TRAIN) + len(EVAL)
    assert "generation stops at (<|end|>)" in entry["expected"]
    assert "not with a stop token (<|end|>)" in entry["examples"][0]["detail"]
    assert "data.chat_template" in entry["examples"][0]["detail"]  # the fix


def test_a_response_cut_by_max_seq_length_fails_the_stop_check_unless_tolerated(check) -> None:
    long_row = {**TRAIN[3], "output": " ".join([TRAIN[3]["output"]] * 20)}
    rows = [*TRAIN[:3], long_row, *TRAIN[4:]]  # line 4; 1 of 16 rows = 6.25%
    strict = check(rows, "data.validation.max_overlong_share=0.1")  # the length check tolerates the row
    assert failed(strict) == {"turns_end_with_stop_token"}, strict.markdown()
    assert example_lines(strict, "turns_end_with_stop_token") == [4]
    assert "cut by data.max_seq_length=64" in strict.expectation("turns_end_with_stop_token")["examples"][0]["detail"]
    tolerant = check(rows, "data.validation.max_overlong_share=0.1", "data.validation.max_unterminated_share=0.1")
    assert tolerant.success, tolerant.markdown()


def test_loss_token_share_below_the_floor_fails(check) -> None:
    result = check(TRAIN, "data.validation.min_loss_token_share=0.9")
    assert failed(result) == {"loss_token_share"}
    assert 0.1 < result.expectation("loss_token_share")["observed_value"] < 0.9


def test_duplicates_in_train_fail_unless_tolerated(check) -> None:
    copy = {**TRAIN[1], "input": "  " + TRAIN[1]["input"].upper(), "output": "different answer"}
    rows = [*TRAIN, copy]  # same prompt after normalisation (case, whitespace)
    result = check(rows)
    assert failed(result) == {"no_duplicates_in_train"}
    assert example_lines(result, "no_duplicates_in_train") == [2, 13]
    assert check(rows, "data.validation.max_duplicate_share=0.2").success


def test_eval_prompt_also_in_train_is_leakage(check) -> None:
    leaked = {**TRAIN[3], "input": TRAIN[3]["input"].title()}
    result = check(TRAIN, eval_rows=[*EVAL, leaked])
    assert failed(result) == {"no_eval_leakage"}
    (example,) = result.expectation("no_eval_leakage")["examples"]
    assert example["split"] == "eval" and example["line"] == 5 and example["source"].endswith("eval.jsonl")


def test_too_few_rows_fail_the_row_counts(check) -> None:
    result = check(TRAIN, "data.validation.min_train_rows=13", "data.validation.min_eval_rows=5")
    assert failed(result) == {"train_row_count", "eval_row_count"}
    assert result.expectation("train_row_count")["observed_value"] == 12
    assert result.expectation("eval_row_count")["observed_value"] == 4


def test_mixed_formats_fail_format_consistent(check) -> None:
    result = check([*TRAIN[:6], chat(TRAIN[6]), *TRAIN[7:]])
    assert result.format == "alpaca"  # the majority; the chat row is the odd one out
    assert "format_consistent" in failed(result)
    assert example_lines(result, "format_consistent") == [7]
    assert result.fingerprint == UNREADABLE
    declared = check(TRAIN, "data.format=chat")  # a config naming the wrong format fails every row
    assert "format_consistent" in failed(declared)
    assert declared.expectation("format_consistent")["unexpected_count"] == len(TRAIN) + len(EVAL)


def test_prompt_completion_csv_passes_and_writes_data_docs(make_config, tmp_path) -> None:
    import pandas as pd

    def frame(rows: list[dict]):
        return pd.DataFrame({"prompt": [f"{r['instruction']}\n\n{r['input']}" for r in rows],
                             "completion": [r["output"] for r in rows]})

    frame(TRAIN).to_csv(tmp_path / "train.csv", index=False)
    frame(EVAL).to_csv(tmp_path / "eval.csv", index=False)
    config = make_config(*SMALL, f"data.path={tmp_path / 'train.csv'}", f"data.eval_path={tmp_path / 'eval.csv'}",
                         f"data.validation.data_docs_dir={tmp_path / 'docs'}")
    result = validate_data(config)
    assert result.success and result.format == "prompt_completion", result.markdown()
    assert result.data_docs and Path(result.data_docs).is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))


def test_cli_validate_exit_codes(demo_assets, tmp_path) -> None:
    from flows.cli import app

    runner = CliRunner()
    base = ["validate", "--config", str(DEMO_CONFIG), "--set", f"model.name_or_path={demo_assets.model_dir}",
            "--set", f"data.eval_path={write_jsonl(tmp_path / 'eval.jsonl', EVAL)}",
            *[arg for item in SMALL for arg in ("--set", item)]]
    good = runner.invoke(app, [*base, str(write_jsonl(tmp_path / "good.jsonl", TRAIN))])
    assert good.exit_code == 0, good.output
    assert "Data contract passed" in good.output

    bad = runner.invoke(app, [*base, str(write_jsonl(tmp_path / "bad.jsonl", [*TRAIN, "{broken"]))])
    assert bad.exit_code == 1, bad.output
    assert "| `rows_parse` | **FAIL** |" in bad.output and "line 13" in bad.output

    as_json = runner.invoke(app, [*base, "--json", str(tmp_path / "bad.jsonl")])
    assert as_json.exit_code == 1
    payload = json.loads(as_json.stdout)
    assert payload["success"] is False and payload["fingerprint"] == UNREADABLE
    # what `qlora register --validation FILE` reads back: the same result, typed
    saved = tmp_path / "validation.json"
    saved.write_text(as_json.stdout)
    restored = ValidationResult.from_json(saved)
    assert restored.to_dict() == payload and "rows_parse" in restored.failed_names()
    with pytest.raises(DataError, match=f"{tmp_path / 'eval.jsonl'} is not a saved ValidationResult"):
        ValidationResult.from_json(tmp_path / "eval.jsonl")

    missing = runner.invoke(app, [*base, str(tmp_path / "nothere.jsonl")])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())
