"""GPU capability check: what hardware is there, and the training plan that follows from it.

`detect_devices` looks at the machine (GPUs, and the CPU features that change bitsandbytes' CPU 4-bit
path); `plan_training` is a pure function of that report, the config and the model's shapes, so the
planning rules can be tested with fake reports of any card or CPU.
A plan that cannot fit is refused before any weights are loaded, with the numbers and the options.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from configs.schema import ConfigError, PipelineConfig
from tasks.hardware import CPU_FEATURES, detect_cpu_features, probe_bitsandbytes

GIB = 1024**3
NF4_BITS_PER_PARAM = 4.127  # NF4 + double quantization, QLoRA paper section 3
CPU_MAX_PARAMS = 50_000_000  # beyond this a CPU run takes days, so it is refused, not planned
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
MEMORY_HEADROOM = 0.85  # share of free memory the plan may use; the rest covers fragmentation
AUTO_BATCH_SIZES = (16, 8, 4, 2, 1)
CPU_BATCH_SIZE = 8


class PlanRefused(ConfigError):
    """The run cannot fit this hardware; the message carries the numbers and what to change."""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    total_memory_bytes: int
    free_memory_bytes: int
    compute_capability: tuple[int, int]
    bf16_supported: bool


@dataclass(frozen=True)
class DeviceReport:
    torch_version: str
    cuda_version: str | None
    devices: tuple[DeviceInfo, ...]
    bitsandbytes_version: str | None
    bnb_4bit_ok: bool
    bnb_error: str | None = None
    cpu_count: int = 1
    ram_total_bytes: int = 0
    platform: str = ""
    cpu_features: tuple[str, ...] = ()  # the CPU_FEATURES flags this CPU has
    cpu_capability: str = ""  # torch's CPU kernel level (DEFAULT, AVX2, AVX512, ...)
    bnb_packed_cpu_kernel: bool = False  # bitsandbytes' own AVX512-BF16 detection: it would pack layers

    @property
    def has_avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.cpu_features or self.bnb_packed_cpu_kernel

    @property
    def has_gpu(self) -> bool:
        return bool(self.devices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [
            f"- torch {self.torch_version}, CUDA {self.cuda_version or 'none'}, "
            f"bitsandbytes {self.bitsandbytes_version or 'not installed'} "
            f"(4-bit {'works' if self.bnb_4bit_ok else 'fails: ' + str(self.bnb_error)})",
            f"- CPU cores {self.cpu_count}, RAM {self.ram_total_bytes / GIB:.1f} GiB, {self.platform}",
            "- CPU features: " + ", ".join(f"{label} {'yes' if flag in self.cpu_features else 'no'}"
                                           for flag, label in CPU_FEATURES.items())
            + f" (torch CPU kernels {self.cpu_capability or 'unknown'}; bitsandbytes packed bf16 CPU kernel "
            + f"{'available' if self.bnb_packed_cpu_kernel else 'not available'})",
        ]
        if not self.devices:
            lines.append("- no CUDA device")
        for d in self.devices:
            lines.append(
                f"- cuda:{d.index} {d.name}: {d.total_memory_bytes / GIB:.1f} GiB total, "
                f"{d.free_memory_bytes / GIB:.1f} GiB free, compute capability {d.compute_capability[0]}."
                f"{d.compute_capability[1]}, bf16 {'yes' if d.bf16_supported else 'no'}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class ModelStats:
    """The shapes that decide memory: read from the model config on the meta device, no weights."""

    total_params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    linear_layers: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features)

    @property
    def linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linear_layers)

    def linear_module_names(self) -> list[str]:
        """Distinct leaf names (q_proj, up_proj, ...): what LoRA target_modules refers to."""
        return sorted({name.rsplit(".", 1)[-1] for name, _, _ in self.linear_layers})

    def lora_params(self, rank: int, targets: list[str] | str) -> int:
        chosen = [
            (i, o) for name, i, o in self.linear_layers
            if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets
        ]
        return sum(rank * (i + o) for i, o in chosen)

    @classmethod
    def from_model_config(cls, model_config: Any) -> ModelStats:
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(model_config)
        output_embedding = model.get_output_embeddings()
        linears = tuple(
            (name, module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output_embedding
        )
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        return cls(
            total_params=sum(p.numel() for p in model.parameters()),
            hidden_size=text_config.hidden_size,
            num_layers=text_config.num_hidden_layers,
            num_heads=text_config.num_attention_heads,
            vocab_size=text_config.vocab_size,
            linear_layers=linears,
        )


@dataclass(frozen=True)
class TrainingPlan:
    device: str  # "cuda" or "cpu"
    device_name: str
    load_in_4bit: bool
    quant_type: str
    double_quant: bool
    compute_dtype: str
    per_device_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    optim: str
    estimated_memory_bytes: int
    available_memory_bytes: int
    memory_breakdown: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    world_size: int = 1  # training processes (ranks); per_device_batch_size is per rank
    distributed: str = "none"  # none | ddp | fsdp (training.distributed)
    offload: str = "none"  # none | zero2_cpu (training.offload)

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step over all ranks: what the configured batch means."""
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def launches_ranks(self) -> bool:
        """Training runs in processes started by torchrun (several ranks, or DeepSpeed's launcher env)."""
        return self.world_size > 1 or self.offload != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingPlan:
        """The plan `to_dict()` wrote (train_summary.json's `plan`): JSON made the notes a list."""
        return cls(**{**data, "notes": tuple(data.get("notes") or ())})

    def summary(self) -> str:
        quant = f"{self.quant_type}{'+dq' if self.double_quant else ''} 4-bit" if self.load_in_4bit else "16-bit"
        return (
            f"{self.device}:{self.device_name} {quant} compute={self.compute_dtype} "
            f"batch={self.per_device_batch_size}x{self.gradient_accumulation_steps}"
            + (f"x{self.world_size}ranks({self.distributed}) effective={self.effective_batch_size} "
               if self.world_size > 1 else " ")
            + (f"offload={self.offload} " if self.offload != "none" else "")
            + f"ckpt={'on' if self.gradient_checkpointing else 'off'} "
            f"mem~{self.estimated_memory_bytes / GIB:.2f}/{self.available_memory_bytes / GIB:.1f}GiB"
        )

    def markdown(self) -> str:
        rows = "\n".join(f"| {k} | {v / GIB:.3f} GiB |" for k, v in self.memory_breakdown.items())
        notes = "\n".join(f"- {n}" for n in self.notes)
        return f"**Plan:** `{self.summary()}`\n\n| memory part | estimate |\n|---|---|\n{rows}\n\n{notes}".strip()


