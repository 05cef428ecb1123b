"""The registered model: an MLflow pyfunc that holds a LoRA adapter and finds its base model at load time.

A model version's artifacts are the adapter folder (peft files, tokenizer, the training config and
summary) and `base_model.json`, the recorded reference to the base: `{"kind": "local", "path",
"sha256"}` or `{"kind": "hub", "id", "revision"}` plus the quantization it was trained with. The base
weights are never copied into the registry. `load_context` finds the base (a local folder must still
exist and hash to the recorded value; a hub model is fetched at the pinned revision), puts the adapter
on it, and `predict` answers through tasks.generation.generate, the function evaluation scored with.

Options at load time, through `mlflow.pyfunc.load_model(uri, model_config={...})`:
- `base_model_path`: where the local base lives now, when it moved (its hash is still checked);
- `load_in_4bit`: force (true) or refuse (false) 4-bit loading; default: 4-bit when the adapter was
  trained 4-bit and bitsandbytes' 4-bit layers run here (a GPU, or the CPU as in the CPU plan), else
  float32 on the CPU;
- `max_new_tokens`, `batch_size`: generation defaults (`max_new_tokens` may also be a predict param).

The model is logged as a "model from code" (tasks.registry.MODEL_CODE, no pickle), with this
project's `tasks` and `configs` packages shipped as its code (`code_paths`), so a fresh process
needs only the pip requirements recorded with it, not this repository.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from configs.schema import ConfigError
from tasks.generation import DEFAULT_BATCH_SIZE, generate

logger = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"
BASE_ARTIFACT = "base_model"
BASE_REFERENCE_FILE = "base_model.json"
DEFAULT_MAX_NEW_TOKENS = 64


class BaseModelUnavailable(ConfigError):
    """The base model recorded with a version cannot be found, or is not the same content any more."""


def resolve_base(reference: dict[str, Any], override_path: str | None = None) -> tuple[str, str | None]:
    """(name_or_path, revision) to load the base from; refuses a missing or changed local folder."""
    from tasks.modeling import hash_directory

    if reference.get("kind") == "hub":
        revision = reference.get("revision")
        return str(reference["id"]), None if revision in (None, "", "unpinned") else str(revision)
    if reference.get("kind") != "local":
        raise BaseModelUnavailable(f"unknown base model reference {reference!r}; expected kind 'local' or 'hub'")
    path = Path(override_path or reference["path"])
    recorded = str(reference.get("sha256", ""))
    if not path.is_dir():
        raise BaseModelUnavailable(
            f"base model folder {path} does not exist (this adapter was registered against it with content "
            f"hash {recorded}); restore it there, or load with model_config={{'base_model_path': '/new/place'}}"
        )
    actual = hash_directory(path)
    if actual != recorded:
        raise BaseModelUnavailable(
            f"base model folder {path} has content hash {actual}, but this adapter was registered against "
            f"content hash {recorded}: the weights or config changed; the adapter would not behave as evaluated"
        )
    return str(path), None


def runtime_precision(quantization: dict[str, Any], load_in_4bit: bool | None) -> dict[str, Any]:
    """How to load the base here: 4-bit as trained when bitsandbytes' 4-bit layers run on this device.

    That is the CPU too (bitsandbytes >= 0.46), so the served model is the one evaluation scored. The
    compute dtype follows the plan's automatic rule: bf16 (fp16 without it) on a GPU, fp32 on the CPU.
    `load_in_4bit` forces (True) or refuses (False) 4-bit; without 4-bit the base loads in fp32 on the CPU.
    """
    import torch

    from tasks.hardware import probe_bitsandbytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if load_in_4bit is None:
        load_in_4bit = bool(quantization.get("load_in_4bit")) and probe_bitsandbytes(device)[1]
    if not load_in_4bit:
        return {"load_in_4bit": False, "quant_type": "nf4", "double_quant": False, "compute_dtype": "float32",
                "device": "cpu"}
    compute_dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device == "cuda" else "float32"
    return {"load_in_4bit": True, "quant_type": quantization.get("quant_type", "nf4"),
            "double_quant": bool(quantization.get("double_quant", True)), "compute_dtype": compute_dtype,
            "device": device}


def load_adapter_model(adapter_dir: str | Path, reference: dict[str, Any],
                       options: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(PeftModel in eval mode, tokenizer with left padding) for an adapter and its base reference.

    The base goes through tasks.modeling.load_model, the loader training and evaluation use (same
    quantization config, CPU 4-bit path pinned).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.modeling import load_model

    options = options or {}
    source, revision = resolve_base(reference, options.get("base_model_path"))
    want_4bit = options.get("load_in_4bit")
    precision = runtime_precision(reference.get("quantization") or {}, None if want_4bit is None else bool(want_4bit))
    try:
        base = load_model(source, revision=revision, trust_remote_code=bool(reference.get("trust_remote_code", False)),
                          **precision)
    except OSError as exc:
        raise BaseModelUnavailable(f"cannot load the base model {source} (revision {revision}): {exc}") from exc
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def prompts_from_input(model_input: Any) -> list[str]:
    """A list of prompt strings from a str, a list of str, a dict or DataFrame with a `prompt` column."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            column = model_input["prompt"]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a 'prompt' column, got columns {list(model_input.columns)}")
        return [str(v) for v in column.tolist()]
    if isinstance(model_input, pd.Series):
        return [str(v) for v in model_input.tolist()]
    if isinstance(model_input, dict):
        value = model_input.get("prompt")
        if value is None:
            raise ValueError(f"expected a 'prompt' key, got keys {sorted(model_input)}")
        return [value] if isinstance(value, str) else [str(v) for v in value]
    if hasattr(model_input, "tolist"):  # numpy arrays
        model_input = model_input.tolist()
    if isinstance(model_input, (list, tuple)):
        return [str(v["prompt"]) if isinstance(v, dict) else str(v) for v in model_input]
    raise ValueError(f"expected prompt strings or a DataFrame with a 'prompt' column, got {type(model_input).__name__}")


