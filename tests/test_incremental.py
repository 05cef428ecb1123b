"""Incremental nightly training: mixing weighted data sources, and starting from an existing adapter.

Real components throughout: the demo rows split into "tonight's" and "older" files, the real GX
contract, the shared short QLoRA run's adapter as the starting point (a folder, and a version in a
real sqlite MLflow registry), real 4-bit training for a step or two.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from configs.schema import ConfigError
from tasks.data import DataError, cv_folds, load_splits
from tasks.demo_assets import generate_rows
from tests.conftest import typed_eval_report

SMALL = ["data.validation.min_train_rows=5", "data.validation.min_eval_rows=1"]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
    return path


@pytest.fixture
def nightly_files(demo_assets, tmp_path) -> tuple[Path, Path]:
    """The demo rows as tonight's new rows (the last 1000) and the older rows replayed (the first 2000)."""
    lines = demo_assets.data_path.read_text().splitlines()
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    new.write_text("\n".join(lines[2000:]) + "\n")
    old.write_text("\n".join(lines[:2000]) + "\n")
    return new, old


def keys(examples) -> list[tuple[str, int]]:
    """(file, row) of each example: which row of which source it is."""
    return [(example.source, example.row) for example in examples]


def sources_override(*sources: tuple[Path, float]) -> list[str]:
    listed = ", ".join(f"{{path: {path}, weight: {weight}}}" for path, weight in sources)
    return ["data.path=null", f"data.sources=[{listed}]"]


# --------------------------------------------------------------------------------------------------
# data.sources: config, mixing, contract


