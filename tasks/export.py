"""`qlora export --merge`: one standalone model (base + adapter merged) for vLLM, TGI or plain transformers.

The base is loaded exactly as it was trained and served (4-bit through tasks.modeling.load_model),
dequantized by transformers (`model.dequantize`, the values the 4-bit layers compute with), the
adapter is put on it and merged (peft's `merge_and_unload`), and the result is saved as safetensors
with the adapter's tokenizer and chat template. The export is then checked: the saved model, loaded
back, must give the same next-token logits as base + adapter on a few prompts, within a tolerance
(relative to the logits' scale); otherwise it is refused. With `register`, the folder is registered
as `<name>-merged`, tagged with the adapter version it came from.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, PipelineConfig

logger = logging.getLogger(__name__)

CHECK_PROMPTS = ("Rewrite this in Zorbish.\n\nthe red cat runs", "Rewrite this in Zorbish.\n\nbig dog sleeps",
                 "Hello, how are you?")
DEFAULT_TOLERANCE = 1e-2


class ExportMismatch(ConfigError):
    """The merged model does not reproduce base + adapter within the tolerance."""


@dataclass
class ExportResult:
    out_dir: Path
    dtype: str
    max_abs_diff: float
    relative_diff: float
    same_argmax: bool
    registered: str | None = None


def next_token_logits(model: Any, tokenizer: Any, prompts: list[str]) -> Any:
    """The last-position logits of each prompt (one at a time: no padding in the comparison), in float32."""
    import torch

    from tasks.modeling import pin_cpu_4bit_path

    pin_cpu_4bit_path(model)
    model.eval()
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
            rows.append(model(input_ids=ids).logits[0, -1].float().cpu())
    return torch.stack(rows)


def export_merged(config: PipelineConfig, source: str, out_dir: str | Path, dtype: str = "float16",
                  tolerance: float = DEFAULT_TOLERANCE, register: bool = False) -> ExportResult:
    """Merge the adapter at `source` (models:/ URI or folder) into its dequantized base and save it to `out_dir`."""
    from transformers import AutoModelForCausalLM

    from tasks.modeling import load_model, release_memory, torch_dtype
    from tasks.pyfunc_model import load_adapter_model, render_user_prompts, resolve_base, runtime_precision
    from tasks.serving_models import locate_adapter

    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"--dtype {dtype}: choose float16, bfloat16 or float32")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose a new folder (nothing is overwritten)")
    found = locate_adapter(config, source)
    reference = found.reference or _config_reference(config)

    reference_model, tokenizer = load_adapter_model(found.folder, reference)  # base + adapter, as served
    prompts = render_user_prompts(tokenizer, list(CHECK_PROMPTS))
    expected = next_token_logits(reference_model, tokenizer, prompts)
    del reference_model
    release_memory()

    from peft import PeftModel

    base_source, revision = resolve_base(reference)
    precision = runtime_precision(reference.get("quantization") or {}, None)
    base = load_model(base_source, revision=revision, trust_remote_code=bool(reference.get("trust_remote_code")),
                      **precision)
    target = torch_dtype(dtype)
    base = base.dequantize(dtype=target) if precision["load_in_4bit"] else base.to(target)
    merged = PeftModel.from_pretrained(base, str(found.folder)).merge_and_unload()
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)  # with the chat template the adapter was trained with
    del merged, base
    release_memory()

    reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=torch_dtype("float32"))
    actual = next_token_logits(reloaded, tokenizer, prompts)
    max_abs = float((actual - expected).abs().max())
    relative = max_abs / max(float(expected.abs().max()), 1e-6)
    same_argmax = bool((actual.argmax(-1) == expected.argmax(-1)).all())
    if relative > tolerance or not same_argmax:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportMismatch(
            f"the merged model does not reproduce base + adapter: largest logit difference {max_abs:.4g} "
            f"({relative:.2%} of the logits' scale, tolerance {tolerance:.2%}), same next token: {same_argmax}. "
            "Nothing was written; try --dtype float32 (or bfloat16 for a model trained in bf16)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        out_dir.rmdir()
    staging.rename(out_dir)
    result = ExportResult(out_dir, dtype, max_abs, relative, same_argmax)
    if register:
        if found.registered_name is None:
            raise ConfigError("--register needs a models:/ URI as --model (the export is linked to its version)")
        result.registered = register_merged(config, found.registered_name, found.version, out_dir, result)
    return result


def _config_reference(config: PipelineConfig) -> dict[str, Any]:
    from tasks.modeling import base_model_reference

    quantization = config.quantization
    return {**base_model_reference(config), "trust_remote_code": config.model.trust_remote_code,
            "quantization": {"load_in_4bit": quantization.load_in_4bit, "quant_type": quantization.quant_type,
                             "double_quant": quantization.double_quant}}


def register_merged(config: PipelineConfig, name: str, version: str | None, out_dir: Path,
                    result: ExportResult) -> str:
    """Register the merged folder as a version of `<name>-merged`, linked to the adapter version; returns its URI."""
    from tasks.registry import await_ready, ensure_registered_model
    from tasks.tracking import apply_http_settings, client_for, ensure_experiment, resolve_tracking_uri

    apply_http_settings(config)
    uri = resolve_tracking_uri(config)
    client = client_for(uri)
    experiment_id = ensure_experiment(client, config.registry.experiment_name, uri)
    run = client.create_run(experiment_id, run_name=f"export-{name}-v{version}",
                            tags={"adapter_model": name, "adapter_version": str(version)})
    client.log_artifacts(run.info.run_id, str(out_dir), "merged")
    client.set_terminated(run.info.run_id, "FINISHED")
    merged_name = f"{name}-merged"
    ensure_registered_model(client, merged_name)
    created = client.create_model_version(
        merged_name, source=f"{run.info.artifact_uri}/merged", run_id=run.info.run_id,
        tags={"adapter_model": name, "adapter_version": str(version), "adapter_uri": f"models:/{name}/{version}",
              "dtype": result.dtype, "max_abs_logit_diff": f"{result.max_abs_diff:.6g}"},
        description=f"`models:/{name}/{version}` merged into its dequantized base ({result.dtype}); "
                    f"largest next-token logit difference to base + adapter: {result.max_abs_diff:.4g}.")
    await_ready(client, merged_name, str(created.version))
    return f"models:/{merged_name}/{created.version}"
