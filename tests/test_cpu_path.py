"""bitsandbytes' packed AVX512-BF16 CPU path, forced on whatever CPU runs the tests.

bitsandbytes 0.50 turns a 4-bit layer into a packed bf16 layout in its first eval-mode forward without
grad when the layer's `support_avx512bf16_for_cpu` flag is set (it sets the flag from the CPU). These
tests set the flag themselves, so they prove on a machine with or without the feature that the
pipeline neutralises it: losses, gradients and generations are those of the unflagged model.
"""

from __future__ import annotations

from dataclasses import replace

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from bitsandbytes.nn import Linear4bit

from configs.schema import load_config
from tasks.data import load_splits, render_prompt
from tasks.evaluate import eval_loss
from tasks.generation import generate
from tasks.gpu import check_gpu
from tasks.modeling import PackedCpuLayerError, load_base_model, load_tokenizer, pin_cpu_4bit_path
from tests.conftest import DEMO_CONFIG


def four_bit_layers(model: torch.nn.Module) -> dict[str, Linear4bit]:
    layers = {name: module for name, module in model.named_modules() if isinstance(module, Linear4bit)}
    assert layers, "the demo base must load with real bitsandbytes 4-bit layers"
    return layers


def force_packed_path(model: torch.nn.Module) -> None:
    """What bitsandbytes does on a CPU with AVX512-BF16, done by hand on any CPU."""
    for layer in four_bit_layers(model).values():
        layer.support_avx512bf16_for_cpu = True


def is_packed(layer: Linear4bit) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def input_gradients(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """d(sum of outputs)/d(input) of every 4-bit layer, in train mode: what the LoRA layers below get."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    grads = {}
    for name, layer in four_bit_layers(model).items():
        x = torch.randn(2, 3, layer.in_features, generator=generator, requires_grad=True)
        layer(x).sum().backward()
        grads[name] = x.grad
    model.train(was_training)
    return grads


@pytest.fixture(scope="module")
def demo(demo_assets, tmp_path_factory):
    """The demo config on a few rows: (config, plan, splits, tokenizer, rendered eval prompts)."""
    config = load_config(DEMO_CONFIG, [
        f"data.path={demo_assets.data_path.resolve()}",
        f"model.name_or_path={demo_assets.model_dir.resolve()}",
        f"training.output_dir={tmp_path_factory.mktemp('cpu-path')}",
        "training.max_steps=3", "training.logging_steps=1", "training.save_steps=100",
    ])
    full = load_splits(config.data)
    splits = replace(full, train=full.train[:96], eval=full.eval[:16])
    _, plan = check_gpu(config)
    assert plan.device == "cpu" or not torch.cuda.is_available()
    tokenizer = load_tokenizer(config)
    prompts = [render_prompt(tokenizer, e.prompt_messages) for e in splits.eval[:8]]
    return config, plan, splits, tokenizer, prompts


def test_loading_turns_off_the_flag_bitsandbytes_sets_from_the_cpu(demo, monkeypatch) -> None:
    config, plan, *_ = demo
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    assert Linear4bit(64, 64).support_avx512bf16_for_cpu, "the forced CPU feature must reach new 4-bit layers"
    model = load_base_model(config, plan)
    assert not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model).values())


def test_a_flag_forced_after_loading_changes_no_loss_generation_or_gradient(demo, monkeypatch) -> None:
    config, plan, splits, tokenizer, prompts = demo
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)  # the reference: a CPU without the feature
    model = load_base_model(config, plan)
    loss_before = eval_loss(model, tokenizer, splits.eval, config.data.max_seq_length, batch_size=8)[0]
    answers_before = generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=4)
    grads_before = input_gradients(model)

    force_packed_path(model)
    loss_after = eval_loss(model, tokenizer, splits.eval, config.data.max_seq_length, batch_size=8)[0]
    answers_after = generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=4)
    grads_after = input_gradients(model)  # after eval-mode forwards: a packed layer would pass no gradient

    assert loss_after == pytest.approx(loss_before, rel=1e-6)
    assert answers_after == answers_before and any(answers_before)
    for name, grad in grads_after.items():
        assert grad is not None, f"{name} passed no gradient to its input after an eval forward"
        torch.testing.assert_close(grad, grads_before[name], rtol=1e-5, atol=1e-6)
    assert not any(is_packed(layer) for layer in four_bit_layers(model).values())


def test_training_with_the_cpu_flag_forced_matches_training_without(demo, monkeypatch, tmp_path) -> None:
    from tasks.train import train

    config, plan, splits, *_ = demo

    def run(name: str):
        run_config = config.model_copy(deep=True)
        run_config.training.output_dir = tmp_path / name
        result = train(run_config, plan, splits, keep_model=True)
        lora = {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}
        return result.summary, lora

    # As on a CPU without AVX512-BF16, then as on one with it: every 4-bit layer train() creates
    # carries the flag, and the Trainer's evaluate before training is the eval-mode forward that
    # would pack them.
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    plain_summary, plain_lora = run("plain")
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    forced_summary, forced_lora = run("forced")

    assert forced_summary.global_step == plain_summary.global_step == 3
    for key in ("eval_loss_before", "train_loss", "eval_loss_after"):
        assert getattr(forced_summary, key) == pytest.approx(getattr(plain_summary, key), rel=1e-5), key
    assert forced_lora.keys() == plain_lora.keys() and plain_lora
    for name, weight in forced_lora.items():
        torch.testing.assert_close(weight, plain_lora[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_already_packed_layer_is_refused_with_the_fix(demo) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    config, plan, _, tokenizer, prompts = demo
    model = load_base_model(config, plan)
    name, layer = next(iter(four_bit_layers(model).items()))
    # what bitsandbytes' forward does to a flagged layer before the pipeline could pin it
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    with pytest.raises(PackedCpuLayerError, match="load_base_model") as refused:
        pin_cpu_4bit_path(model)
    assert name in str(refused.value) and "bf16" in str(refused.value)
    with pytest.raises(PackedCpuLayerError):
        generate(model, tokenizer, prompts[:1], max_new_tokens=2)
