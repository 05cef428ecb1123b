"""Multi-turn chat trained the way it is served: loss masks, end-of-turn stops and the template override.

The masks are checked on real templates (tests/fixtures/templates: ChatML, Llama 3, the demo's)
with the real demo tokenizer, to which the ChatML and Llama 3 special tokens are added, loaded through
`tasks.modeling.load_tokenizer` with `data.chat_template` pointing at the fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.chat import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    ChatTemplateError,
    chat_format,
    encode_conversation,
    stop_token_ids,
    termination_problem,
)
from tasks.data import Example, load_splits, render_prompt, tokenize_example
from tasks.demo_assets import CHAT_TEMPLATE
from tasks.modeling import load_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
EXTRA_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "demo": "<|end|>"}
# Three user/assistant exchanges after a system message.
CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Translate the sentence into Zorbish.\n\nred cat"},
    {"role": "assistant", "content": "zel vobip"},
    {"role": "user", "content": "Rewrite this in Zorbish.\n\nbig dog runs"},
    {"role": "assistant", "content": "mor tak sivo"},
    {"role": "user", "content": "Give the Zorbish version of the text.\n\nthe old river"},
    {"role": "assistant", "content": "ka lod rimu"},
)
ASSISTANT_CONTENTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def chat_tokenizer_dir(demo_assets, tmp_path_factory) -> Path:
    """The demo tokenizer plus the special tokens of the ChatML and Llama 3 fixture templates."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_assets.model_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL_TOKENS})
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tokenizer_for(make_config, chat_tokenizer_dir):
    """load_tokenizer (the pipeline's one loader) with data.chat_template set to a fixture template."""

    def load(template: str, *overrides: str):
        config = make_config(f"model.name_or_path={chat_tokenizer_dir}",
                             f"data.chat_template={TEMPLATES / f'{template}.jinja'}", *overrides)
        return load_tokenizer(config)

    return load