def test_data_path_and_sources_are_one_or_the_other(make_config, tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.path and data.sources are both set"):
        make_config(f"data.sources=[{tmp_path / 'a.jsonl'}]")
    with pytest.raises(ConfigError, match="no training data: set data.path"):
        make_config("data.path=null", "data.sources=null")
    with pytest.raises(ConfigError, match=r"data.sources lists \['a.jsonl'\] more than once"):
        make_config("data.path=null", "data.sources=[a.jsonl, {path: a.jsonl, weight: 2}]")
    with pytest.raises(ConfigError, match="data.sources.0.weight"):
        make_config("data.path=null", "data.sources=[{path: a.jsonl, weight: 0}]")
    plain = make_config("data.path=null", "data.sources=[a.jsonl, {path: b.csv, weight: 3, format: chat}]")
    assert [(s.path, s.weight, s.format) for s in plain.data.source_list()] == [
        ("a.jsonl", 1.0, "alpaca"), ("b.csv", 3.0, "chat")]  # an unset format is data.format's


def test_sources_are_split_alone_and_interleaved_by_weight(make_config, nightly_files) -> None:
    new, old = nightly_files
    config = make_config(*sources_override((new, 3), (old, 1)))
    splits = load_splits(config.data)

    # each source is read and split exactly as `data.path: <source>` alone, with that load's fingerprint
    alone = {path: load_splits(make_config(f"data.path={path}").data) for path in (new, old)}
    assert [(s.path, s.fingerprint, s.train_rows, s.eval_rows) for s in splits.mix] == [
        (str(path), alone[path].fingerprint, len(alone[path].train), len(alone[path].eval)) for path in (new, old)]
    assert splits.eval == alone[new].eval + alone[old].eval

    # the train rows are mixed by weight: tonight's 3 of 4, until tonight's rows run out (first_exhausted)
    counts = Counter(example.source for example in splits.train)
    assert counts[str(new)] == len(alone[new].train), "tonight's rows are all used, once"
    assert abs(counts[str(new)] / len(splits.train) - 0.75) < 0.03, counts
    assert [s.mixed_rows for s in splits.mix] == [counts[str(new)], counts[str(old)]]
    assert len(set(keys(splits.train))) == len(splits.train), "no row repeats under first_exhausted"

    # deterministic for a seed; another seed is another order of the same sources
    assert load_splits(config.data).fingerprint == splits.fingerprint
    reseeded = load_splits(make_config(*sources_override((new, 3), (old, 1)), "data.mix_seed=7").data)
    assert reseeded.fingerprint != splits.fingerprint
    assert [s.fingerprint for s in reseeded.mix] == [s.fingerprint for s in splits.mix]

    # all_exhausted repeats the smaller share until every row of every source was used
    oversampled = load_splits(make_config(*sources_override((new, 3), (old, 1)),
                                          "data.mix_stopping=all_exhausted").data)
    assert set(keys(oversampled.train)) == set(keys(alone[new].train)) | set(keys(alone[old].train))
    assert len(oversampled.train) > len(alone[new].train) + len(alone[old].train)

    with pytest.raises(DataError, match="sweep.cv_folds"):
        cv_folds(splits, 2)


def test_one_source_is_the_data_path_shorthand(make_config, demo_assets) -> None:
    shorthand = load_splits(make_config().data)
    listed = load_splits(make_config("data.path=null", f"data.sources=[{demo_assets.data_path.resolve()}]").data)
    assert listed.fingerprint == shorthand.fingerprint and listed.train == shorthand.train
    assert listed.mix == shorthand.mix and shorthand.mix[0].fingerprint == shorthand.fingerprint


def test_setup_hash_keeps_one_source_checkpoints_and_covers_the_mix(make_config, nightly_files) -> None:
    from tasks.checkpoints import training_setup_hash
    from tasks.gpu import check_gpu

    new, old = nightly_files
    one = make_config()
    _, plan = check_gpu(one)
    splits = load_splits(one.data)
    # the mixing keys are inert without sources: a one-source checkpoint still resumes when they change
    assert training_setup_hash(make_config("data.mix_seed=7"), plan, splits) == training_setup_hash(one, plan, splits)
    mixed = make_config(*sources_override((new, 3), (old, 1)))
    mixed_splits = load_splits(mixed.data)
    reseeded = make_config(*sources_override((new, 3), (old, 1)), "data.mix_seed=7")
    assert training_setup_hash(reseeded, plan, load_splits(reseeded.data)) != training_setup_hash(mixed, plan,
                                                                                                   mixed_splits)


def test_contract_has_a_section_per_source_and_names_the_bad_one(make_config, tmp_path) -> None:
    from flows.cli import app
    from tasks.validate import DataValidationError, ValidationResult, require_valid, validate_data

    rows = generate_rows(3, 60)
    good = write_jsonl(tmp_path / "good.jsonl", rows[:40])
    bad_rows = [dict(row) for row in rows[40:]]
    bad_rows[2]["output"] = ""
    bad = write_jsonl(tmp_path / "bad.jsonl", bad_rows)

    also = write_jsonl(tmp_path / "also.jsonl", rows[40:])
    passing = validate_data(make_config(*SMALL, *sources_override((good, 2), (also, 1))))
    assert passing.success, passing.markdown()
    assert [section.sources for section in passing.sections] == [[str(good)], [str(also)]]
    # the fingerprints are training's: the mix's, and each source's as `data.path: <source>` alone
    assert passing.fingerprint == load_splits(make_config(*sources_override((good, 2), (also, 1))).data).fingerprint
    assert [s.fingerprint for s in passing.sections] == [
        load_splits(make_config(f"data.path={path}").data).fingerprint for path in (good, also)]

    config = make_config(*SMALL, *sources_override((good, 2), (bad, 1)))
    result = validate_data(config)
    assert not result.success
    assert [section.success for section in result.sections] == [True, False]
    assert result.failed_names() == [f"{bad}: no_empty_response"]
    assert [section.weight for section in result.sections] == [2.0, 1.0]
    report = result.markdown()
    assert f"FAILED (1 of 2 sources: `{bad}`)" in report
    assert f"#### Source 1 of 2: `{good}` (weight 2) passed" in report
    assert f"#### Source 2 of 2: `{bad}` (weight 1) FAILED (1 of 17 checks)" in report
    with pytest.raises(DataValidationError, match=f"{bad}: no_empty_response"):
        require_valid(result)
    saved = tmp_path / "validation.json"
    saved.write_text(json.dumps(result.to_dict()))
    assert ValidationResult.from_json(saved) == result  # what `qlora register --validation` reads back

    # `qlora validate` with a sources config: the same report, exit code 1; a path argument checks that file alone
    config_file = tmp_path / "nightly.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json", exclude_unset=True)))
    cli = CliRunner().invoke(app, ["validate", "--config", str(config_file)])
    assert cli.exit_code == 1 and f"{bad}: no_empty_response" in " ".join(cli.output.split())
    alone = CliRunner().invoke(app, ["validate", "--config", str(config_file), str(good)])
    assert alone.exit_code == 0 and "Source 1 of" not in alone.output, alone.output


