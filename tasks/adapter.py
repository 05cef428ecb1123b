"""The adapter folder: what training writes, registration uploads, and evaluation and serving load.

`<training.output_dir>/adapter` holds a LoRA adapter in standard peft format (adapter config and
weights), the tokenizer it was trained with (left padding, as generation wants), the resolved pipeline
config and the training summary, which records the folder's content hash. This module owns that
contract, so training, evaluation, registration and serving read one definition of it:
- the file names;
- writing it crash-safe: a staging folder swapped in with one rename;
- its content hash, and the check that a folder is still what its training wrote;
- reading it and checking it against a base model (peft type, target modules, weight shapes);
- the one same-base rule (`same_base`): same id, same folder, or identical content;
- starting training from an existing adapter's weights (`InitAdapter`, `load_init_weights`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from configs.schema import ConfigError, PipelineConfig
from tasks.modeling import hash_directory, linear_module_names

logger = logging.getLogger(__name__)

ADAPTER_DIRNAME = "adapter"
# peft's own names (peft.utils.constants CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME); spelled
# out so reading a folder's names does not import peft (and torch), and a test keeps them equal.
ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS = (SAFETENSORS_WEIGHTS, "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
SUMMARY_FILE = "train_summary.json"  # training's summary, with the folder's content hash
CONFIG_FILE = "pipeline_config.yaml"  # the resolved config the adapter was trained with


class AdapterFilesMissing(ConfigError):
    """The adapter folder is missing or lacks the peft/tokenizer files a version needs."""


class AdapterChanged(ConfigError):
    """The adapter folder's content is not what its training wrote (changed, or replaced by another run)."""


def adapter_dir_for(config: PipelineConfig) -> Path:
    return Path(config.training.output_dir) / ADAPTER_DIRNAME


# --------------------------------------------------------------------------------------------------
# Writing, and proving a folder is what was written


def adapter_content_hash(adapter_dir: str | Path) -> str:
    """SHA-256 over every file of an adapter folder (relative name and content), except the training
    summary, which records this hash. Weights, adapter config, tokenizer and resolved config all count:
    any of them changing changes what a registered version would serve."""
    folder = Path(adapter_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMMARY_FILE):
        content = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                content.update(chunk)
        digest.update(f"{path.relative_to(folder).as_posix()}\0{content.hexdigest()}\n".encode())
    return digest.hexdigest()