def labelled_runs(tokenizer, features: dict[str, list[int]]) -> list[str]:
    """Each contiguous run of tokens that carry loss, decoded with its special tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(features["input_ids"], features["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # a labelled token is predicted as itself
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def example(messages=CONVERSATION) -> Example:
    return Example(tuple(messages[:-1]), messages[-1]["content"], 0, "test")


def test_demo_fixture_is_the_demo_template() -> None:
    assert (TEMPLATES / "demo.jinja").read_text() == CHAT_TEMPLATE


@pytest.mark.parametrize("template", sorted(END_OF_TURN))
def test_end_of_turn_is_read_off_the_template_and_generation_stops_there(template, tokenizer_for) -> None:
    from tasks.generation import generation_config

    tokenizer = tokenizer_for(template)
    marker = END_OF_TURN[template]
    assert chat_format(tokenizer).end_of_turn == marker
    expected = list(dict.fromkeys([tokenizer.convert_tokens_to_ids(marker), tokenizer.eos_token_id]))
    assert stop_token_ids(tokenizer) == expected
    assert generation_config(tokenizer, 8).eos_token_id == expected
    if template != "demo":  # the demo's eos is its end-of-turn token; ChatML and Llama 3 stop at both
        assert len(expected) == 2 and tokenizer.eos_token == "<|end|>"


@pytest.mark.parametrize("template", sorted(END_OF_TURN))
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_labelled_tokens_are_exactly_the_assistant_turns_with_their_end_of_turn(template, train_on,
                                                                               tokenizer_for) -> None:
    tokenizer = tokenizer_for(template, f"data.train_on={train_on}")
    features = tokenize_example(tokenizer, example(), 512, train_on)
    trained = ASSISTANT_CONTENTS if train_on == "all_assistant" else ASSISTANT_CONTENTS[-1:]
    assert labelled_runs(tokenizer, features) == [content + END_OF_TURN[template] for content in trained]

    # The whole conversation as the template renders it, tokenized once (up to the last end-of-turn).
    rendered = tokenizer.apply_chat_template(list(CONVERSATION), tokenize=False)
    assert rendered.startswith(tokenizer.decode(features["input_ids"], skip_special_tokens=False))
    assert features["input_ids"][-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN[template])
    # Trained the way it is served: the tokens before the last answer are the served prompt's tokens.
    prompt = render_prompt(tokenizer, CONVERSATION[:-1])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert features["input_ids"][:len(prompt_ids)] == prompt_ids
    assert features["labels"][len(prompt_ids) - 1] == IGNORE_INDEX
    assert features["labels"][len(prompt_ids)] != IGNORE_INDEX


def test_a_template_with_generation_blocks_gets_transformers_own_mask_and_the_same_labels(tokenizer_for) -> None:
    """A ChatML template marking assistant output with {% generation %} renders the same text; the
    mask transformers computes from its blocks equals the one placed by rendering prefixes."""
    tokenizer = tokenizer_for("chatml")
    by_prefixes = encode_conversation(tokenizer, CONVERSATION)
    tokenizer.chat_template = (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- '<|im_start|>assistant\\n' -}}{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    assert chat_format(tokenizer).generation_blocks
    by_blocks = encode_conversation(tokenizer, CONVERSATION)
    assert by_blocks.input_ids == by_prefixes.input_ids
    assert by_blocks.spans == by_prefixes.spans and len(by_blocks.spans) == 3
    assert encode_conversation(tokenizer, CONVERSATION, "last_assistant").spans == by_prefixes.spans[-1:]


def test_a_template_that_rewrites_earlier_turns_is_refused_for_all_turns_but_trains_the_last(tokenizer_for) -> None:
    """Templates that re-render earlier assistant turns (as thinking models drop their reasoning)
    cannot have those turns masked in the whole conversation: a clear error, and the fix works."""
    tokenizer = tokenizer_for("demo")
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{{ message['content'] }}",
        "{{ '(earlier answer)' if message['role'] == 'assistant' and not loop.last else message['content'] }}")
    with pytest.raises(ChatTemplateError, match="set data.train_on=last_assistant"):
        encode_conversation(tokenizer, CONVERSATION, "all_assistant")
    features = tokenize_example(tokenizer, example(), 512, "last_assistant")
    assert labelled_runs(tokenizer, features) == [ASSISTANT_CONTENTS[-1] + "<|end|>"]


def test_a_tokenizer_without_a_template_gets_the_alpaca_fallback_ending_turns_with_eos(
        make_config, chat_tokenizer_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = load_tokenizer(make_config(f"model.name_or_path={tmp_path / 'bare'}"))
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    user = {"role": "user", "content": "Rewrite this in Zorbish.\n\nred cat"}
    assert render_prompt(tokenizer, [user]) == f"### Instruction:\n{user['content']}\n\n### Response:\n"
    system = {"role": "system", "content": "Be brief."}
    expected = f"### Instruction:\nBe brief.\n\n{user['content']}\n\n### Response:\n"  # one instruction block
    assert render_prompt(tokenizer, [system, user]) == expected
    assert chat_format(tokenizer).end_of_turn == tokenizer.eos_token
    features = tokenize_example(tokenizer, example(), 512)
    assert labelled_runs(tokenizer, features) == [content + tokenizer.eos_token for content in ASSISTANT_CONTENTS]


def test_a_turn_cut_by_max_seq_length_or_without_a_marker_is_a_termination_problem(tokenizer_for) -> None:
    tokenizer = tokenizer_for("chatml")
    encoded = encode_conversation(tokenizer, CONVERSATION)
    assert termination_problem(tokenizer, encoded, 512) is None
    cut = termination_problem(tokenizer, encoded, encoded.spans[-1][1] - 1)
    assert cut is not None and "cut by data.max_seq_length" in cut and "trained turn 3 of 3" in cut

    plain = tokenizer_for("no_end_of_turn")
    assert chat_format(plain).end_of_turn is None
    problem = termination_problem(plain, encode_conversation(plain, CONVERSATION), 512)
    assert problem is not None and "not with a stop token (<|end|>)" in problem


def test_multi_turn_chat_rows_load_with_every_turn_and_pass_the_contract(make_config, tmp_path) -> None:
    import json

    from tasks.demo_assets import generate_rows
    from tasks.validate import validate_data

    def conversation(rows: list[dict]) -> dict:
        messages = [{"role": "system", "content": "Be brief."}]
        for row in rows:
            messages += [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                         {"role": "assistant", "content": row["output"]}]
        return {"messages": messages}

    rows = generate_rows(0, 48)
    conversations = [conversation(rows[i:i + 3]) for i in range(0, len(rows), 3)]
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in conversations[:12]))
    evaluation.write_text("".join(json.dumps(c) + "\n" for c in conversations[12:]))
    config = make_config("data.format=auto", "data.validation.min_train_rows=5", "data.validation.min_eval_rows=2",
                         "data.max_seq_length=256", f"data.path={train}", f"data.eval_path={evaluation}")
    result = validate_data(config)
    assert result.success, result.markdown()
    assert result.expectation("turns_end_with_stop_token")["element_count"] == 16

    splits = load_splits(config.data)
    assert [list(e.messages) for e in splits.train] == [c["messages"] for c in conversations[:12]]
    tokenizer = load_tokenizer(config)
    features = tokenize_example(tokenizer, splits.train[0], 256, config.data.train_on)
    assert labelled_runs(tokenizer, features) == [row["output"] + "<|end|>" for row in rows[:3]]


def test_the_template_override_is_saved_with_the_adapter_and_served_from_it(make_config, tmp_path) -> None:
    """A short real training run with data.chat_template: the adapter's tokenizer carries the
    override, so evaluation and the registered model render prompts exactly as training did."""
    from transformers import AutoTokenizer

    from tasks.gpu import check_gpu
    from tasks.pyfunc_model import render_user_prompts
    from tasks.train import train

    override = tmp_path / "compact.jinja"
    override.write_text(CHAT_TEMPLATE.replace("\n", ""))  # the demo's tokens, no newlines
    config = make_config(f"data.chat_template={override}", "training.max_steps=2", "training.save_steps=2",
                         "training.per_device_batch_size=4", "evaluation.max_rows=4")
    splits = load_splits(config.data)
    splits.train, splits.eval = splits.train[:16], splits.eval[:4]
    _, plan = check_gpu(config)
    result = train(config, plan, splits)

    saved = AutoTokenizer.from_pretrained(str(result.adapter_dir))
    assert saved.chat_template == override.read_text()
    training_tokenizer = load_tokenizer(config)
    prompt = splits.eval[0].prompt_messages[0]["content"]
    assert render_user_prompts(saved, [prompt]) == [render_prompt(training_tokenizer, splits.eval[0].prompt_messages)]
    assert "\n" not in render_user_prompts(saved, ["red cat"])[0]
    assert stop_token_ids(saved) == stop_token_ids(training_tokenizer) == [saved.convert_tokens_to_ids("<|end|>")]


def test_a_missing_template_file_is_a_config_error_naming_the_key(make_config, tmp_path) -> None:
    from configs.schema import ConfigError
    from tasks.data import check_data_files

    config = make_config(f"data.chat_template={tmp_path / 'missing.jinja'}")
    with pytest.raises(ConfigError, match="data.chat_template: file .*missing.jinja does not exist"):
        check_data_files(config.data)
    with pytest.raises(ConfigError, match="data.chat_template"):
        load_tokenizer(config)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }}")
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        load_tokenizer(make_config(f"data.chat_template={broken}"))
