"""Loading the base model and tokenizer the way the plan says; shared by training and evaluation.

Both stages must see the base model exactly alike (same quantization, same dtype, same tokenizer),
otherwise evaluation would score a different model from the one trained.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, PipelineConfig
from tasks.gpu import TrainingPlan

# Messages that repeat for every layer or step and tell a user nothing actionable.
_NOISY_WARNINGS = (
    r".*torch_dtype.*deprecated.*",
    r".*use_reentrant.*",
    r".*MatMul8bitLt.*",
    r".*Input type into Linear4bit is torch.float16.*",
    r".*None of the inputs have requires_grad=True.*",
    r".*generation flags are not valid.*",
    r".*`use_cache=True` is incompatible with gradient checkpointing.*",
    r".*copying from a non-meta parameter.*",
    r".*Setting `save_embedding_layers`.*",
    # transformers 5.x renames gradient checkpointing to activation checkpointing; peft and the
    # Trainer still call the old names internally, once per run.
    r".*gradient_checkpointing.* is deprecated and will be removed in v6.*",
)


def quiet_libraries() -> None:
    """Keep logs readable: errors and our own progress, not a warning per layer."""
    import datasets
    import transformers

    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(config: PipelineConfig, source: str | Path | None = None) -> Any:
    """The tokenizer with the pipeline's chat template, a pad token and left padding (batched generation).

    The one place `data.chat_template` is applied (a tokenizer without a template gets the fallback):
    training saves this tokenizer with the adapter, so evaluation, the registered model and serving
    render with the template training used.
    """
    from transformers import AutoTokenizer

    from tasks.chat import apply_template_choice

    tokenizer = AutoTokenizer.from_pretrained(
        str(source or config.model.name_or_path),
        revision=None if source else config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
    )
    apply_template_choice(tokenizer, config.data.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: str) -> Any:
    """The one BitsAndBytesConfig of the project: NF4/FP4 4-bit, optional double quantization.

    Training, evaluation, the registered pyfunc model and any server build it here, so the base they
    load is quantized alike. The 4-bit weights are stored in the compute dtype (`quant_storage`),
    which FSDP needs to shard them and costs nothing otherwise.
    """
    from transformers import BitsAndBytesConfig

    dtype = torch_dtype(compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


class PackedCpuLayerError(RuntimeError):
    """A 4-bit layer was already converted to bitsandbytes' packed AVX512-BF16 CPU format."""