def render_user_prompts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each prompt as one user message through the adapter's chat template, as training rendered it."""
    from tasks.data import render_prompt

    return [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


class AdapterModel(mlflow.pyfunc.PythonModel):
    """LoRA adapter + recorded base reference; `predict` returns one completion per prompt."""

    def load_context(self, context: Any) -> None:
        reference = json.loads(Path(context.artifacts[BASE_ARTIFACT]).read_text())
        options = dict(context.model_config or {})
        self.model, self.tokenizer = load_adapter_model(context.artifacts[ADAPTER_ARTIFACT], reference, options)
        self.max_new_tokens = int(options.get("max_new_tokens") or reference.get("max_new_tokens")
                                  or DEFAULT_MAX_NEW_TOKENS)
        self.batch_size = int(options.get("batch_size") or DEFAULT_BATCH_SIZE)

    # MLflow hands predict a DataFrame (its signature enforcement converts a list of prompts into a
    # one-column frame); the hint is one MLflow infers no schema from, so it neither converts the input
    # itself nor warns. Called directly, predict also takes a plain list of prompt strings.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        params = params or {}
        prompts = prompts_from_input(model_input)
        if not prompts:
            return []
        max_new_tokens = int(params.get("max_new_tokens") or self.max_new_tokens)
        return generate(self.model, self.tokenizer, render_user_prompts(self.tokenizer, prompts), max_new_tokens,
                        self.batch_size)


def signature(max_new_tokens: int) -> Any:
    """Input: one string column (a list of prompts, or a DataFrame's `prompt` column); output: the
    completions; param: `max_new_tokens`. The input column is unnamed on purpose: MLflow then accepts
    a plain list of strings as well as a DataFrame (a named column would reject the list)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]),
    )