def test_a_replay_source_with_eval_fraction_0_only_trains(make_config, tmp_path) -> None:
    """`eval_fraction: 0` on a source: all its rows train, the eval set is the other sources', and its contract
    section passes with no eval rows (the eval-row floor is for the sources that are evaluated)."""
    from tasks.validate import validate_data

    rows = generate_rows(5, 60)
    task, replay = write_jsonl(tmp_path / "task.jsonl", rows[:40]), write_jsonl(tmp_path / "replay.jsonl", rows[40:])
    mixed = ["data.path=null", f"data.sources=[{{path: {task}, weight: 3}}, "
                               f"{{path: {replay}, weight: 1, eval_fraction: 0}}]", "data.eval_fraction=0.3"]
    config = make_config(*SMALL, "data.mix_stopping=all_exhausted", *mixed)
    splits = load_splits(config.data)
    task_alone = load_splits(make_config(f"data.path={task}", "data.eval_fraction=0.3").data)
    assert splits.eval == task_alone.eval and task_alone.eval, "the eval set is the task's alone"
    assert {e.row for e in splits.train if e.source == str(replay)} == set(range(20)), "every replay row trains"
    assert [(s.train_rows, s.eval_rows) for s in splits.mix][1] == (20, 0)

    result = validate_data(make_config("data.validation.min_train_rows=5", "data.validation.min_eval_rows=3", *mixed))
    assert result.success, result.markdown()
    assert result.sections[1].row_counts["eval"] == 0
    with pytest.raises(ConfigError, match=r"data.sources.1.eval_fraction"):
        make_config(f"data.sources=[{task}, {{path: {replay}, eval_fraction: 1}}]", "data.path=null")


def test_the_command_line_data_replaces_the_files_other_way_to_name_it(demo_assets, tmp_path) -> None:
    """The demo config names `data.sources` (its task plus a replay); `--set data.path=FILE` trains on FILE alone,
    and on a config naming `data.path`, `--set data.sources=[...]` replaces it. Both on the command line is refused."""
    from configs.schema import load_config
    from tests.conftest import DEMO_CONFIG

    demo = load_config(DEMO_CONFIG)
    assert [s.path for s in demo.data.source_list()] == [".cache/demo/data/demo.jsonl", ".cache/demo/data/replay.jsonl"]
    alone = load_config(DEMO_CONFIG, ["data.path=one.jsonl"])
    assert (alone.data.path, alone.data.sources) == ("one.jsonl", None)
    one_file = tmp_path / "one.yaml"
    one_file.write_text("data: {path: one.jsonl}\nmodel: {name_or_path: m}\n")
    listed = load_config(one_file, ["data.sources=[a.jsonl, b.jsonl]"])
    assert listed.data.path is None and [s.path for s in listed.data.sources] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="data.path and data.sources are both set"):
        load_config(one_file, ["data.sources=[a.jsonl]", "data.path=c.jsonl"])


# --------------------------------------------------------------------------------------------------
# training.init_adapter


def lora_weights(model) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().float().clone() for key, value in get_peft_model_state_dict(model).items()}


def test_init_from_a_folder_starts_from_its_weights(trained, make_config, tmp_path) -> None:
    import torch

    from tasks.gpu import check_gpu
    from tasks.train import train

    source = trained[3]
    # a learning rate too small to move the weights: after a step they are still the source's
    config = make_config(f"training.init_adapter={source.adapter_dir}", "training.max_steps=1",
                         "training.learning_rate=1e-12", "training.warmup_ratio=0")
    splits = load_splits(config.data)
    splits.eval = []
    _, plan = check_gpu(config)
    result = train(config, plan, splits, keep_model=True)
    started, expected = lora_weights(result.model), lora_weights(source.model)
    assert started.keys() == expected.keys() and any(key.endswith("lora_B.weight") for key in started)
    for key, value in expected.items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=1e-6)
    assert any(value.abs().max() > 0 for key, value in started.items() if "lora_B" in key), "not a fresh LoRA"

    from tasks.adapter import adapter_content_hash, read_train_summary

    recorded = read_train_summary(result.adapter_dir)["init_adapter"]
    assert recorded == {"source": str(source.adapter_dir), "path": str(source.adapter_dir.resolve()),
                        "version": None, "adapter_sha256": adapter_content_hash(source.adapter_dir),
                        "base": str(config.model.name_or_path)}