def pin_cpu_4bit_path(model: Any) -> int:
    """Turn off bitsandbytes' packed AVX512-BF16 CPU path on every 4-bit layer; returns how many were on.

    bitsandbytes 0.50 sets `Linear4bit.support_avx512bf16_for_cpu` from the CPU it runs on, and then
    converts a layer's weights to a packed CPU format in its first eval-mode forward without grad.
    That makes results depend on the machine: the conversion crashes when in_features is not a
    multiple of the block size, the fused kernel casts inputs and block scales to bf16 (outputs move
    by up to ~1e-2 on the demo), and the layer stays packed, so a later backward passes no gradient to
    its input (training after the Trainer's first evaluate silently loses the gradients of every
    LoRA layer below). The pipeline therefore always takes the generic 4-bit path, which every CPU
    (and the GPU) computes the same way. Called by the loader and again at the start of generation
    and the eval loss, so a flag set on after loading is neutralised too.

    A layer that is already packed is refused, not restored: its block scales were rounded to bf16,
    and bitsandbytes' own inverse (`_convert_weight_packed_for_cpu_inverse`) is only best effort
    (measured: 0.3% weight error with double quantization, 8% without), so the numbers would not be
    the ones trained and evaluated.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:  # no (working) bitsandbytes: no 4-bit layers either
        return 0
    switched, packed = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            packed.append(name)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            switched += 1
        module.support_avx512bf16_for_cpu = False
    if packed:
        shown = ", ".join(packed[:3]) + (f" and {len(packed) - 3} more" if len(packed) > 3 else "")
        raise PackedCpuLayerError(
            f"4-bit layers {shown} were already converted to bitsandbytes' packed AVX512-BF16 CPU format (an "
            "eval-mode forward ran before the pipeline pinned the CPU path); their block scales are rounded to "
            "bf16 and cannot be restored exactly. Load the model with tasks.modeling.load_base_model (or "
            "load_model), which pins the path before any forward, and use it from there"
        )
    return switched


def local_device(device: str) -> int | str:
    """This process's device: the GPU of its rank under torchrun (LOCAL_RANK), cuda:0 alone, or "cpu".

    Each rank loads its own copy of the 4-bit base on its own GPU; pinning every rank to GPU 0 would
    put all of them on one card.
    """
    if device != "cuda":
        return "cpu"
    import os

    import torch

    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return index


def load_model(source: str, *, revision: str | None, trust_remote_code: bool, load_in_4bit: bool,
               quant_type: str, double_quant: bool, compute_dtype: str, device: str) -> Any:
    """The one place a base model is loaded: quantized by `quantization_config`, CPU path pinned.

    Raises OSError (from transformers) when `source` cannot be loaded; callers turn it into the error
    their users understand.
    """
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=revision,
        trust_remote_code=trust_remote_code,
        quantization_config=quantization_config(quant_type, double_quant, compute_dtype) if load_in_4bit else None,
        dtype=torch_dtype(compute_dtype),
        device_map={"": local_device(device)},
    )
    pin_cpu_4bit_path(model)
    return model


def load_base_model(config: PipelineConfig, plan: TrainingPlan) -> Any:
    """The base model, 4-bit NF4 with double quantization when the plan says so."""
    try:
        model = load_model(
            config.model.name_or_path,
            revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
            load_in_4bit=plan.load_in_4bit,
            quant_type=plan.quant_type,
            double_quant=plan.double_quant,
            compute_dtype=plan.compute_dtype,
            device=plan.device,
        )
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load '{config.model.name_or_path}': {exc}") from exc
    model.config.use_cache = False
    return model


PACKED_SDPA = "packed_sdpa"


def packed_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Attention per packed sequence, for machines without a varlen (flash-attention) kernel.

    DataCollatorWithFlattening puts a whole batch into one row. Without a varlen kernel, transformers
    builds a (tokens x tokens) block-diagonal mask for that row and SDPA computes every score in it, so
    attention costs (sum of lengths)^2 instead of sum(length^2): packing then ran 0.67x the speed of
    padding (bench/RESULTS.md, section 2). This runs causal SDPA on each sequence (found where
    position_ids restart at 0) and concatenates: the same result, at sum(length^2). Anything that is
    not a packed row (padded batches, generation with a KV cache) goes to plain SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    positions = kwargs.get("position_ids")
    starts = [] if positions is None or query.shape[0] != 1 else (positions[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = [*starts, query.shape[2]]
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
            dropout_p=dropout if module.training else 0.0)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> str:
    """Make `packed_sdpa` an attention implementation transformers knows (its masks built as for SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def packing_attention(plan: TrainingPlan) -> str:
    """The attention for padding-free batches: flash-attention's varlen kernel where it can run (it
    imports, an sm80+ GPU, fp16/bf16 compute), else per-sequence SDPA. Both keep packed examples from
    attending to each other."""
    if plan.device == "cuda" and plan.compute_dtype in ("bfloat16", "float16"):
        import torch
        from transformers.utils import is_flash_attn_2_available

        if torch.cuda.get_device_capability() >= (8, 0) and is_flash_attn_2_available():
            return "flash_attention_2"
    return register_packed_sdpa()


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (4-bit layers included, lm_head excluded)."""
    import torch

    output_embedding = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is output_embedding or not name:
            continue
        if isinstance(module, torch.nn.Linear):  # bitsandbytes Linear4bit subclasses nn.Linear
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(config: PipelineConfig, model: Any) -> None:
    """Fail with the model's own module names when the config targets layers it does not have."""
    targets = config.lora.target_modules
    if targets == "all-linear" or targets is None:
        return
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} not found in {config.model.name_or_path}; "
            f"its linear modules are {available} (or use 'all-linear')"
        )


def release_memory() -> None:
    """Return freed model memory to the device once the caller dropped its references.

    Called at the end of each stage so train and evaluate never hold two models on one GPU.
    """
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hash_directory(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "config.json")) -> str:
    """Content hash of a local model folder's weights and config: how a local base is pinned."""
    digest = hashlib.sha256()
    for file in sorted(f for pattern in patterns for f in Path(path).glob(pattern)):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def base_model_reference(config: PipelineConfig) -> dict[str, str]:
    """What registration records so the exact base can be found again at load time."""
    source = config.model.name_or_path
    if Path(source).exists():
        return {"kind": "local", "path": str(Path(source).resolve()), "sha256": hash_directory(Path(source))}
    revision = config.model.revision
    if revision is None:
        try:
            from huggingface_hub import model_info

            revision = model_info(source).sha
        except Exception:  # offline or private: keep the id, say the revision is unpinned
            revision = "unpinned"
    return {"kind": "hub", "id": source, "revision": str(revision)}