def write_adapter(model: Any, tokenizer: Any, config: PipelineConfig, summary: dict[str, Any], target: Path) -> str:
    """Write to a sibling temp dir, then swap it in: readers see the old adapter or the new, never half.

    The content hash is taken of the finished files and written into the summary as `adapter_sha256`;
    it is returned so the caller's own record of the summary can carry it too.
    """
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(staging))
    (staging / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    content_hash = adapter_content_hash(staging)
    (staging / SUMMARY_FILE).write_text(json.dumps({**summary, "adapter_sha256": content_hash}, indent=2))
    previous = target.with_name(f".{target.name}.previous-{os.getpid()}")
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return content_hash


def read_train_summary(adapter_dir: Path) -> dict[str, Any]:
    """The folder's training summary; empty when it has none or it cannot be read (lineage then says
    "unknown" rather than failing registration)."""
    try:
        summary = json.loads((adapter_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def read_training_config(adapter_dir: Path) -> dict[str, Any]:
    """The resolved pipeline config the adapter was trained with; empty when the folder has none."""
    recorded = adapter_dir / CONFIG_FILE
    if not recorded.exists():
        return {}
    return yaml.safe_load(recorded.read_text()) or {}


def verify_adapter_content(adapter_dir: Path, expected_sha256: str | None) -> str:
    """The adapter's content hash, after checking it against what its training recorded.

    `expected_sha256` is the hash the training of this pipeline run took (the flow passes it from its
    own TrainResult, so an adapter swapped in by another run is caught even with its own summary);
    without it, the hash in the folder's `train_summary.json` is the reference. A mismatch raises
    AdapterChanged and nothing is registered.
    """
    actual = adapter_content_hash(adapter_dir)
    source = "this pipeline run's training"
    if not expected_sha256:
        expected_sha256 = read_train_summary(adapter_dir).get("adapter_sha256") or None
        source = f"its training ({adapter_dir / SUMMARY_FILE})"
    if expected_sha256 is None:
        logger.warning("%s records no content hash (trained before hashes were recorded); registering it "
                       "unverified with adapter_sha256=%s", adapter_dir, actual)
    elif actual != expected_sha256:
        raise AdapterChanged(
            f"the adapter in {adapter_dir} is not the one {source} wrote: content hash {actual[:16]}... "
            f"!= recorded {expected_sha256[:16]}...; its files changed after training (by hand, or by another "
            "run in the same training.output_dir). Nothing was registered: retrain (qlora train) and register "
            "the new adapter."
        )
    return actual


# --------------------------------------------------------------------------------------------------
# Reading and checking


def check_adapter_dir(adapter_dir: Path) -> None:
    """The folder holds a complete peft adapter with its tokenizer (what a registered version needs)."""
    if not adapter_dir.is_dir():
        raise AdapterFilesMissing(f"adapter folder {adapter_dir} does not exist; train first (qlora train)")
    names = {p.name for p in adapter_dir.iterdir()}
    missing = []
    if ADAPTER_CONFIG not in names:
        missing.append(ADAPTER_CONFIG)
    if not names & set(ADAPTER_WEIGHTS):
        missing.append(" or ".join(ADAPTER_WEIGHTS))
    if not names & set(TOKENIZER_FILES):
        missing.append("tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")")
    if missing:
        raise AdapterFilesMissing(
            f"adapter folder {adapter_dir} lacks {', '.join(missing)}; it is not a complete peft adapter "
            "with its tokenizer (tasks.train writes both)"
        )


def is_adapter_dir(path: Path) -> bool:
    """Does the folder hold a peft adapter config (a cheap test before a full check)?"""
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | Path, option: str = "--adapter") -> dict[str, Any]:
    """adapter_config.json of a peft adapter folder; ConfigError naming the option when it is not one."""
    text = str(adapter_dir)
    if text.startswith("models:/"):
        raise ConfigError(f"{option} {text}: a registry URI; download the adapter first and pass its folder")
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError(f"{option} {adapter_dir}: no {ADAPTER_CONFIG} there; pass a folder written by `qlora train` "
                          "(<training.output_dir>/adapter) or by peft's save_pretrained")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} {adapter_dir}: {ADAPTER_CONFIG} is not valid JSON: {exc}") from exc


def same_base(recorded: str, configured: str, recorded_sha256: str | None = None) -> bool:
    """The one same-base rule: is the base an adapter was trained on the configured base?

    Yes for the same id (or path as written), the same folder however it is spelled, or another folder
    with identical content (a copy; `tasks.modeling.hash_directory` of weights and config). When the
    base's content hash was recorded (a registered version's base reference), the content alone
    decides: the recorded folder may be gone or changed since.
    """
    configured_path = Path(configured)
    if recorded_sha256:
        return configured_path.is_dir() and hash_directory(configured_path) == recorded_sha256
    if recorded == configured:
        return True
    recorded_path = Path(recorded)
    if not (recorded_path.is_dir() and configured_path.is_dir()):
        return False
    if recorded_path.resolve() == configured_path.resolve():
        return True
    return hash_directory(recorded_path) == hash_directory(configured_path)


def check_adapter_base(adapter_config: dict[str, Any], config: PipelineConfig, adapter_dir: str | Path,
                       option: str = "--adapter") -> None:
    """The adapter is a LoRA adapter trained on the configured base (`same_base`)."""
    if adapter_config.get("peft_type") not in (None, "LORA"):
        raise ConfigError(f"{option} {adapter_dir}: peft_type {adapter_config.get('peft_type')!r}; "
                          "evaluation loads LoRA adapters only")
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded and not same_base(str(recorded), config.model.name_or_path):
        raise ConfigError(
            f"{option} {adapter_dir} was trained on base '{recorded}' but model.name_or_path is "
            f"'{config.model.name_or_path}'; evaluate it with the base it was trained on "
            f"(--set model.name_or_path={recorded})"
        )


def check_adapter_modules(model: Any, adapter_config: dict[str, Any], adapter_dir: str | Path,
                          option: str = "--adapter") -> None:
    """Every module the adapter targets exists in the base, with the shapes the adapter was trained on."""
    targets = adapter_config.get("target_modules")
    module_names = [name for name, _ in model.named_modules() if name]
    available = linear_module_names(model)
    if isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, name) for name in module_names):
            raise ConfigError(f"{option} {adapter_dir}: target_modules pattern {targets!r} matches no module of "
                              f"{model.config.name_or_path}; its linear modules are {available}")
    elif isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in module_names)]
        if missing:
            raise ConfigError(
                f"{option} {adapter_dir} does not fit base {model.config.name_or_path}: target modules {missing} "
                f"not found in the base (architecture {model.config.model_type}); its linear modules are {available}"
            )
    weights = Path(adapter_dir) / SAFETENSORS_WEIGHTS
    if weights.is_file():
        _check_adapter_shapes(model, weights, adapter_dir, option)