def cpu_path_note(report: DeviceReport) -> str:
    """What the plan does about bitsandbytes' machine-dependent CPU 4-bit path (tasks.modeling.pin_cpu_4bit_path)."""
    found = [label for flag, label in CPU_FEATURES.items() if flag in report.cpu_features]
    if report.has_avx512_bf16:
        return (
            f"CPU has {', '.join(found) or 'AVX512-BF16'}: bitsandbytes would switch each 4-bit layer to its "
            "packed AVX512-BF16 kernel in eval mode (bf16-rounded outputs, a crash on input widths that are not a "
            "multiple of the 64-value block, no input gradient afterwards); the pipeline turns that kernel off on "
            "every layer and computes in fp32, so train, evaluate and serve give the same results as on any CPU"
        )
    return (
        "CPU has no AVX512-BF16: bitsandbytes' packed bf16 kernel would not run here; the pipeline turns it "
        "off on every layer anyway and computes in fp32, so results match CPUs that have it"
    )


def detect_devices() -> DeviceReport:
    import os

    import torch

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            devices.append(
                DeviceInfo(
                    index=index,
                    name=props.name,
                    total_memory_bytes=int(total),
                    free_memory_bytes=int(free),
                    compute_capability=(props.major, props.minor),
                    bf16_supported=props.major >= 8,
                )
            )
    bnb_version, bnb_ok, bnb_error = probe_bitsandbytes("cuda" if devices else "cpu")
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    features, capability, bnb_packed = detect_cpu_features()
    return DeviceReport(
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        devices=tuple(devices),
        bitsandbytes_version=bnb_version,
        bnb_4bit_ok=bnb_ok,
        bnb_error=bnb_error,
        cpu_count=os.cpu_count() or 1,
        ram_total_bytes=int(ram),
        platform=platform.platform(),
        cpu_features=features,
        cpu_capability=capability,
        bnb_packed_cpu_kernel=bnb_packed,
    )


