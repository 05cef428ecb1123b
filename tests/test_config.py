"""The config schema: presets, overrides, and one clear message per kind of bad config."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from configs.schema import ConfigError, LoraSettings, load_config
from flows.cli import app
from tests.conftest import DEMO_CONFIG, REPO_ROOT


def test_demo_config_and_example_configs_pass_the_schema() -> None:
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.lora.r and config.lora.alpha, path


def test_overrides_are_parsed_as_yaml_values() -> None:
    config = load_config(DEMO_CONFIG, ["training.max_steps=7", "lora.target_modules=[q_proj, v_proj]",
                                       "evaluation.max_rows=null", "training.packing=false"])
    assert config.training.max_steps == 7
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.evaluation.max_rows is None
    assert config.training.packing is False


@pytest.mark.parametrize(
    ("preset", "r", "alpha", "targets"),
    [
        ("summarization", 16, 32, ["q_proj", "v_proj"]),
        ("code", 32, 64, ["q_proj", "v_proj", "gate_proj", "up_proj"]),
        ("instruction", 64, 128, ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("classification", 8, 16, ["q_proj", "v_proj"]),
    ],
)
def test_lora_presets(preset: str, r: int, alpha: int, targets: list[str]) -> None:
    lora = LoraSettings(preset=preset)
    assert (lora.r, lora.alpha, lora.target_modules) == (r, alpha, targets)


def test_alpha_policies_and_explicit_values_win_over_presets() -> None:
    assert LoraSettings(r=8, alpha_policy="conservative").alpha == 8
    assert LoraSettings(r=8).alpha == 16
    assert LoraSettings(r=8, alpha_policy="aggressive").alpha == 32
    assert LoraSettings(preset="code", alpha_policy="aggressive").alpha == 128
    explicit = LoraSettings(preset="instruction", r=4, alpha=7, target_modules=["q_proj"])
    assert (explicit.r, explicit.alpha, explicit.target_modules) == (4, 7, ["q_proj"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("training.max_stepz=3", "unknown key 'training.max_stepz'"),
        ("lora.r=0", "lora.r must be a positive integer"),
        ("lora.r=-4", "lora.r must be a positive integer"),
        ("lora.dropout=1.0", "lora.dropout must be in [0, 1)"),
        ("lora.dropout=-0.1", "lora.dropout must be in [0, 1)"),
        ("lora.preset=chatbot", "lora.preset"),
        ("quantization.quant_type=int3", "'nf4' or 'fp4'"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(DEMO_CONFIG, [override])
    assert needle in str(excinfo.value)


def test_override_needs_key_and_value() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO_CONFIG, ["training.max_steps"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lora.r=0", "lora.r"),
        ("training.bogus=1", "unknown key 'training.bogus'"),
        ("data.path=/nonexistent/train.jsonl", "data.path"),
        ("lora.target_modules=[q_proj, w_pack]", "lora.target_modules"),
    ],
)
def test_cli_bad_config_exits_nonzero_and_writes_nothing(make_config, tmp_path, override: str, needle: str) -> None:
    base = make_config()  # valid paths for the demo assets
    out = tmp_path / "untouched"
    args = ["train", "--set", f"data.path={base.data.path}", "--set", f"model.name_or_path={base.model.name_or_path}",
            "--set", f"training.output_dir={out}", "--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not out.exists()


def test_missing_target_module_lists_the_models_linear_modules(make_config, tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", "--set", f"data.path={make_config().data.path}",
                                      "--set", f"model.name_or_path={make_config().model.name_or_path}",
                                      "--set", f"training.output_dir={tmp_path / 'o'}",
                                      "--set", "lora.target_modules=[c_attn]"])
    assert result.exit_code == 2
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in result.output
    assert "lm_head" not in result.output


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    commands = [c.name for c in app.registered_commands]
    assert {"demo-assets", "check-gpu", "train"} <= set(commands)
    for name in commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage" in result.output


@pytest.mark.parametrize(("command", "override"), [("run", "data.path=/nonexistent/train.jsonl"),
                                                     ("serve", "data.eval_path=/nonexistent/eval.jsonl"),
                                                     ("run", "lora.dropout=1.5"),
                                                     ("run", "registry.tracking_uri=http://127.0.0.1:9"),
                                                     ("serve", "registry.tracking_uri=http://127.0.0.1:9")])
def test_flow_commands_refuse_a_bad_config_before_any_flow_run(make_config, tmp_path, monkeypatch, command: str,
                                                               override: str) -> None:
    """`qlora run`/`serve` check the config and data files first: no Prefect server, no schedule."""
    import flows.finetune

    def must_not_start(*args, **kwargs):
        raise AssertionError("a flow run or schedule started on a bad config")

    monkeypatch.setattr(flows.finetune, "finetune_flow", must_not_start)
    base = make_config()
    out = tmp_path / "untouched"
    result = CliRunner().invoke(app, [command, "--set", f"data.path={base.data.path}",
                                      "--set", f"model.name_or_path={base.model.name_or_path}",
                                      "--set", f"training.output_dir={out}", "--set", override])
    assert result.exit_code == 2, result.output
    assert override.split("=")[0] in result.output
    assert not out.exists()