def _check_adapter_shapes(model: Any, weights: Path, adapter_dir: str | Path, option: str) -> None:
    from safetensors import safe_open

    problems: list[str] = []
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if not match:
                continue
            path, part = match.groups()
            try:
                module = model.get_submodule(path)
            except AttributeError:
                problems.append(f"{path} (no such module in the base)")
                continue
            shape = handle.get_slice(key).get_shape()
            in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if part == "A" and in_features is not None and shape[1] != in_features:
                problems.append(f"{path} (adapter input size {shape[1]}, base {in_features})")
            if part == "B" and out_features is not None and shape[0] != out_features:
                problems.append(f"{path} (adapter output size {shape[0]}, base {out_features})")
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(f"{option} {adapter_dir} does not fit base {model.config.name_or_path} "
                          f"(different architecture?): {shown}")


# --------------------------------------------------------------------------------------------------
# Starting from an existing adapter (training.init_adapter)

INIT_OPTION = "training.init_adapter"


@dataclass(frozen=True)
class InitAdapter:
    """The adapter a training run starts from, resolved to a local folder (`tasks.registry.resolve_init_adapter`).

    `adapter_sha256` (`adapter_content_hash`) is what the setup hash and the lineage record: an alias
    that moved to another version, or a folder whose files changed, is another starting point.
    """

    source: str  # as configured: a folder, or models:/<name>@<alias> / models:/<name>/<version>
    path: Path  # the local folder holding its weights
    version: str | None  # the registry version a models:/ URI resolved to; None for a folder
    adapter_sha256: str
    base: str  # the base it was trained on, as recorded (adapter_config.json, or the version's base_model tag)
    same_base: bool  # that base is model.name_or_path (`same_base`, or `tasks.registry.recorded_base_fits`)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": str(self.path), "version": self.version,
                "adapter_sha256": self.adapter_sha256, "base": self.base}


def _lora_modules(keys: Any) -> set[str]:
    """Leaf names of the modules that LoRA weights (peft state-dict keys) belong to: `q_proj`, ..."""
    return {match.group(1) for key in keys if (match := re.search(r"\.([^.]+)\.lora_[AB]\.", key))}


def load_init_weights(model: Any, init: InitAdapter, config: PipelineConfig) -> None:
    """Put the init adapter's LoRA weights into the freshly built peft `model`, after checking they fit.

    The LoRA is built from the config (`tasks.train.build_lora_model`), so rank, alpha, dropout and
    targets are the config's; the adapter must have the same shape: its rank, the modules it targets
    (compared as resolved module sets, so `all-linear` matches the explicit list peft stores) and its
    base. Any difference is refused with a ConfigError naming each field; weights are loaded with peft
    (`load_peft_weights`, `set_peft_model_state_dict`), never copied by hand.
    """
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    adapter_config = read_adapter_config(init.path, INIT_OPTION)
    weights = load_peft_weights(str(init.path), device="cpu")
    fresh = get_peft_model_state_dict(model)
    problems = []
    if adapter_config.get("r") != config.lora.r:
        problems.append(f"rank: adapter {adapter_config.get('r')}, config {config.lora.r} (lora.r)")
    theirs, ours = _lora_modules(weights), _lora_modules(fresh)
    if theirs != ours:
        problems.append(f"target modules: adapter {sorted(theirs)}, config {sorted(ours)} "
                        f"(lora.target_modules={json.dumps(config.lora.target_modules)})")
    if not init.same_base:
        problems.append(f"base: adapter '{init.base}', config '{config.model.name_or_path}' (model.name_or_path)")
    if not problems:
        differing = sorted(key for key in set(weights) | set(fresh) if key not in weights or key not in fresh
                           or tuple(weights[key].shape) != tuple(fresh[key].shape))
        if differing:
            problems.append(f"LoRA weights: {len(differing)} differ in name or shape, e.g. {differing[0]}")
    if problems:
        raise ConfigError(
            f"{INIT_OPTION} {init.source}: the adapter does not fit the configured LoRA: {'; '.join(problems)}. "
            f"Set these keys to the adapter's (its {ADAPTER_CONFIG} in {init.path}), or remove {INIT_OPTION} to "
            "start from a fresh LoRA"
        )
    alpha = adapter_config.get("lora_alpha")
    if alpha is not None and alpha != config.lora.alpha:
        logger.warning("%s %s was trained with lora_alpha %s, the config has %s: its update starts scaled by %.3g",
                       INIT_OPTION, init.source, alpha, config.lora.alpha, config.lora.alpha / alpha)
    loaded = set_peft_model_state_dict(model, weights)
    if loaded.unexpected_keys:  # cannot happen after the check above; peft would silently skip them
        raise ConfigError(f"{INIT_OPTION} {init.source}: peft did not load {sorted(loaded.unexpected_keys)[:3]}")
