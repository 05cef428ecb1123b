"""Offline demo assets: a small instruction dataset and a tiny Llama base model with its own tokenizer.

The demo must run with no network and no GPU, so nothing is downloaded: the dataset is generated from
a seed, the BPE tokenizer is trained on it with `tokenizers`, and the base model is a randomly
initialised Llama saved with `save_pretrained`. The task is word-by-word translation into an invented
language ("Zorbish"): a mapping LoRA alone learns in a couple of CPU minutes, so BLEU/ROUGE rise
visibly after training while the base model scores near zero.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ASSETS_DIR = Path(".cache/demo")
# 2: every linear dimension a multiple of 64 (MLP 384, vocab padded to 64). 3: a base that cannot copy
# after pretraining is re-drawn (version 2's seed-0 base repeated 5 of 30 sentences; its adapter reached
# BLEU 8 where version 1's reached 100).
ASSETS_VERSION = 3
MIN_COPY_ACCURACY = 0.9  # share of held-out sentences a usable demo base repeats exactly
BASE_DRAWS = 4  # initialisations tried before giving up on reaching MIN_COPY_ACCURACY
SOURCE_WORDS = (
    "red blue green black white small big old young happy sad fast slow cold warm "
    "cat dog bird fish horse tree river stone house road book child king queen farmer "
    "runs jumps sleeps eats sees finds likes holds carries builds "
    "the a one two three near under over with without and but very quite often never today"
).split()
COPY_INSTRUCTION = "Repeat the sentence."
INSTRUCTIONS = (
    "Translate the sentence into Zorbish.",
    "Rewrite this in Zorbish.",
    "Give the Zorbish version of the text.",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


GENERAL_TEXT_ROWS = 100
REPLAY_ROWS = 1000
COPY_CANARY_SENTENCE = "the old king sleeps under the tree"  # held out of the replay rows


@dataclass(frozen=True)
class DemoAssets:
    data_path: Path
    model_dir: Path

    @property
    def general_text_path(self) -> Path:
        """Conversations of the kind the base was pretrained on: asked to repeat a sentence, it does
        (evaluation.general_text; the loss is taken on the answers)."""
        return self.data_path.parent / "general.jsonl"

    @property
    def replay_path(self) -> Path:
        """More such conversations, to mix into training (a data.sources replay that only trains)."""
        return self.data_path.parent / "replay.jsonl"

    @property
    def canaries_path(self) -> Path:
        """Canary checks of the demo task (evaluation.canaries), written from the lexicon."""
        return self.data_path.parent / "canaries.yaml"


def zorbish_lexicon(seed: int) -> dict[str, str]:
    """A fixed invented word for each source word: the mapping the adapter has to learn."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    lexicon: dict[str, str] = {}
    used: set[str] = set()
    for word in SOURCE_WORDS:
        while True:
            syllables = rng.randint(1, 2)
            candidate = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
            candidate += rng.choice(consonants)
            if candidate not in used and candidate not in SOURCE_WORDS:
                used.add(candidate)
                lexicon[word] = candidate
                break
    return lexicon


