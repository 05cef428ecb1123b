"""Chat templates: how a conversation is rendered, which of its tokens carry loss, and where a turn ends.

Training, the data contract, evaluation, the registered model and serving all render through the
tokenizer's chat template (`render`), so a model is trained on exactly the text it is served.

**Loss masks.** The whole conversation is rendered once and tokenized once; loss falls exactly on the
assistant turns (`data.train_on`: every assistant turn, or only the last), each including the
template's end-of-turn token, so the model learns to stop where serving stops it. How the assistant
spans are found, in order of preference:

1. A template that marks its assistant output with `{% generation %}` blocks gets transformers' own
   mask (`apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`): the
   template's author said what the model generates.
2. Every other template (most of them, including Llama 3's, ChatML's and the demo's): for each
   assistant turn, the conversation before it is rendered with the generation prompt (where the
   answer starts) and the conversation through it (where the turn ends, just after its end-of-turn
   marker); both must be prefixes of the whole rendering. The character spans are mapped to tokens
   through the tokenizer's offsets, a token counting when it overlaps a span (the rule transformers
   uses for its own mask).

TRL's SFTTrainer (not a dependency here) offers only (1) (`assistant_only_loss` requires generation
blocks) and a prompt/completion split that trains the final answer only; transformers' public API has
nothing for (2), hence the few lines below.

**End of turn.** The marker a template ends an assistant turn with is read off the template itself:
a one-turn conversation with a known answer is rendered, and the first added token after the answer
is the marker (Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`, the demo's `<|end|>`; `eos` for a
template that ends turns with it). When the probe cannot be rendered, the well-known markers the
template names are the fallback. Generation stops at that marker and at eos (`stop_token_ids`).
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, TrainOn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# For a tokenizer without a chat template (and no data.chat_template): the Alpaca prompt most base
# models have seen. Consecutive system/user messages share one instruction block; every assistant
# turn ends with eos, its end-of-turn marker.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '### Response:\\n' + message['content'] + (eos_token or '') + '\\n\\n' -}}"
    "{%- else -%}"
    "{%- if loop.first or loop.previtem['role'] == 'assistant' -%}{{- '### Instruction:\\n' -}}{%- endif -%}"
    "{{- message['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)
# End-of-turn markers of well-known template families, for a template the probe cannot render.
KNOWN_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
_PROBE_ANSWER = "qlora-probe-answer"
_PROBE = ({"role": "user", "content": "qlora-probe-question"}, {"role": "assistant", "content": _PROBE_ANSWER})


class ChatTemplateError(ConfigError):
    """The chat template cannot place the loss mask for a conversation; the message says how to fix it."""


@dataclass(frozen=True)
class ChatFormat:
    """What one chat template means for training and generation (see the module docstring)."""

    template: str
    end_of_turn: str | None  # the token text that ends an assistant turn; None when the template has none
    end_of_turn_id: int | None
    stop_ids: tuple[int, ...]  # what generation stops at: the end-of-turn token, then eos
    generation_blocks: bool  # the template marks assistant output with {% generation %}


@dataclass(frozen=True)
class EncodedConversation:
    """A conversation's token ids and the token ranges [start, end) of its trained assistant turns.

    Tokens after the last trained turn (the template's trailing newline, say) are dropped: they carry
    no loss and predict nothing that is trained.
    """

    input_ids: list[int]
    spans: list[tuple[int, int]]
    stop_ids: tuple[int, ...]

    def features(self, max_seq_length: int) -> dict[str, list[int]]:
        """input_ids and labels (IGNORE_INDEX outside the trained turns), cut to max_seq_length."""
        labels = [IGNORE_INDEX] * len(self.input_ids)
        for start, end in self.spans:
            labels[start:end] = self.input_ids[start:end]
        return {"input_ids": self.input_ids[:max_seq_length], "labels": labels[:max_seq_length]}


def template_of(tokenizer: Any) -> str:
    """The template this tokenizer renders with: its own (the default of several), else the fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.get_chat_template()
    return FALLBACK_CHAT_TEMPLATE


def render(tokenizer: Any, messages: list[dict[str, str]] | tuple[dict[str, str], ...],
           add_generation_prompt: bool) -> str:
    """The conversation as text through the tokenizer's template (or the fallback)."""
    return tokenizer.apply_chat_template(list(messages), chat_template=template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def read_chat_template(path: str | Path) -> str:
    """The text of a `data.chat_template` file; ConfigError when it is missing or not a Jinja template."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data.chat_template: file {file} does not exist; point it at a Jinja chat template "
                          "(tests/fixtures/templates holds examples), or remove the key to use the tokenizer's own")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"data.chat_template: file {file} is empty; write a Jinja chat template in it")
    return text


def apply_template_choice(tokenizer: Any, template_file: str | Path | None) -> None:
    """Give the tokenizer the template the pipeline renders with, so it is saved with the adapter.

    `data.chat_template` wins; else the tokenizer keeps its own; a tokenizer without one gets the
    fallback Alpaca template. Either way the tokenizer saved next to the adapter carries the template,
    and evaluation, the registered model and serving render exactly as training did.
    """
    import jinja2

    if template_file is not None:
        text = read_chat_template(template_file)
        try:
            tokenizer.apply_chat_template(list(_PROBE), chat_template=text, tokenize=False)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"data.chat_template: {template_file} is not a valid Jinja template: line "
                              f"{exc.lineno}: {exc.message}") from exc
        except Exception as exc:  # a template may refuse the probe conversation; the data contract checks real rows
            logger.debug("data.chat_template %s does not render the probe conversation: %s", template_file, exc)
        tokenizer.chat_template = text
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def _marker_tokens(tokenizer: Any) -> list[str]:
    """Added tokens that can end a turn (whitespace-only added tokens are text, not markers)."""
    return [token.content for token in tokenizer.added_tokens_decoder.values()
            if token.content and not token.content.isspace()]


def find_end_of_turn(tokenizer: Any, template: str) -> str | None:
    """The token text the template ends an assistant turn with, or None when it ends turns with none.

    The first added token after the answer of a rendered one-turn conversation; the known markers the
    template names when it cannot render that conversation.
    """
    markers = _marker_tokens(tokenizer)
    try:
        rendered = tokenizer.apply_chat_template(list(_PROBE), chat_template=template, tokenize=False)
    except Exception:  # a template may refuse the probe (a required system turn, say)
        rendered = None
    if rendered is not None and _PROBE_ANSWER in rendered:
        tail = rendered[rendered.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
        found = [(tail.find(marker), -len(marker), marker) for marker in markers if marker in tail]
        return min(found)[2] if found else None
    return next((marker for marker in KNOWN_END_OF_TURN if marker in template and marker in markers), None)


_FORMATS: weakref.WeakKeyDictionary[Any, ChatFormat] = weakref.WeakKeyDictionary()


def chat_format(tokenizer: Any) -> ChatFormat:
    """The tokenizer's ChatFormat, worked out once per tokenizer and template."""
    template = template_of(tokenizer)
    cached = _FORMATS.get(tokenizer)
    if cached is not None and cached.template == template:
        return cached
    end_of_turn = find_end_of_turn(tokenizer, template)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    stops = tuple(dict.fromkeys(i for i in (end_of_turn_id, tokenizer.eos_token_id) if i is not None))
    result = ChatFormat(template, end_of_turn, end_of_turn_id, stops, bool(_GENERATION_BLOCK.search(template)))
    _FORMATS[tokenizer] = result
    return result


def stop_token_ids(tokenizer: Any) -> list[int]:
    """What generation stops at: the template's end-of-turn token, then eos (one id when they agree)."""
    return list(chat_format(tokenizer).stop_ids)


def _turn_span(tokenizer: Any, fmt: ChatFormat, messages: list[dict[str, str]], index: int,
               text: str) -> tuple[int, int]:
    """Characters of `text` (the whole conversation) the assistant turn `index` must generate."""
    if index == 0:
        raise ChatTemplateError("the conversation starts with an assistant turn; the loss mask needs the turn "
                                "that prompts it (a user turn first)")
    prefix = render(tokenizer, messages[:index], add_generation_prompt=True)
    through = render(tokenizer, messages[:index + 1], add_generation_prompt=False)
    if not (text.startswith(prefix) and text.startswith(through)):
        raise ChatTemplateError(
            f"the chat template renders message {index} (an assistant turn) differently once later turns follow, "
            "so its tokens cannot be told apart in the whole conversation; set data.train_on=last_assistant, or "
            "set data.chat_template to a template that renders earlier turns unchanged"
        )
    start = len(prefix)
    if fmt.end_of_turn and through.rfind(fmt.end_of_turn) >= start:
        return start, through.rfind(fmt.end_of_turn) + len(fmt.end_of_turn)
    return start, len(through.rstrip())


def _token_spans(offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges of character spans: a token belongs to a span when it overlaps it."""
    spans = []
    for low, high in char_spans:
        inside = [i for i, (start, end) in enumerate(offsets) if end > low and start < high]
        if inside:
            spans.append((inside[0], inside[-1] + 1))
    return spans


def _mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(mask):
        if flag and runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        elif flag:
            runs.append((i, i + 1))
    return runs


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]] | tuple[dict[str, str], ...],
                        train_on: TrainOn = "all_assistant") -> EncodedConversation:
    """Token ids of the whole conversation and the token ranges of the assistant turns that carry loss.

    `train_on="all_assistant"` trains every assistant turn, `"last_assistant"` the final one (the
    response). Raises ChatTemplateError when the template does not allow the mask to be placed.
    """
    messages = [dict(message) for message in messages]
    if not messages or messages[-1].get("role") != "assistant":
        raise ChatTemplateError("the conversation must end with an assistant turn")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"the tokenizer {type(tokenizer).__name__} is a slow (Python) tokenizer; loss masks "
                                "need token offsets: load its fast tokenizer (tokenizer.json)")
    fmt = chat_format(tokenizer)
    if fmt.generation_blocks:
        encoded = tokenizer.apply_chat_template(messages, chat_template=fmt.template, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        input_ids, spans = list(encoded["input_ids"]), _mask_runs(list(encoded["assistant_masks"]))
    else:
        text = render(tokenizer, messages, add_generation_prompt=False)
        turns = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
        turns = turns[-1:] if train_on == "last_assistant" else turns
        char_spans = [_turn_span(tokenizer, fmt, messages, i, text) for i in turns]
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, spans = list(encoded["input_ids"]), _token_spans(encoded["offset_mapping"], char_spans)
    if train_on == "last_assistant":
        spans = spans[-1:]
    if spans:
        input_ids = input_ids[:spans[-1][1]]
    return EncodedConversation(input_ids, spans, fmt.stop_ids)


def termination_problem(tokenizer: Any, encoded: EncodedConversation, max_seq_length: int) -> str | None:
    """Why a trained assistant turn does not end with a token generation stops at; None when all do.

    A turn that is cut by max_seq_length, or that ends without a stop token (a template with no
    end-of-turn marker), teaches the model to run on: generation would stop only at max_new_tokens.
    """
    stops = ", ".join(tokenizer.convert_ids_to_tokens(list(encoded.stop_ids))) or "none: no eos either"
    if not encoded.spans:
        return "no assistant turn carries loss"
    for number, (_, end) in enumerate(encoded.spans, start=1):
        which = f"trained turn {number} of {len(encoded.spans)}"
        if end > max_seq_length:
            return (f"{which} is cut by data.max_seq_length={max_seq_length} (it ends at token {end}): its stop "
                    f"token ({stops}) is never trained")
        last = encoded.input_ids[end - 1]
        if last not in encoded.stop_ids:
            token = tokenizer.convert_ids_to_tokens(last)
            return (f"{which} ends with {token!r}, not with a stop token ({stops}); the chat template ends turns "
                    "without an end-of-turn marker: set data.chat_template to one that does")
    return None
