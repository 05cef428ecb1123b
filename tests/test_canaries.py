"""Canary files: the format is checked with a clear error, and each expectation kind matches as documented."""

from __future__ import annotations

import pytest

from configs.schema import ConfigError
from tasks.canaries import Expectation, check_canaries, load_canaries


@pytest.mark.parametrize(("expect", "answer", "passes"), [
    ({"exact": "zel vobip"}, " zel vobip\n", True),
    ({"exact": "zel vobip"}, "zel vobip vup", False),
    ({"contains": "vobip"}, "zel vobip vup", True),
    ({"contains": "vobip"}, "zel vup", False),
    ({"regex": r"^(?!.*\bred\b)\S"}, "zel vobip", True),
    ({"regex": r"^(?!.*\bred\b)\S"}, "the red cat", False),
])
def test_each_expectation_kind(expect, answer, passes) -> None:
    assert Expectation(**expect).matches(answer) is passes


def test_the_demo_canaries_load(demo_assets) -> None:
    from tasks.demo_assets import COPY_CANARY_SENTENCE, zorbish_lexicon

    canaries = load_canaries(demo_assets.canaries_path)
    assert {"vobip", "bus"} == {zorbish_lexicon(0)[w] for w in ("red", "fish")}  # the answers below
    assert len(canaries) == 4 and all(c.prompt for c in canaries)
    copied = COPY_CANARY_SENTENCE
    result = check_canaries(canaries, ["zel vobip vup dizab", "zel vobip vup", "zel lol bus", copied], "demo")
    assert result["failed"] == 0, result
    # an adapter that answers in English, and one that forgot how to repeat a sentence (answers in Zorbish)
    result = check_canaries(canaries, ["the red cat runs", "the red cat", "the big fish", "zel kab"], "demo")
    assert result["failed"] == 4 and [r["passed"] for r in result["results"]] == [False] * 4


@pytest.mark.parametrize(("text", "message"), [
    ("- prompt: hi\n  expect: {exact: a, contains: b}\n", "entry 1 of .*expect needs exactly one of exact, contains, "
                                                          r"regex; got \['exact', 'contains'\]"),
    ("- prompt: hi\n  expect: {}\n", "expect needs exactly one"),
    ("- prompt: hi\n  expect: {regex: '('}\n", "is not a valid regular expression"),
    ("- prompt: hi\n  expect: {equals: a}\n", r"entry 1 of .*expect\.equals: Extra inputs are not permitted"),
    ("- expect: {exact: a}\n", "entry 1 of .*prompt: Field required"),
    ("prompt: hi\n", "must hold a non-empty list"),
    ("[]\n", "must hold a non-empty list"),
    ("- [unclosed\n", "is not valid YAML"),
])
def test_a_bad_canary_file_is_refused_naming_the_problem(tmp_path, text, message) -> None:
    path = tmp_path / "canaries.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"evaluation.canaries: .*{message}"):
        load_canaries(path)


def test_a_missing_canary_file_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="evaluation.canaries: file .*missing.yaml not found"):
        load_canaries(tmp_path / "missing.yaml")


def test_general_text_file_problems_are_refused(tmp_path) -> None:
    from tasks.evaluate import read_general_text

    with pytest.raises(ConfigError, match="evaluation.general_text: file .* not found"):
        read_general_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no text"):
        read_general_text(empty)
    text = tmp_path / "general.txt"
    text.write_text("\ufeffone passage\r\n\r\ntwo passages\n")
    assert read_general_text(text).passages == ["one passage", "two passages"]
    assert read_general_text(text).describe() == {"path": str(text), "passages": 2, "kind": "passages"}
    chat = tmp_path / "general.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    general = read_general_text(chat)
    assert general.kind == "conversations" and general.conversations[0].response == "hello"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user"\n')
    with pytest.raises(ConfigError, match="evaluation.general_text: .*broken.jsonl is not a readable data file"):
        read_general_text(broken)