def estimate_memory(
    stats: ModelStats,
    *,
    load_in_4bit: bool,
    compute_bytes: int,
    lora_params: int,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    on_gpu: bool,
) -> dict[str, int]:
    """Bytes needed by one training step, by part.

    Activations follow Korthikanti et al. (2022): s*b*h*(34 + 5*a*s/h) bytes per layer in 16 bits,
    or, with checkpointing, one 2-byte hidden state per layer plus one full layer being recomputed.
    The logits are materialised in fp32 for the loss, twice (values and gradient).
    """
    non_linear = stats.total_params - stats.linear_params
    base_linear = stats.linear_params * (NF4_BITS_PER_PARAM / 8 if load_in_4bit else compute_bytes)
    per_layer = seq_len * batch_size * stats.hidden_size * (34 + 5 * stats.num_heads * seq_len / stats.hidden_size)
    per_layer *= compute_bytes / 2
    if gradient_checkpointing:
        activations = stats.num_layers * seq_len * batch_size * stats.hidden_size * compute_bytes + per_layer
    else:
        activations = stats.num_layers * per_layer
    return {
        "base weights": int(base_linear + non_linear * compute_bytes),
        # fp32 adapter weights and gradients, two 8-bit Adam states
        "LoRA weights, grads, optimizer": int(lora_params * (4 + 4 + 2)),
        "activations": int(activations),
        "logits": int(2 * batch_size * seq_len * stats.vocab_size * 4),
        "runtime overhead": CUDA_CONTEXT_BYTES if on_gpu else 0,
    }


def _compute_dtype(config: PipelineConfig, report: DeviceReport) -> str:
    if config.quantization.compute_dtype != "auto":
        return config.quantization.compute_dtype
    if not report.has_gpu:
        return "float32"  # CPU bf16 matmuls are slow or emulated on most CPUs
    return "bfloat16" if report.devices[0].bf16_supported else "float16"


