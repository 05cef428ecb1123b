"""Real QLoRA training on the CPU: NF4 + double quantization, paged 8-bit AdamW, checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from tasks.adapter import CONFIG_FILE, SUMMARY_FILE
from tasks.checkpoints import CHECKPOINT_DIRNAME
from tasks.data import load_splits
from tasks.gpu import check_gpu
from tasks.train import train


def test_lora_targets_are_real_4bit_layers(trained) -> None:
    import bitsandbytes as bnb

    _, plan, _, result = trained
    assert plan.load_in_4bit and plan.quant_type == "nf4" and plan.double_quant
    lora_layers = [m for n, m in result.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert lora_layers, "no LoRA layers found"
    for layer in lora_layers:
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert layer.base_layer.weight.quant_state.nested  # double quantization of the absmax constants
    assert result.summary.plan["optim"] == "paged_adamw_8bit"
    # packing on (the default) and no flash-attn on a CPU: attention runs per packed sequence
    assert result.model.config._attn_implementation == "packed_sdpa"


def test_short_training_lowers_eval_loss_clearly(trained) -> None:
    summary = trained[3].summary
    assert summary.eval_loss_before is not None and summary.eval_loss_after is not None
    assert summary.eval_loss_after < 0.6 * summary.eval_loss_before
    assert summary.global_step == 160 and summary.tokens_per_second > 0 and summary.train_tokens > 0


def test_adapter_is_standard_peft_and_reloads_with_identical_logits(trained) -> None:
    from peft import PeftModel

    from tasks.modeling import load_base_model, load_tokenizer

    config, plan, splits, result = trained
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", SUMMARY_FILE, CONFIG_FILE} <= files
    assert "tokenizer.json" in files and "chat_template.jinja" in files or "tokenizer_config.json" in files
    tokenizer = load_tokenizer(config)
    batch = tokenizer(["<|user|>\nRewrite this in Zorbish.\n\nred cat runs<|end|>\n<|assistant|>\n"],
                      return_tensors="pt")
    reloaded = PeftModel.from_pretrained(load_base_model(config, plan), str(result.adapter_dir)).eval()
    in_memory = result.model.eval()
    with torch.no_grad():
        expected = in_memory(**batch).logits
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


class StopAfterFirstCheckpoint(TrainerCallback):
    """Simulates a crash right after a checkpoint was written."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt(f"simulated crash at step {state.global_step}")


def test_interrupted_training_resumes_from_its_checkpoint(make_config, tmp_path) -> None:
    config = make_config("training.max_steps=6", "training.save_steps=3", "training.logging_steps=1",
                         output_dir=tmp_path / "run")
    splits = load_splits(config.data)
    splits.train, splits.eval = splits.train[:96], splits.eval[:16]  # the 6 batches of 16 it trains on
    _, plan = check_gpu(config)
    with pytest.raises(KeyboardInterrupt):
        train(config, plan, splits, callbacks=[StopAfterFirstCheckpoint()])
    checkpoints = sorted(p.name for p in (tmp_path / "run" / CHECKPOINT_DIRNAME).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3"]
    assert not (tmp_path / "run" / "adapter").exists()  # no adapter from an unfinished run

    result = train(config, plan, splits)
    assert result.summary.resumed_from_step == 3
    assert result.summary.global_step == 6
    state = json.loads((tmp_path / "run" / CHECKPOINT_DIRNAME / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # the loss history of steps 1-3 came back with the checkpoint; steps 4-6 were trained after it
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_packed_rows_attend_only_within_their_own_example(make_config) -> None:
    """Per-sequence attention over a flattened batch gives each example the logits it has alone."""
    from transformers import DataCollatorWithFlattening

    from tasks.modeling import load_base_model, load_tokenizer, packing_attention

    config = make_config()
    _, plan = check_gpu(config)
    tokenizer = load_tokenizer(config)
    texts = ["red cat runs", "the small dog eats green apples slowly today", "blue"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    model = load_base_model(config, plan).eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row])).logits[0] for row in ids]
        model.set_attn_implementation(packing_attention(plan))
        packed = DataCollatorWithFlattening()([{"input_ids": row} for row in ids])
        flat = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
    assert flat.shape[0] == sum(len(row) for row in ids)
    start = 0
    for row, expected in zip(ids, alone, strict=True):
        torch.testing.assert_close(flat[start:start + len(row)], expected, rtol=1e-4, atol=1e-4)
        start += len(row)


def test_kbit_preparation_keeps_embeddings_in_the_compute_dtype(make_config) -> None:
    """Frozen embeddings/lm_head stay bf16 under a bf16 plan (peft would upcast them to fp32); norms are fp32."""
    from dataclasses import replace

    from tasks.modeling import load_base_model
    from tasks.train import build_lora_model

    config = make_config()
    _, plan = check_gpu(config)
    plan = replace(plan, compute_dtype="bfloat16")
    model = build_lora_model(load_base_model(config, plan), config, plan)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert any("embed_tokens" in n for n in dtypes)
    for name, dtype in dtypes.items():
        if "embed_tokens" in name or "lm_head" in name:
            assert dtype == torch.bfloat16, name
        elif "norm" in name:
            assert dtype == torch.float32, name
        elif "lora_" in name:
            assert dtype == torch.float32, name  # trainable weights in full precision for the optimizer


def test_a_finished_run_is_not_resumed_and_another_setup_does_not_reuse_checkpoints(make_config, tmp_path) -> None:
    """Nightly runs share an output dir: tomorrow must train again, and never continue other data's weights."""
    config = make_config("training.max_steps=4", "training.save_steps=2", output_dir=tmp_path / "run")
    splits = load_splits(config.data)
    splits.train, splits.eval = splits.train[:64], splits.eval[:8]  # 4 batches of 16, tokenized by each of the 4 runs
    _, plan = check_gpu(config)
    train(config, plan, splits)
    again = train(config, plan, splits)
    assert again.summary.resumed_from_step == 0 and again.summary.global_step == 4

    with pytest.raises(KeyboardInterrupt):
        train(config, plan, splits, callbacks=[StopAfterFirstCheckpoint()])
    changed = make_config("training.max_steps=4", "training.save_steps=2", "training.learning_rate=1e-3",
                          output_dir=tmp_path / "run")
    fresh = train(changed, plan, splits)
    assert fresh.summary.resumed_from_step == 0
    (stale,) = (tmp_path / "run").glob(f"{CHECKPOINT_DIRNAME}.stale-*")
    assert (stale / "checkpoint-2" / "trainer_state.json").is_file(), "the other setup's checkpoint was kept"
