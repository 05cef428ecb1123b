"""The offline demo assets: deterministic, offline, a real Llama with a chat template and pad token."""

from __future__ import annotations

import json

from tasks.data import load_splits
from tasks.demo_assets import build_demo_assets, zorbish_lexicon
from tasks.modeling import hash_directory


def test_same_seed_same_files_other_seed_other_files(tmp_path) -> None:
    first = build_demo_assets(tmp_path / "a", seed=3, rows=200, pretrain_steps=5, min_copy_accuracy=0)
    second = build_demo_assets(tmp_path / "b", seed=3, rows=200, pretrain_steps=5, min_copy_accuracy=0)
    other = build_demo_assets(tmp_path / "c", seed=4, rows=200, pretrain_steps=5, min_copy_accuracy=0)
    assert first.data_path.read_bytes() == second.data_path.read_bytes()
    assert hash_directory(first.model_dir) == hash_directory(second.model_dir)
    assert first.data_path.read_bytes() != other.data_path.read_bytes()
    # the general text (forgetting) and the canaries are part of the assets, deterministic too
    assert first.general_text_path.read_bytes() == second.general_text_path.read_bytes()
    assert first.canaries_path.read_bytes() == second.canaries_path.read_bytes()
    assert first.general_text_path.read_bytes() != other.general_text_path.read_bytes()
    assert first.replay_path.read_bytes() == second.replay_path.read_bytes()


def test_general_text_and_replay_are_the_bases_own_task_held_apart(demo_assets) -> None:
    """Both are copy conversations (what the base was pretrained on), and the replay that trains never holds a
    general-text sentence or the copy canary's: the guard measures a skill kept, not rows seen."""
    import yaml

    from tasks.demo_assets import COPY_INSTRUCTION

    general, replay = ([json.loads(line) for line in path.read_text().splitlines()]
                       for path in (demo_assets.general_text_path, demo_assets.replay_path))
    assert (len(general), len(replay)) == (100, 1000)
    words = set(zorbish_lexicon(0))
    for row in general + replay:
        assert row["instruction"] == COPY_INSTRUCTION and row["input"] == row["output"]
        assert set(row["input"].split()) <= words
    canaries = yaml.safe_load(demo_assets.canaries_path.read_text())
    (copy_canary,) = [c for c in canaries if "exact" in c["expect"]]
    held_out = {row["input"] for row in general} | {copy_canary["expect"]["exact"]}
    assert not held_out & {row["input"] for row in replay}
    assert len({row["input"] for row in replay}) == len(replay)


def test_stale_eval_files_are_rewritten_without_rebuilding_the_base(demo_assets, tmp_path) -> None:
    """Assets built by an older version keep their base; the general text, replay and canaries follow the code."""
    import shutil

    from tasks.demo_assets import DemoAssets, write_eval_files

    copy = DemoAssets(tmp_path / "data" / "demo.jsonl", demo_assets.model_dir)
    copy.data_path.parent.mkdir()
    shutil.copyfile(demo_assets.canaries_path, copy.canaries_path)
    copy.general_text_path.write_text("a line of an older version\n")
    write_eval_files(copy, seed=0)
    for name in ("general_text_path", "replay_path", "canaries_path"):
        assert getattr(copy, name).read_bytes() == getattr(demo_assets, name).read_bytes(), name


def test_demo_dataset_follows_its_mapping_and_splits_without_leakage(demo_assets, make_config) -> None:
    rows = [json.loads(line) for line in demo_assets.data_path.read_text().splitlines()]
    assert len(rows) >= 2000
    lexicon = zorbish_lexicon(0)
    assert all(r["output"] == " ".join(lexicon[w] for w in r["input"].split()) for r in rows)
    splits = load_splits(make_config().data)
    assert 0.05 < len(splits.eval) / len(rows) < 0.15
    assert not {e.prompt_key for e in splits.train} & {e.prompt_key for e in splits.eval}
    assert load_splits(make_config().data).fingerprint == splits.fingerprint


def test_demo_model_is_a_small_llama_with_template_and_pad(demo_assets) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(demo_assets.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    assert config.model_type == "llama"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template
    text = "red cat runs"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_every_linear_dimension_of_the_demo_model_is_a_multiple_of_64(demo_assets) -> None:
    """As in real models: 4-bit blocks of 64 never straddle a row (the CPU path must not depend on it)."""
    from transformers import AutoConfig

    from tasks.gpu import ModelStats

    config = AutoConfig.from_pretrained(demo_assets.model_dir)
    stats = ModelStats.from_model_config(config)
    dimensions = {d for _, i, o in stats.linear_layers for d in (i, o)} | {config.vocab_size}
    assert stats.linear_layers and all(d % 64 == 0 for d in dimensions), sorted(dimensions)


def test_the_demo_base_repeats_unseen_sentences(demo_assets) -> None:
    """The demo's premise: the base copies, so the adapter only has to learn the word map. A base that
    does not (the v2 assets' seed-0 draw repeated 5 of 30) leaves the demo adapter at BLEU ~8 instead of
    ~100 after `make demo`'s 400 steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.demo_assets import MIN_COPY_ACCURACY, copy_accuracy

    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    assert copy_accuracy(model, tokenizer, seed=0) >= MIN_COPY_ACCURACY
