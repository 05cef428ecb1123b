"""The capability check: real detection on this machine, planning rules on fake reports of real cards."""

from __future__ import annotations

from dataclasses import replace

import pytest
from transformers import LlamaConfig

from configs.schema import load_config
from tasks.gpu import (
    GIB,
    DeviceInfo,
    DeviceReport,
    ModelStats,
    PlanRefused,
    detect_devices,
    plan_training,
)
from tasks.hardware import cpu_features_from_cpuinfo
from tests.conftest import DEMO_CONFIG


def card(name: str, memory_gib: float, capability: tuple[int, int]) -> DeviceReport:
    device = DeviceInfo(0, name, int(memory_gib * GIB), int(memory_gib * GIB * 0.97), capability, capability[0] >= 8)
    return DeviceReport("2.13.0", "12.8", (device,), "0.50.2", True, cpu_count=16, ram_total_bytes=64 * GIB)


NO_GPU = DeviceReport("2.13.0", None, (), "0.50.2", True, cpu_count=2, ram_total_bytes=24 * GIB)
T4 = card("Tesla T4", 15, (7, 5))
A100 = card("NVIDIA A100-SXM4-40GB", 40, (8, 0))
H100 = card("NVIDIA H100 80GB HBM3", 80, (9, 0))


@pytest.fixture(scope="module")
def llama_7b() -> ModelStats:
    return ModelStats.from_model_config(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                    num_attention_heads=32, vocab_size=32000))


@pytest.fixture(scope="module")
def llama_70b() -> ModelStats:
    return ModelStats.from_model_config(LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256))


def config(*overrides: str):
    return load_config(DEMO_CONFIG, ["data.max_seq_length=2048", "training.per_device_batch_size=auto",
                                     "training.gradient_checkpointing=auto", "lora.r=64", *overrides])


def test_model_stats_match_the_known_7b_shape(llama_7b: ModelStats) -> None:
    assert 6.6e9 < llama_7b.total_params < 6.8e9
    assert llama_7b.linear_module_names() == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                              "v_proj"]


def test_t4_gets_fp16_compute_and_checkpointing(llama_7b: ModelStats) -> None:
    plan = plan_training(T4, config(), llama_7b)
    assert plan.device == "cuda" and plan.load_in_4bit and plan.quant_type == "nf4" and plan.double_quant
    assert plan.compute_dtype == "float16"
    assert plan.gradient_checkpointing
    assert plan.estimated_memory_bytes <= plan.available_memory_bytes
    # 4-bit 7B weights at ~4.127 bits/param: about 3.5 GiB of linear weights
    assert 3.0 * GIB < plan.memory_breakdown["base weights"] < 4.5 * GIB


def test_a100_and_h100_get_bf16_and_bigger_batches(llama_7b: ModelStats) -> None:
    t4, a100, h100 = (plan_training(r, config(), llama_7b) for r in (T4, A100, H100))
    assert a100.compute_dtype == h100.compute_dtype == "bfloat16"
    assert t4.per_device_batch_size <= a100.per_device_batch_size <= h100.per_device_batch_size
    assert h100.per_device_batch_size > t4.per_device_batch_size


def test_explicit_bf16_on_t4_is_refused(llama_7b: ModelStats) -> None:
    with pytest.raises(PlanRefused, match="has no bf16"):
        plan_training(T4, config("quantization.compute_dtype=bfloat16"), llama_7b)


def test_too_big_for_the_card_is_refused_with_numbers_and_options(llama_70b: ModelStats) -> None:
    with pytest.raises(PlanRefused) as excinfo:
        plan_training(T4, config(), llama_70b)
    message = str(excinfo.value)
    assert "GiB" in message and "Tesla T4" in message
    for option in ("per_device_batch_size", "gradient_checkpointing", "max_seq_length", "smaller model"):
        assert option in message


def test_no_gpu_plans_cpu_4bit_for_a_tiny_model_and_refuses_a_7b(llama_7b: ModelStats, demo_assets) -> None:
    from transformers import AutoConfig

    tiny = ModelStats.from_model_config(AutoConfig.from_pretrained(demo_assets.model_dir))
    plan = plan_training(NO_GPU, load_config(DEMO_CONFIG), tiny)
    assert (plan.device, plan.load_in_4bit, plan.compute_dtype) == ("cpu", True, "float32")
    with pytest.raises(PlanRefused, match="no CUDA GPU"):
        plan_training(NO_GPU, config(), llama_7b)


def test_broken_bitsandbytes_is_refused_unless_4bit_is_off(llama_7b: ModelStats) -> None:
    broken = DeviceReport("2.13.0", "12.8", A100.devices, None, False, "ImportError: no libbitsandbytes")
    with pytest.raises(PlanRefused, match="load_in_4bit=false"):
        plan_training(broken, config(), llama_7b)
    plan = plan_training(broken, config("quantization.load_in_4bit=false"), llama_7b)
    assert not plan.load_in_4bit
    assert plan.memory_breakdown["base weights"] > 12 * GIB  # 16-bit 7B


def test_real_detection_on_this_machine() -> None:
    report = detect_devices()
    assert report.torch_version
    assert report.bnb_4bit_ok, report.bnb_error  # CPU 4-bit is what the demo and tests rely on
    assert "4-bit works" in report.markdown()


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_features_come_from_the_cpuinfo_flags() -> None:
    assert cpu_features_from_cpuinfo(CPUINFO) == ("avx512_bf16", "amx_bf16", "amx_tile")
    assert cpu_features_from_cpuinfo(CPUINFO.replace(" avx512_bf16 amx_bf16 amx_tile", "")) == ()
    assert cpu_features_from_cpuinfo("") == ()


def test_the_cpu_plan_says_what_it_does_about_avx512_bf16(demo_assets) -> None:
    from transformers import AutoConfig

    tiny = ModelStats.from_model_config(AutoConfig.from_pretrained(demo_assets.model_dir))
    with_bf16 = replace(NO_GPU, cpu_features=("avx512_bf16", "amx_bf16"), cpu_capability="AVX512",
                        bnb_packed_cpu_kernel=True)
    notes = " ".join(plan_training(with_bf16, load_config(DEMO_CONFIG), tiny).notes)
    assert "CPU has AVX512-BF16, AMX-BF16" in notes and "turns that kernel off on every layer" in notes
    assert "AVX512-BF16 yes, AMX-BF16 yes" in with_bf16.markdown() and "packed bf16 CPU kernel available" in \
        with_bf16.markdown()

    without = " ".join(plan_training(NO_GPU, load_config(DEMO_CONFIG), tiny).notes)
    assert "CPU has no AVX512-BF16" in without and "turns it off on every layer anyway" in without
    assert "AVX512-BF16 no" in NO_GPU.markdown()
    # bitsandbytes' own detection counts even where /proc/cpuinfo could not be read
    assert replace(NO_GPU, bnb_packed_cpu_kernel=True).has_avx512_bf16
    # a GPU plan computes on the GPU: the CPU kernel is not its concern
    assert not any("AVX512" in note for note in plan_training(A100, config(), tiny).notes)


def test_real_cpu_feature_detection_agrees_with_bitsandbytes() -> None:
    import bitsandbytes.functional

    report = detect_devices()
    assert report.cpu_capability  # torch always knows its CPU kernel level
    assert report.bnb_packed_cpu_kernel == bool(bitsandbytes.functional.has_avx512bf16())
    if report.bnb_packed_cpu_kernel:
        assert "avx512_bf16" in report.cpu_features
    assert "CPU features: AVX512-BF16" in report.markdown()