def generate_rows(seed: int, count: int) -> list[dict[str, str]]:
    """`count` unique alpaca rows; uniqueness of the input keeps the hash split free of leakage."""
    rng = random.Random(seed)
    lexicon = zorbish_lexicon(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < count:
        sentence = " ".join(rng.choice(SOURCE_WORDS) for _ in range(rng.randint(3, 8)))
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append(
            {
                "instruction": rng.choice(INSTRUCTIONS),
                "input": sentence,
                "output": " ".join(lexicon[word] for word in sentence.split()),
            }
        )
    return rows


def copy_rows(sentences: list[str]) -> list[dict[str, str]]:
    """The base's pretraining task as alpaca rows: asked to repeat a sentence, the answer is the sentence."""
    return [{"instruction": COPY_INSTRUCTION, "input": sentence, "output": sentence} for sentence in sentences]


def copy_sentences(seed: int, count: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct sentences drawn as the base's pretraining sentences are, none of `exclude`."""
    rng = random.Random(seed)
    sentences: dict[str, None] = {}  # insertion-ordered set: the draw order is the file order
    while len(sentences) < count:
        sentence = " ".join(rng.choice(SOURCE_WORDS) for _ in range(rng.randint(3, 8)))
        if sentence not in exclude:
            sentences.setdefault(sentence)
    return list(sentences)


def general_text(seed: int, count: int = GENERAL_TEXT_ROWS) -> list[dict[str, str]]:
    """The demo's general text: `count` copy conversations on sentences of their own random stream.

    The demo base was pretrained on exactly this (`pretrain_copying`) and repeats such sentences almost
    without loss; an adapter trained only on Zorbish forgets it (measured on this file: loss on the answers
    0.029 for the base, 7.64 after 400 demo steps), one trained with the replay keeps it (0.040).
    """
    return copy_rows(copy_sentences(seed + 2, count, exclude=frozenset({COPY_CANARY_SENTENCE})))


def replay_rows(seed: int, count: int = REPLAY_ROWS) -> list[dict[str, str]]:
    """Copy conversations to mix into the demo's training, disjoint from the general text and the copy
    canary: what keeps a good demo adapter from forgetting the base's skill is rehearsal, not having
    seen the test."""
    held_out = frozenset({row["input"] for row in general_text(seed)} | {COPY_CANARY_SENTENCE})
    return copy_rows(copy_sentences(seed + 4, count, exclude=held_out))


def demo_canaries(seed: int) -> str:
    """The demo's canary file (YAML): answers in Zorbish, not English, knows two words, and still repeats a
    sentence when asked to (the base's skill, which an adapter trained without the replay loses).

    Written from the lexicon, so the expected words are right for the seed; `contains` and a regex
    rather than `exact` for the translations, so a good adapter passes with a word or two still wrong
    elsewhere. The prompts have 3 words or more, as the training sentences do.
    """
    import yaml

    lexicon = zorbish_lexicon(seed)
    entries = [
        {"name": "answers in Zorbish, not English", "prompt": "Rewrite this in Zorbish.\n\nthe red cat runs",
         "expect": {"regex": r"^(?!.*\b(the|red|cat|runs)\b)\S"}},
        {"name": "knows the word for red", "prompt": "Rewrite this in Zorbish.\n\nthe red cat",
         "expect": {"contains": lexicon["red"]}},
        {"name": "knows the word for fish", "prompt": "Give the Zorbish version of the text.\n\nthe big fish",
         "expect": {"contains": lexicon["fish"]}},
        {"name": "still repeats a sentence when asked", "prompt": f"{COPY_INSTRUCTION}\n\n{COPY_CANARY_SENTENCE}",
         "expect": {"exact": COPY_CANARY_SENTENCE}},
    ]
    header = ("# Canaries of the demo adapter (evaluation.canaries), written by `qlora demo-assets` from the lexicon.\n"
              "# Each: {name (optional), prompt (the user message), expect: one of exact | contains | regex}.\n")
    # JSON strings are YAML double-quoted scalars: the prompts' line breaks stay readable as \\n
    body = "".join(f"- name: {json.dumps(e['name'])}\n  prompt: {json.dumps(e['prompt'])}\n"
                   f"  expect: {json.dumps(e['expect'])}\n" for e in entries)
    assert yaml.safe_load(body) == entries
    return header + body


def jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_eval_files(assets: DemoAssets, seed: int) -> None:
    """Write the general text, the replay and the canaries: deterministic and cheap, so they are rewritten
    whenever missing or not what this version of the code writes (assets built before them stay usable
    without rebuilding the base)."""
    assets.general_text_path.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((assets.general_text_path, jsonl(general_text(seed))),
                       (assets.replay_path, jsonl(replay_rows(seed))),
                       (assets.canaries_path, demo_canaries(seed))):
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def train_tokenizer(texts: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE trained on the demo corpus, wrapped for transformers with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=256,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def padded_vocab_size(tokens: int, multiple: int = 64) -> int:
    """The embedding rows for `tokens` tokens, rounded up as real models do (Llama's 32000 = 500 x 64)."""
    return -(-tokens // multiple) * multiple


def build_base_model(vocab_size: int, tokenizer, seed: int):  # -> LlamaForCausalLM
    """A ~1M parameter Llama: big enough to learn the mapping through LoRA, small enough for 2 cores.

    Every linear dimension is a multiple of 64 (the 4-bit block size), as in real models: hidden 128,
    MLP 384, and the vocabulary padded to a multiple of 64 (the extra rows are never a target).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=padded_vocab_size(vocab_size),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # A wider init than the default 0.02: with a random frozen lm_head the logits of a
        # 128-wide model could otherwise never leave uniform (max logit ~ 0.02*128 = 2.6).
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config)


def pretrain_copying(model, tokenizer, seed: int, steps: int) -> None:
    """Teach the random base to repeat a sentence (full-parameter, a few CPU seconds per 100 steps).

    A random base can attend nowhere useful, and LoRA alone learns a per-token rewrite on it only
    slowly. A base that can already copy is what a real pretrained model is to a real task: the
    adapter then only has to learn the Zorbish word for each copied word, and the base, asked for
    Zorbish, answers in English, which scores near zero BLEU.
    """
    import torch

    rng = random.Random(seed + 1)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        batch_ids, batch_labels = [], []
        for _ in range(32):
            sentence = " ".join(rng.choice(SOURCE_WORDS) for _ in range(rng.randint(3, 8)))
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{COPY_INSTRUCTION}\n\n{sentence}"}],
                tokenize=False, add_generation_prompt=True,
            )
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(sentence, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            batch_ids.append(prompt_ids + answer_ids)
            batch_labels.append([-100] * len(prompt_ids) + answer_ids)
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in batch_ids])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in batch_labels])
        attention_mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i in batch_ids])[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.eval()
    print(f"pretrained the demo base to copy sentences: final loss {loss.item():.3f}")


def copy_accuracy(model, tokenizer, seed: int, count: int = 32) -> float:
    """Share of `count` unseen sentences the base repeats exactly when asked to (greedy decoding).

    The demo's premise is a base that copies: the adapter then only learns a word map. Whether the
    copying emerges within the pretraining steps depends on the initialisation (measured: seed 0 of the
    v2 shape repeated 5 of 30 sentences after 400 steps and 26 after 1200; seed 1 all 30 after 400), so
    the builder checks it instead of trusting it.
    """
    from tasks.data import render_prompt
    from tasks.generation import generate

    rng = random.Random(seed + 3)
    sentences = [" ".join(rng.choice(SOURCE_WORDS) for _ in range(rng.randint(3, 8))) for _ in range(count)]
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": f"{COPY_INSTRUCTION}\n\n{s}"}])
               for s in sentences]
    answers = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=count)
    return sum(answer == sentence for answer, sentence in zip(answers, sentences, strict=True)) / count


def pretrained_base(tokenizer, seed: int, steps: int, min_copy_accuracy: float = MIN_COPY_ACCURACY,
                    draws: int = BASE_DRAWS):  # -> LlamaForCausalLM
    """The demo base: initialised from `seed`, pretrained to copy; re-drawn from the next seed while it
    repeats fewer than `min_copy_accuracy` of unseen sentences (deterministic: the same seed gives the
    same draws). After `draws` tries the best one is kept, with a warning."""
    best = None
    for draw in range(draws):
        model = build_base_model(len(tokenizer), tokenizer, seed + draw)
        pretrain_copying(model, tokenizer, seed + draw, steps)
        accuracy = copy_accuracy(model, tokenizer, seed) if min_copy_accuracy > 0 else 1.0
        print(f"demo base draw {draw + 1} (init seed {seed + draw}): repeats {accuracy:.0%} of unseen sentences")
        if best is None or accuracy > best[0]:
            best = (accuracy, model)
        if accuracy >= min_copy_accuracy:
            break
    else:
        print(f"warning: no demo base reached {min_copy_accuracy:.0%} copying in {draws} draws; keeping the best "
              f"({best[0]:.0%}): the demo adapter will score lower")
    return best[1]


def assets_ready(out_dir: Path) -> bool:
    marker = out_dir / "assets.json"
    return marker.exists() and json.loads(marker.read_text()).get("version") == ASSETS_VERSION


def build_demo_assets(out_dir: Path = DEFAULT_ASSETS_DIR, seed: int = 0, rows: int = 3000,
                      pretrain_steps: int = 400, force: bool = False,
                      min_copy_accuracy: float = MIN_COPY_ACCURACY) -> DemoAssets:
    """Build (or reuse) the dataset and base model; the same seed gives the same files."""
    out_dir = Path(out_dir)
    assets = DemoAssets(out_dir / "data" / "demo.jsonl", out_dir / "model")
    if assets_ready(out_dir) and not force:
        write_eval_files(assets, seed)
        return assets
    data = generate_rows(seed, rows)
    assets.data_path.parent.mkdir(parents=True, exist_ok=True)
    assets.data_path.write_text("".join(json.dumps(row) + "\n" for row in data))

    corpus = [f"{r['instruction']}\n\n{r['input']}" for r in data] + [r["output"] for r in data] + [COPY_INSTRUCTION]
    tokenizer = train_tokenizer(corpus, vocab_size=1024)
    model = pretrained_base(tokenizer, seed, pretrain_steps, min_copy_accuracy)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(assets.model_dir)
    tokenizer.save_pretrained(assets.model_dir)
    write_eval_files(assets, seed)
    (out_dir / "assets.json").write_text(json.dumps({"version": ASSETS_VERSION, "seed": seed, "rows": rows}))
    return assets