def plan_training(report: DeviceReport, config: PipelineConfig, stats: ModelStats) -> TrainingPlan:
    """The training plan for this hardware, or PlanRefused with the numbers and the options."""
    quant, training = config.quantization, config.training
    on_gpu = report.has_gpu
    notes: list[str] = []
    if quant.load_in_4bit and not report.bnb_4bit_ok:
        raise PlanRefused(
            "QLoRA needs bitsandbytes 4-bit layers, which fail here: "
            f"{report.bnb_error or 'bitsandbytes not installed'}. Fix: `pip install 'bitsandbytes>=0.46'` "
            "(the first release with CPU 4-bit), or set quantization.load_in_4bit=false for plain LoRA."
        )
    if not on_gpu and stats.total_params > CPU_MAX_PARAMS:
        raise PlanRefused(
            f"no CUDA GPU found and the model has {stats.total_params / 1e6:.0f}M parameters; CPU training is "
            f"planned only for tiny models (<= {CPU_MAX_PARAMS / 1e6:.0f}M). Options: run on a GPU machine "
            "(check `nvidia-smi` and that torch was installed with CUDA), or use a smaller model."
        )
    if training.offload == "zero2_cpu" and importlib.util.find_spec("deepspeed") is None:
        raise PlanRefused(
            "training.offload=zero2_cpu runs DeepSpeed ZeRO-2, and deepspeed is not installed. Fix: "
            "`pip install -e '.[offload]'` (or `pip install deepspeed`), or set training.offload=none"
        )
    compute_dtype = _compute_dtype(config, report)
    if compute_dtype == "bfloat16" and on_gpu and not report.devices[0].bf16_supported:
        raise PlanRefused(
            f"quantization.compute_dtype=bfloat16 but {report.devices[0].name} (compute capability "
            f"{report.devices[0].compute_capability}) has no bf16; use 'float16' or 'auto'"
        )
    compute_bytes = 4 if compute_dtype == "float32" else 2
    rank = int(config.lora.r or 16)
    lora_params = stats.lora_params(rank, config.lora.target_modules or "all-linear")
    seq_len = config.data.max_seq_length
    if on_gpu:
        device = report.devices[0]
        available = int(device.free_memory_bytes * MEMORY_HEADROOM)
        device_name = device.name
        if len(report.devices) > 1 and training.distributed == "none":
            notes.append(
                f"{len(report.devices)} GPUs found; this plan uses cuda:0. "
                "Set training.distributed=ddp (or fsdp) to train on all of them."
            )
    else:
        available = int(report.ram_total_bytes * 0.5) if report.ram_total_bytes else 8 * GIB
        device_name = "cpu"
        notes.append("no CUDA GPU: training runs on the CPU through bitsandbytes' CPU 4-bit kernels (demo scale)")
        if quant.load_in_4bit:
            notes.append(cpu_path_note(report))

    def need(batch: int, checkpointing: bool) -> dict[str, int]:
        return estimate_memory(
            stats, load_in_4bit=quant.load_in_4bit, compute_bytes=compute_bytes, lora_params=lora_params,
            batch_size=batch, seq_len=seq_len, gradient_checkpointing=checkpointing, on_gpu=on_gpu,
        )

    checkpoint_options = [training.gradient_checkpointing] if isinstance(training.gradient_checkpointing, bool) \
        else [False, True]
    if training.per_device_batch_size != "auto":
        batch_options: tuple[int, ...] = (int(training.per_device_batch_size),)
    else:
        batch_options = (CPU_BATCH_SIZE,) if not on_gpu else AUTO_BATCH_SIZES
    chosen: tuple[int, bool, dict[str, int]] | None = None
    for batch in batch_options:  # largest batch first; without checkpointing first (it costs ~30% speed)
        for checkpointing in checkpoint_options:
            breakdown = need(batch, checkpointing)
            if sum(breakdown.values()) <= available:
                chosen = (batch, checkpointing, breakdown)
                break
        if chosen:
            break
    if chosen is None:
        smallest = need(batch_options[-1], True)
        raise PlanRefused(
            f"the run does not fit {device_name}: it needs about {sum(smallest.values()) / GIB:.1f} GiB "
            f"(batch {batch_options[-1]}, seq {seq_len}, with gradient checkpointing; "
            + ", ".join(f"{k} {v / GIB:.1f}" for k, v in smallest.items())
            + f") but {available / GIB:.1f} GiB are usable. Options: a smaller training.per_device_batch_size "
            "(raise gradient_accumulation_steps to keep the effective batch), training.gradient_checkpointing=true, "
            "a shorter data.max_seq_length, a lower lora.r, quantization.load_in_4bit=true, or a smaller model."
        )
    batch, checkpointing, breakdown = chosen
    world_size = world_size_for(config, report, notes)
    accumulation = training.gradient_accumulation_steps
    if world_size > 1:
        batch, accumulation = split_effective_batch(batch, accumulation, world_size)
        notes.append(
            f"{world_size} ranks ({training.distributed}, {'nccl' if on_gpu else 'gloo'}): per-rank batch {batch} x "
            f"accumulation {accumulation} x {world_size} ranks keeps the single-process effective batch "
            f"{batch * accumulation * world_size}"
        )
    if training.distributed == "fsdp" and quant.load_in_4bit:
        notes.append(f"FSDP-QLoRA: 4-bit weights stored as {compute_dtype} (bnb_4bit_quant_storage) so FSDP can "
                     "shard them with the other parameters")
    if training.offload == "zero2_cpu":
        notes.append("DeepSpeed ZeRO-2 with the optimizer states offloaded to the CPU (training.offload=zero2_cpu)")
    if training.per_device_batch_size == "auto" and on_gpu:
        notes.append(f"batch size {batch} chosen as the largest of {AUTO_BATCH_SIZES} that fits")
    return TrainingPlan(
        device="cuda" if on_gpu else "cpu",
        device_name=device_name,
        load_in_4bit=quant.load_in_4bit,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
        compute_dtype=compute_dtype,
        per_device_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        gradient_checkpointing=checkpointing,
        optim=training.optim,
        estimated_memory_bytes=sum(breakdown.values()),
        available_memory_bytes=available,
        memory_breakdown=breakdown,
        notes=tuple(notes),
        world_size=world_size,
        distributed=training.distributed if world_size > 1 else "none",
        offload=training.offload,
    )