@pytest.mark.parametrize(
    ("overrides", "named", "not_named"),
    [
        (["lora.r=8"], ["rank: adapter 16, config 8"], ["target modules", "base:"]),
        (["lora.target_modules=[q_proj, v_proj]"], ["target modules: adapter {adapter_targets}, config "
                                                    "['q_proj', 'v_proj']"], ["rank:", "base:"]),
        (["lora.r=4", "model.name_or_path={changed}"], ["rank: adapter 16, config 4", "base: adapter '"],
         ["target modules"]),
    ],
    ids=["rank", "target-modules", "rank-and-base"],
)
def test_init_adapter_of_another_shape_is_refused_naming_each_difference(overrides, named, not_named, trained,
                                                                         make_config, tmp_path) -> None:
    import shutil

    from tasks.adapter import read_adapter_config
    from tasks.gpu import check_gpu
    from tasks.train import train

    source = trained[3].adapter_dir
    changed = tmp_path / "changed-base"
    shutil.copytree(trained[0].model.name_or_path, changed)
    config_json = changed / "config.json"
    config_json.write_text(config_json.read_text().replace("}", ', "tampered": true}', 1))
    config = make_config(f"training.init_adapter={source}", "training.max_steps=1",
                         *(item.format(changed=changed) for item in overrides))
    splits = load_splits(config.data)
    _, plan = check_gpu(config)
    with pytest.raises(ConfigError) as refused:
        train(config, plan, splits)
    message = str(refused.value)
    assert message.startswith(f"training.init_adapter {source}: the adapter does not fit")
    adapter_targets = sorted(read_adapter_config(source)["target_modules"])  # all-linear, as peft resolved it
    assert "q_proj" in adapter_targets and len(adapter_targets) > 2
    for text in named:
        assert text.format(adapter_targets=adapter_targets) in message, message
    for text in not_named:
        assert text not in message, message
    assert not (Path(config.training.output_dir) / "adapter").exists()


def test_init_adapter_is_part_of_the_setup_hash(trained, make_config, tmp_path) -> None:
    import shutil

    from tasks.checkpoints import training_setup_hash
    from tasks.gpu import check_gpu
    from tasks.registry import resolve_init_adapter

    source = trained[3].adapter_dir
    fresh = make_config()
    _, plan = check_gpu(fresh)
    splits = load_splits(fresh.data)
    from_source = make_config(f"training.init_adapter={source}")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    from_copy = make_config(f"training.init_adapter={copy}")
    hashes = {name: training_setup_hash(config, plan, splits, resolve_init_adapter(config))
              for name, config in (("fresh", fresh), ("source", from_source), ("copy", from_copy))}
    assert hashes["source"] != hashes["fresh"]
    assert hashes["copy"] == hashes["source"], "the same adapter content is the same starting point"
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    assert training_setup_hash(from_copy, plan, splits, resolve_init_adapter(from_copy)) != hashes["source"]
    with pytest.raises(ValueError, match="pass the resolved InitAdapter"):
        training_setup_hash(from_source, plan, splits)


def test_init_adapter_resolves_registry_versions_and_aliases(trained, registry_config) -> None:
    from tasks.adapter import adapter_content_hash
    from tasks.register import register_adapter
    from tasks.registry import resolve_init_adapter

    registry_config.registry.log_input_example = False
    register_adapter(registry_config, trained[3].adapter_dir, typed_eval_report())
    client_tags = _version_tags(registry_config, "1")

    def resolve(source: str):
        return resolve_init_adapter(registry_config.with_overrides({"training.init_adapter": source}))

    by_version, by_alias = resolve("models:/demo-qlora-adapter/1"), resolve("models:/demo-qlora-adapter@champion")
    for init in (by_version, by_alias):
        assert init.version == "1" and init.same_base
        assert init.adapter_sha256 == client_tags["adapter_sha256"] == adapter_content_hash(trained[3].adapter_dir)
        assert init.base == client_tags["base_model"]
    assert by_alias.source == "models:/demo-qlora-adapter@champion" and by_alias.path == by_version.path
    with pytest.raises(ConfigError, match="no version of demo-qlora-adapter holds alias 'nightly'"):
        resolve("models:/demo-qlora-adapter@nightly")
    with pytest.raises(ConfigError, match="demo-qlora-adapter has no version 7"):
        resolve("models:/demo-qlora-adapter/7")


def _version_tags(config, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = config.registry.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(config.registry.model_name, version).tags
