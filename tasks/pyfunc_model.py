"""The registered model: an MLflow pyfunc that holds a LoRA adapter and finds its base model at load time.

A model version's artifacts are the adapter folder (peft files, tokenizer, the training config and
summary) and `base_model.json`, the recorded reference to the base: `{"kind": "local", "path",
"sha256"}` or `{"kind": "hub", "id", "revision"}` plus the quantization it was trained with. The base
weights are never copied into the registry. `load_context` finds the base (a local folder must still
exist and hash to the recorded value; a hub model is fetched at the pinned revision), puts the adapter
on it, and `predict` generates greedily, in batches, with left padding.

Options at load time, through `mlflow.pyfunc.load_model(uri, model_config={...})`:
- `base_model_path`: where the local base lives now, when it moved (its hash is still checked);
- `load_in_4bit`: force (true) or refuse (false) 4-bit loading; default: 4-bit when the adapter was
  trained 4-bit and CUDA plus bitsandbytes are available, else float32 on the CPU;
- `max_new_tokens`, `batch_size`: generation defaults (`max_new_tokens` may also be a predict param).

The model is logged as a "model from code" (tasks.register.MODEL_CODE, no pickle), with this
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

logger = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"
BASE_ARTIFACT = "base_model"
BASE_REFERENCE_FILE = "base_model.json"
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_BATCH_SIZE = 16


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


def _four_bit_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def load_adapter_model(adapter_dir: str | Path, reference: dict[str, Any],
                       options: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(PeftModel in eval mode, tokenizer with left padding) for an adapter and its base reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tasks.modeling import quiet_libraries

    quiet_libraries()
    options = options or {}
    source, revision = resolve_base(reference, options.get("base_model_path"))
    trust = bool(reference.get("trust_remote_code", False))
    quant = reference.get("quantization") or {}
    want_4bit = options.get("load_in_4bit")
    use_4bit = (_four_bit_available() and bool(quant.get("load_in_4bit"))) if want_4bit is None else bool(want_4bit)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust}
    if use_4bit:
        on_cuda = torch.cuda.is_available()
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_cuda else torch.float32
        kwargs.update(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
                bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
                bnb_4bit_compute_dtype=dtype,
            ),
            dtype=dtype,
            device_map={"": 0 if on_cuda else "cpu"},
        )
    else:
        kwargs.update(dtype=torch.float32, device_map={"": "cpu"})
    try:
        base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
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


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
             batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
    """Greedy completions, batched with left padding; each prompt goes through the chat template."""
    import torch

    from tasks.data import render_prompt

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


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
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size)


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