def world_size_for(config: PipelineConfig, report: DeviceReport, notes: list[str]) -> int:
    """How many ranks train: one per visible GPU for `auto`, the configured number otherwise.

    A CPU machine has no natural rank count, so `auto` there means one process (with a note on how to
    ask for more). More ranks than GPUs is refused: two ranks would share one card's memory.
    """
    training = config.training
    if training.distributed == "none":
        if isinstance(training.num_processes, int) and training.num_processes > 1:
            raise PlanRefused(
                f"training.num_processes={training.num_processes} but training.distributed=none trains in one "
                "process; set training.distributed=ddp (or fsdp) to use several, or num_processes to auto"
            )
        return 1
    gpus = len(report.devices)
    if training.num_processes == "auto":
        if gpus:
            return gpus
        notes.append(f"training.distributed={training.distributed} on a CPU machine with num_processes=auto: one "
                     "process; set training.num_processes to run several CPU ranks (gloo)")
        return 1
    wanted = int(training.num_processes)
    if not gpus and training.distributed == "fsdp" and wanted > 1:
        # accelerate (1.15, AcceleratorState) turns FSDP on only for accelerator devices: CPU ranks would
        # silently run plain DDP (measured here: an adapter bitwise equal to the DDP run's).
        raise PlanRefused(
            "training.distributed=fsdp needs GPUs: on CPU ranks accelerate ignores FSDP and would run plain DDP. "
            "Use training.distributed=ddp on this machine, or run the FSDP config where GPUs are visible"
        )
    if gpus and wanted > gpus:
        raise PlanRefused(
            f"training.num_processes={wanted} but only {gpus} GPU(s) are visible; each rank needs its own GPU. "
            f"Set training.num_processes to at most {gpus} (or auto)"
        )
    return wanted


def split_effective_batch(batch: int, accumulation: int, world_size: int) -> tuple[int, int]:
    """(per-rank batch, accumulation) with per-rank batch x accumulation x world_size equal to the
    single-process effective batch `batch x accumulation`; the largest per-rank batch that divides it.

    Keeping the effective batch keeps the learning-rate schedule and the loss curve of the one-process
    run; PlanRefused when the ranks cannot share it evenly.
    """
    effective = batch * accumulation
    for per_rank in range(batch, 0, -1):
        if effective % (per_rank * world_size) == 0:
            return per_rank, effective // (per_rank * world_size)
    raise PlanRefused(
        f"the effective batch {effective} (training.per_device_batch_size {batch} x gradient_accumulation_steps "
        f"{accumulation}) cannot be split evenly over {world_size} ranks; make it a multiple of {world_size}"
    )


def load_model_stats(config: PipelineConfig) -> ModelStats:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(
            config.model.name_or_path, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
    except OSError as exc:
        raise ConfigError(
            f"model.name_or_path: cannot read a model config from '{config.model.name_or_path}': {exc}. "
            "Use a local folder saved with save_pretrained or a hub id reachable from this machine."
        ) from exc
    return ModelStats.from_model_config(model_config)


def check_gpu(config: PipelineConfig) -> tuple[DeviceReport, TrainingPlan]:
    """Stage 2 of the flow: the device report and the plan, or PlanRefused."""
    report = detect_devices()
    return report, plan_training(report, config, load_model_stats(config))
