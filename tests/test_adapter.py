"""The adapter folder's contract (tasks.adapter): peft's file names, and the one same-base rule that
evaluation, registration and the champion lookup all apply, on real copies of the demo base model."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from configs.schema import ConfigError


def test_the_file_names_are_peft_s_own() -> None:
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    from tasks.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SAFETENSORS_WEIGHTS

    assert (ADAPTER_CONFIG, SAFETENSORS_WEIGHTS) == (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
    assert ADAPTER_WEIGHTS == (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)


@pytest.fixture
def bases(demo_assets, tmp_path) -> dict[str, str]:
    """Where an adapter may say its base was, next to the configured demo base (`configured`)."""
    configured = demo_assets.model_dir.resolve()
    copy, changed, link = tmp_path / "copy", tmp_path / "changed", tmp_path / "link"
    shutil.copytree(configured, copy)
    shutil.copytree(configured, changed)
    config_json = changed / "config.json"
    config_json.write_text(config_json.read_text().replace("}", ', "tampered": true}', 1))
    link.symlink_to(configured, target_is_directory=True)
    return {"configured": str(configured), "same path": str(configured), "symlink": str(link), "copy": str(copy),
            "changed copy": str(changed), "hub id": "meta-llama/Llama-3.2-1B", "gone": str(tmp_path / "gone")}


SAME = {"same path": True, "symlink": True, "copy": True, "changed copy": False, "hub id": False, "gone": False}


@pytest.mark.parametrize(("recorded", "same"), SAME.items())
def test_evaluation_and_registration_apply_one_same_base_rule(recorded, same, bases, make_config, tmp_path) -> None:
    from tasks.adapter import CONFIG_FILE, check_adapter_base, same_base
    from tasks.register import base_reference

    config = make_config()
    assert config.model.name_or_path == bases["configured"]
    trained_on = bases[recorded]
    assert same_base(trained_on, config.model.name_or_path) is same

    # evaluation reads the base from adapter_config.json
    adapter_config = {"peft_type": "LORA", "base_model_name_or_path": trained_on}
    if same:
        check_adapter_base(adapter_config, config, "adapter")
    else:
        with pytest.raises(ConfigError, match=f"trained on base '{trained_on}'"):
            check_adapter_base(adapter_config, config, "adapter")

    # registration reads it from the training config kept with the adapter
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONFIG_FILE).write_text(yaml.safe_dump({"model": {"name_or_path": trained_on}}))
    if same:
        assert base_reference(config, adapter)["path"] == bases["configured"]
    else:
        with pytest.raises(ConfigError, match=f"was trained on '{trained_on}'"):
            base_reference(config, adapter)


@pytest.mark.parametrize(("recorded", "now", "fits"), [
    ("configured", "configured", True),
    ("configured", "copy", True),  # the base moved or was copied: same content
    ("configured", "symlink", True),
    ("configured", "changed copy", False),
    ("changed copy", "configured", False),
])
def test_the_champion_fits_the_base_by_the_same_rule(recorded, now, fits, bases, make_config) -> None:
    from tasks.adapter import same_base
    from tasks.modeling import base_model_reference
    from tasks.registry import base_label, recorded_base_fits

    reference = base_model_reference(make_config(f"model.name_or_path={bases[recorded]}"))
    tags = {"base_model": base_label(reference), "base_model_reference": json.dumps(reference)}
    config = make_config(f"model.name_or_path={bases[now]}")
    assert recorded_base_fits(tags, config) is fits
    assert same_base(reference["path"], config.model.name_or_path, recorded_sha256=reference["sha256"]) is fits


def test_the_recorded_content_decides_even_when_the_recorded_folder_is_gone(bases, make_config) -> None:
    from tasks.modeling import base_model_reference
    from tasks.registry import base_label, recorded_base_fits

    reference = base_model_reference(make_config(f"model.name_or_path={bases['copy']}"))
    tags = {"base_model": base_label(reference), "base_model_reference": json.dumps(reference)}
    shutil.rmtree(bases["copy"])
    assert recorded_base_fits(tags, make_config())  # the configured base holds the same content
    assert not recorded_base_fits(tags, make_config(f"model.name_or_path={bases['changed copy']}"))


def test_a_version_without_a_recorded_base_fits_any(make_config) -> None:
    from tasks.registry import recorded_base_fits

    assert recorded_base_fits({}, make_config())
