"""Stage 5: the adapter becomes a model version in the MLflow registry, promoted only when it wins.

Order of work, chosen so that a failure at any point leaves nothing half-done:
1. check the adapter files and reach the tracking server (an unreachable server fails here, with
   nothing written anywhere; the adapter files are only ever read);
2. find the current champion and decide promotion (`decide_promotion`, a pure function);
3. log the pyfunc model into the pipeline run, then create the version with all lineage tags and the
   model card in one call;
4. move the aliases, once, last: `challenger` always, `champion` only when promoted. If anything
   after the version's creation fails, the version is deleted again and a moved alias put back, so no
   half-registered version and no alias on one remains.

Promotion rule: the adapter must beat the base on `registry.primary_metric` with the paired bootstrap
saying significant, and no guard metric may drop by more than its tolerance (points) against the base.
When a champion exists it must also beat the champion the same way, using the evaluation's
`adapter_vs_champion` comparison; an evaluation that did not compare against the champion cannot
promote. If the champion alias moved while this version was being registered, the decision is stale
and the version stays challenger.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import configs
import tasks
from configs.paths import source_checkout
from configs.schema import ConfigError, PipelineConfig, RegistryConfig
from tasks.formatting import format_p_value
from tasks.tracking import (
    PipelineTracker,
    TrackingServerUnreachable,
    apply_http_settings,
    client_for,
    library_versions,
    quiet_artifact_transfers,
    resolve_tracking_uri,
    using_tracking_uri,
)

if TYPE_CHECKING:
    from tasks.evaluate import EvalReport
    from tasks.gpu import TrainingPlan
    from tasks.validate_result import ValidationResult

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "adapter-model"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
EXAMPLE_PROMPT = "Rewrite this in Zorbish.\n\nthe red cat runs"
MAX_TAG_VALUE = 5000
PIP_PACKAGES = ("mlflow", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers",
                "pydantic", "pyyaml", "pandas")


class AdapterFilesMissing(ConfigError):
    """The adapter folder is missing or lacks the peft/tokenizer files a version needs."""


class AdapterChanged(ConfigError):
    """The adapter folder's content is not what its training wrote (changed, or replaced by another run)."""


class ModelNotLoadable(ConfigError):
    """A model URI that does not resolve to a loadable registered model (wrong name, version or alias)."""


@dataclass
class PromotionDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegistrationResult:
    name: str
    version: str
    aliases: list[str]
    promoted: bool
    decision: dict[str, Any]
    run_id: str
    model_uri: str


# --------------------------------------------------------------------------------------------------
# The promotion rule (pure)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _significant(comparison: dict[str, Any], level: float) -> bool:
    if "significant" in comparison and comparison["significant"] is not None:
        return bool(comparison["significant"])
    p_value = _finite(comparison.get("p_value"))
    return p_value is not None and p_value < level


def _beats(label: str, comparison: dict[str, Any] | None, metric: str, level: float,
           numbers: dict[str, Any], reasons: list[str]) -> bool:
    """Does the adapter beat `label` on `metric`, significantly? Records the numbers and the why."""
    if not comparison:
        reasons.append(f"the evaluation has no paired comparison adapter vs {label} on {metric}; cannot promote")
        return False
    delta = _finite(comparison.get("delta"))
    p_value = _finite(comparison.get("p_value"))
    numbers[f"{metric}_delta_vs_{label}"] = delta
    numbers[f"{metric}_p_value_vs_{label}"] = p_value
    for bound in ("ci_low", "ci_high"):
        numbers[f"{metric}_{bound}_vs_{label}"] = _finite(comparison.get(bound))
    significant = _significant(comparison, level)
    if delta is None:
        reasons.append(f"{metric} delta vs {label} is missing or not a number; cannot promote")
        return False
    if delta <= 0:
        reasons.append(f"{metric} does not beat {label}: {delta:+.2f} points")
        return False
    if not significant:
        reasons.append(f"{metric} gain over {label} ({delta:+.2f} points) is not significant "
                       f"(p={format_p_value(p_value)}, level {level})")
        return False
    reasons.append(f"{metric} beats {label} by {delta:+.2f} points (p={format_p_value(p_value)}, "
                   f"significant at {level})")
    return True


def _guards_hold(label: str, adapter: dict[str, Any], other: dict[str, Any] | None,
                 comparisons: dict[str, Any], guards: dict[str, float], numbers: dict[str, Any],
                 reasons: list[str]) -> bool:
    """No guard metric below `label` by more than its tolerance (a missing score fails the guard)."""
    ok = True
    for metric, tolerance in guards.items():
        delta = None
        if other is not None and _finite(adapter.get(metric)) is not None and _finite(other.get(metric)) is not None:
            delta = float(adapter[metric]) - float(other[metric])
        elif isinstance(comparisons.get(metric), dict):
            delta = _finite(comparisons[metric].get("delta"))
        numbers[f"guard_{metric}_delta_vs_{label}"] = delta
        if delta is None:
            reasons.append(f"guard {metric}: no score for adapter vs {label}; cannot promote")
            ok = False
        elif delta < -tolerance:
            reasons.append(f"guard {metric} drops {-delta:.2f} points vs {label} (tolerance {tolerance})")
            ok = False
    return ok


def compared_champion_version(eval_report: dict[str, Any]) -> str | None:
    """Which registered version the evaluation compared against, when its champion path says so:
    `<...>/<name>-v<N>` (resolve_champion_adapter's download folder) or `models:/<name>/<N>`."""
    source = str(eval_report.get("champion_adapter") or "")
    match = re.search(r"-v(\d+)/?$", source) or re.match(r"^models:/[^/@]+/(\d+)/?$", source)
    return match.group(1) if match else None


def decide_promotion(eval_report: dict[str, Any], registry_config: RegistryConfig,
                     has_champion: bool, champion_version: str | None = None) -> PromotionDecision:
    """Promote when the adapter significantly beats base (and the champion, if one exists) on the
    primary metric and no guard metric drops by more than its tolerance. Pure: numbers in, verdict out.

    `champion_version`, when given, is the version holding the champion alias now; an evaluation that
    provably compared against another version is stale and cannot promote."""
    primary = registry_config.primary_metric
    guards = dict(registry_config.guard_metrics)
    level = _finite(eval_report.get("significance_level"))
    level = 0.05 if level is None else level
    systems = eval_report.get("systems") or {}
    comparisons = eval_report.get("comparisons") or {}
    adapter, base, champion = systems.get("adapter"), systems.get("base"), systems.get("champion")
    numbers: dict[str, Any] = {"primary_metric": primary, "significance_level": level, "has_champion": has_champion}
    reasons: list[str] = []
    if not adapter or not base:
        return PromotionDecision(False, ["the evaluation report has no base and adapter scores; cannot promote"],
                                 numbers)
    for label, scores in (("base", base), ("adapter", adapter), ("champion", champion)):
        if scores:
            numbers[f"{primary}_{label}"] = _finite(scores.get(primary))

    vs_base = comparisons.get("adapter_vs_base") or {}
    ok = _beats("base", vs_base.get(primary), primary, level, numbers, reasons)
    ok = _guards_hold("base", adapter, base, vs_base, guards, numbers, reasons) and ok
    if has_champion:
        vs_champion = comparisons.get("adapter_vs_champion")
        if not vs_champion:
            reasons.append("a champion exists but the evaluation did not compare against it; not promoted "
                           "(evaluate with the champion adapter, which the flow does by default)")
            ok = False
        else:
            ok = _beats("champion", vs_champion.get(primary), primary, level, numbers, reasons) and ok
            ok = _guards_hold("champion", adapter, champion, vs_champion, guards, numbers, reasons) and ok
            compared = compared_champion_version(eval_report)
            if champion_version is not None and compared is not None and compared != str(champion_version):
                reasons.append(f"the evaluation compared against version {compared}, but the champion is now "
                               f"version {champion_version}; not promoted (evaluate against the current champion)")
                ok = False
    else:
        reasons.append("no champion yet: the first promotion needs only to beat the base")
    return PromotionDecision(ok, reasons, numbers)


# --------------------------------------------------------------------------------------------------
# Lineage


def check_adapter_dir(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise AdapterFilesMissing(f"adapter folder {adapter_dir} does not exist; train first (qlora train)")
    names = {p.name for p in adapter_dir.iterdir()}
    missing = []
    if "adapter_config.json" not in names:
        missing.append("adapter_config.json")
    if not names & set(ADAPTER_WEIGHTS):
        missing.append(" or ".join(ADAPTER_WEIGHTS))
    if not names & set(TOKENIZER_FILES):
        missing.append("tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")")
    if missing:
        raise AdapterFilesMissing(
            f"adapter folder {adapter_dir} lacks {', '.join(missing)}; it is not a complete peft adapter "
            "with its tokenizer (tasks.train writes both)"
        )


def git_commit() -> tuple[str, str]:
    """(commit of the source checkout the running code comes from, "true"/"false" for uncommitted changes).

    Both are "unknown" for an installed package (no checkout: the working directory's repository, if
    any, is not the code that ran) or when git cannot answer; lineage never fails registration.
    """
    checkout = source_checkout()
    if checkout is None:
        return "unknown", "unknown"
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never touch the index
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True,
                                timeout=10, env=env, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                                capture_output=True, text=True, timeout=10, env=env, check=True).stdout
        dirty = "true" if status.strip() else "false"
    except (OSError, subprocess.SubprocessError):
        dirty = "unknown"
    return commit or "unknown", dirty


def dataset_fingerprint(validation: ValidationResult | None, eval_report: EvalReport) -> str:
    """The data's fingerprint as the contract saw it, else as evaluation saw it (the same function of
    the same splits); the data is never read again here, so registration does not depend on it."""
    return (validation.fingerprint if validation else "") or eval_report.dataset_fingerprint or "unknown"


def plan_summary(plan: TrainingPlan | None, adapter_dir: Path) -> str:
    """The plan's one-line summary; without one, the plan the adapter's training recorded."""
    from tasks.gpu import TrainingPlan
    from tasks.train import SUMMARY_FILE

    if plan is not None:
        return plan.summary()
    summary_file = adapter_dir / SUMMARY_FILE
    recorded = json.loads(summary_file.read_text()).get("plan") if summary_file.exists() else None
    if not recorded:
        return "unknown"
    try:
        return TrainingPlan.from_dict(recorded).summary()
    except TypeError:  # written by another version of the plan
        return json.dumps(recorded, sort_keys=True, default=str)


def base_reference(config: PipelineConfig, adapter_dir: Path) -> dict[str, Any]:
    """What the model needs to find its base again, plus how it was quantized and generation defaults."""
    from tasks.modeling import base_model_reference
    from tasks.train import CONFIG_FILE

    recorded = adapter_dir / CONFIG_FILE
    if recorded.exists():
        trained_with = (yaml.safe_load(recorded.read_text()) or {}).get("model", {}).get("name_or_path")
        now = config.model.name_or_path
        same = trained_with == now or (Path(str(trained_with)).exists() and Path(now).exists()
                                       and Path(str(trained_with)).resolve() == Path(now).resolve())
        if trained_with and not same:
            raise ConfigError(
                f"model.name_or_path: the adapter in {adapter_dir} was trained on '{trained_with}' but the config "
                f"says '{now}'; register with the config it was trained with"
            )
    reference: dict[str, Any] = dict(base_model_reference(config))
    quantization = config.quantization
    reference["quantization"] = {"load_in_4bit": quantization.load_in_4bit, "quant_type": quantization.quant_type,
                                 "double_quant": quantization.double_quant}
    reference["trust_remote_code"] = config.model.trust_remote_code
    reference["max_new_tokens"] = config.evaluation.max_new_tokens
    return reference


def base_label(reference: dict[str, Any]) -> str:
    if reference.get("kind") == "local":
        return f"{reference['path']}@sha256:{reference['sha256']}"
    return f"{reference.get('id')}@{reference.get('revision')}"


def _fmt(value: Any) -> str:
    number = _finite(value)
    return f"{number:.2f}" if number is not None else "n/a"


def lineage_tags(config: PipelineConfig, adapter_dir: Path, eval_report: EvalReport,
                 validation: ValidationResult | None, plan: TrainingPlan | None, reference: dict[str, Any],
                 decision: PromotionDecision, run_id: str) -> dict[str, str]:
    commit, dirty = git_commit()
    tags: dict[str, Any] = {
        "base_model": base_label(reference),
        "base_model_reference": json.dumps(reference, sort_keys=True),
        "dataset_fingerprint": dataset_fingerprint(validation, eval_report),
        "dataset_path": config.data.path,
        "validation_success": "unknown" if validation is None else str(bool(validation.success)).lower(),
        "gpu_plan": plan_summary(plan, adapter_dir),
        "git_commit": commit,
        "git_dirty": dirty,
        "config_hash": config.config_hash(),
        "lora": f"r={config.lora.r} alpha={config.lora.alpha} dropout={config.lora.dropout} "
                f"targets={json.dumps(config.lora.target_modules)}",
        "pipeline_run_id": run_id,
        "eval.n_samples": eval_report.n_samples,
        "eval.bleu_signature": eval_report.bleu_signature,
        "decision": "promote" if decision.promote else "keep challenger",
        "decision.reasons": "\n".join(decision.reasons),
    }
    tags.update({f"lib.{name}": version for name, version in library_versions().items()})
    for system, scores in eval_report.systems.items():
        for metric, value in (scores or {}).items():
            if _finite(value) is not None:
                tags[f"metric.{system}.{metric}"] = f"{float(value):.4f}"
    for key, value in decision.numbers.items():
        tags[f"decision.{key}"] = value if not isinstance(value, float) else f"{value:.6g}"
    return {key: str(value)[:MAX_TAG_VALUE] for key, value in tags.items()}


def model_card(config: PipelineConfig, reference: dict[str, Any], tags: dict[str, str],
               eval_report: dict[str, Any], decision: PromotionDecision, adapter_dir: Path) -> str:
    """A short markdown model card: base, data, LoRA settings, metrics vs base (and champion), verdict."""
    from tasks.train import SUMMARY_FILE

    registry = config.registry
    systems = eval_report.get("systems") or {}
    names = [s for s in ("base", "adapter", "champion") if systems.get(s)]
    metrics = [m for m in ("bleu", "rouge1", "rouge2", "rougeL", "eval_loss")
               if any(_finite(systems[s].get(m)) is not None for s in names)]
    header = "| metric | " + " | ".join(names) + " | adapter − base |"
    rows = [header, "|---" * (len(names) + 2) + "|"]
    for metric in metrics:
        values = [_fmt(systems[s].get(metric)) for s in names]
        delta = "n/a"
        if _finite(systems["adapter"].get(metric)) is not None and _finite(systems["base"].get(metric)) is not None:
            delta = f"{systems['adapter'][metric] - systems['base'][metric]:+.2f}"
        rows.append(f"| {metric} | " + " | ".join(values) + f" | {delta} |")
    training = ""
    if (adapter_dir / SUMMARY_FILE).exists():
        summary = json.loads((adapter_dir / SUMMARY_FILE).read_text())
        training = (f"- **Training:** {summary.get('global_step')} steps, eval loss "
                    f"{_fmt(summary.get('eval_loss_before'))} → {_fmt(summary.get('eval_loss_after'))}, "
                    f"{tags['gpu_plan']}\n")
    quant = reference.get("quantization", {})
    verdict = "promoted to **champion**" if decision.promote else "**challenger** only (not promoted)"
    reasons = "\n".join(f"  - {r}" for r in decision.reasons)
    return (
        f"### QLoRA adapter for `{tags['base_model'].split('@')[0]}`\n\n"
        f"- **Base:** `{tags['base_model']}` (not copied; loaded from this reference at load time)\n"
        f"- **Data:** `{config.data.path}` ({config.data.format}), fingerprint `{tags['dataset_fingerprint']}`, "
        f"validation passed: {tags['validation_success']}\n"
        f"- **LoRA:** {tags['lora']}; base in "
        f"{'4-bit ' + str(quant.get('quant_type')) if quant.get('load_in_4bit') else '16-bit'}"
        f"{' + double quant' if quant.get('load_in_4bit') and quant.get('double_quant') else ''}\n"
        f"{training}"
        f"- **Code:** git `{tags['git_commit'][:12]}`, config hash `{tags['config_hash']}`\n\n"
        f"Evaluation on {eval_report.get('n_samples', '?')} held-out rows (points, 0-100):\n\n"
        + "\n".join(rows)
        + f"\n\n**Decision:** {verdict} on `{registry.primary_metric}`\n{reasons}\n\n"
        f"Load: `mlflow.pyfunc.load_model(\"models:/{registry.model_name}@{registry.champion_alias}\")"
        ".predict([\"prompt\"])`\n"
    )


# --------------------------------------------------------------------------------------------------
# Registry access


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def check_reachable(client: Any, uri: str, adapter_dir: Path | None = None) -> None:
    """One cheap registry call; any transport failure becomes TrackingServerUnreachable (retryable)."""
    from mlflow.exceptions import MlflowException

    try:
        client.search_registered_models(max_results=1)
    except MlflowException as exc:
        if _error_code(exc) in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise
        kept = f"; the adapter at {adapter_dir} is kept" if adapter_dir else ""
        raise TrackingServerUnreachable(
            f"cannot reach the MLflow tracking server at {uri}: {str(exc).splitlines()[0][:300]}. Nothing was "
            f"registered{kept}. Start the server (make mlflow-ui) or fix registry.tracking_uri, then retry."
        ) from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise TrackingServerUnreachable(f"cannot reach the MLflow tracking server at {uri}: {exc}") from exc


def current_champion(client: Any, registry: RegistryConfig) -> Any | None:
    """The model version holding the champion alias, or None (no registered model or no alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(registry.model_name, registry.champion_alias)
    except MlflowException as exc:
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name, description="QLoRA adapters from qlora-pipeline. Aliases: `champion` serves, `challenger` is the "
                              "newest registered version. Each version's description is its model card.")
    except MlflowException as exc:  # created by a concurrent registration in between
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise


def pip_requirements() -> list[str]:
    from importlib import metadata

    out = []
    for name in PIP_PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


MODEL_CODE = '''"""MLflow "model from code" entry point of a qlora-pipeline adapter version (written at registration).

The model itself is tasks.pyfunc_model.AdapterModel, shipped with this version in code/tasks.
"""
import mlflow

from tasks.pyfunc_model import AdapterModel

mlflow.models.set_model(AdapterModel())
'''


def model_code_paths() -> list[Path]:
    """The source folders shipped with the pyfunc model: the `tasks` and `configs` packages as imported,
    so a checkout ships its files and an installed worker its site-packages copy (the code that ran)."""
    return [Path(tasks.__file__).resolve().parent, Path(configs.__file__).resolve().parent]


def log_adapter_model(uri: str, run_id: str, adapter_dir: Path, reference: dict[str, Any],
                      config: PipelineConfig) -> Any:
    """Log the pyfunc model into the run: adapter + base reference as artifacts, this project's `tasks`
    and `configs` packages as code. Logged as a model from code (no pickle), so loading it runs only
    shipped source. Returns MLflow's ModelInfo."""
    import mlflow

    from tasks.pyfunc_model import ADAPTER_ARTIFACT, BASE_ARTIFACT, BASE_REFERENCE_FILE, signature

    with tempfile.TemporaryDirectory(prefix="qlora-register-") as tmp:
        reference_file = Path(tmp) / BASE_REFERENCE_FILE
        reference_file.write_text(json.dumps(reference, indent=2, sort_keys=True))
        model_code = Path(tmp) / "adapter_model.py"
        model_code.write_text(MODEL_CODE)
        example = [EXAMPLE_PROMPT] if config.registry.log_input_example else None
        with using_tracking_uri(uri), quiet_artifact_transfers(), mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(model_code),
                artifacts={ADAPTER_ARTIFACT: str(adapter_dir), BASE_ARTIFACT: str(reference_file)},
                code_paths=[str(path) for path in model_code_paths()],
                signature=signature(config.evaluation.max_new_tokens),
                input_example=example,
                pip_requirements=pip_requirements(),
                metadata={"base_model": base_label(reference), "pipeline": "qlora-pipeline"},
                # the load-time options of tasks.pyfunc_model; MLflow lets a loader override only
                # the keys declared here (load_model(uri, model_config={...}))
                model_config={"base_model_path": None, "load_in_4bit": None,
                              "max_new_tokens": config.evaluation.max_new_tokens, "batch_size": 16},
            )


def _cleanup_version(client: Any, name: str, version: str, restore: dict[str, str | None]) -> None:
    """Delete a half-registered version and put moved aliases back (best effort; logs what it cannot)."""
    try:
        client.delete_model_version(name, version)
    except Exception as exc:
        logger.error("could not delete half-registered %s version %s: %s", name, version, exc)
    for alias, previous in restore.items():
        try:
            if previous is not None:
                client.set_registered_model_alias(name, alias, previous)
        except Exception as exc:
            logger.error("could not restore alias %s -> version %s of %s: %s", alias, previous, name, exc)


# --------------------------------------------------------------------------------------------------
# The stage


def verify_adapter_content(adapter_dir: Path, expected_sha256: str | None) -> str:
    """The adapter's content hash, after checking it against what its training recorded.

    `expected_sha256` is the hash the training of this pipeline run took (the flow passes it from its
    own TrainResult, so an adapter swapped in by another run is caught even with its own summary);
    without it, the hash in the folder's `train_summary.json` is the reference. A mismatch raises
    AdapterChanged and nothing is registered.
    """
    from tasks.train import SUMMARY_FILE, adapter_content_hash

    actual = adapter_content_hash(adapter_dir)
    source = "this pipeline run's training"
    if not expected_sha256:
        summary_file = adapter_dir / SUMMARY_FILE
        try:
            expected_sha256 = json.loads(summary_file.read_text()).get("adapter_sha256") or None
        except (OSError, ValueError, AttributeError):
            expected_sha256 = None
        source = f"its training ({summary_file})"
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


def register_adapter(config: PipelineConfig, adapter_dir: str | Path, eval_report: EvalReport,
                     validation: ValidationResult | None = None, plan: TrainingPlan | None = None,
                     tracker: PipelineTracker | None = None, expected_sha256: str | None = None) -> RegistrationResult:
    """Register the adapter as a new version of `registry.model_name`; see the module docstring.

    The version is logged into `tracker`'s run (the pipeline run; its creator ends it) and tagged with
    the registration's outcome. Without a tracker (`qlora register`) registration starts a run of its
    own, once the checks have passed, and ends it. The adapter's content is checked against the hash
    its training took (`verify_adapter_content`) just before anything is written to the registry, and
    kept as the version tag `adapter_sha256`.
    """
    registry = config.registry
    adapter_dir = Path(adapter_dir).resolve()
    check_adapter_dir(adapter_dir)
    reference = base_reference(config, adapter_dir)
    apply_http_settings(config)
    uri = tracker.uri if tracker is not None else resolve_tracking_uri(config)
    client = tracker.client if tracker is not None else client_for(uri)
    check_reachable(client, uri, adapter_dir)

    report = eval_report.to_dict()
    champion = current_champion(client, registry)
    champion_version = str(champion.version) if champion is not None else None
    decision = decide_promotion(report, registry, has_champion=champion is not None,
                                champion_version=champion_version)
    decision.numbers["champion_version"] = champion_version
    if champion is not None:
        decision.numbers[f"{registry.primary_metric}_champion_registered"] = _finite(
            _to_float(champion.tags.get(f"metric.adapter.{registry.primary_metric}")))

    adapter_sha256 = verify_adapter_content(adapter_dir, expected_sha256)
    own_run = tracker is None
    if tracker is None:
        tracker = PipelineTracker.start(config, run_name="register", tracking_uri=uri)
    run_id = tracker.run_id
    tags = lineage_tags(config, adapter_dir, eval_report, validation, plan, reference, decision, run_id)
    tags["adapter_sha256"] = adapter_sha256
    description = model_card(config, reference, tags, report, decision, adapter_dir)

    ensure_registered_model(client, registry.model_name)
    info = log_adapter_model(uri, run_id, adapter_dir, reference, config)
    with using_tracking_uri(uri):  # the sqlite registry resolves models:/<id> through the global client
        created = client.create_model_version(registry.model_name, source=info.model_uri, run_id=run_id,
                                              tags=tags, description=description, model_id=info.model_id)
    version = str(created.version)

    restore: dict[str, str | None] = {}
    try:
        _await_ready(client, registry.model_name, version)
        now = _alias_version(client, registry.model_name, registry.champion_alias)
        if decision.promote and now != champion_version:
            decision.promote = False
            decision.reasons.append(f"the champion moved from version {champion_version} to {now} during this "
                                    "registration; not promoted (evaluate against the new champion)")
            for key, value in (("decision", "keep challenger"), ("decision.reasons", "\n".join(decision.reasons))):
                client.set_model_version_tag(registry.model_name, version, key, value[:MAX_TAG_VALUE])
        moves = [registry.challenger_alias] + ([registry.champion_alias] if decision.promote else [])
        for alias in moves:
            restore[alias] = _alias_version(client, registry.model_name, alias)
            client.set_registered_model_alias(registry.model_name, alias, version)
    except BaseException:
        _cleanup_version(client, registry.model_name, version, restore)
        raise

    aliases = list(moves)
    try:  # the version is complete; a run tag is not worth failing it
        tracker.set_tags({"registered_model": registry.model_name, "registered_version": version,
                          "promoted": str(decision.promote).lower()})
        if own_run:
            tracker.finish()
    except Exception as exc:
        logger.warning("could not note the registration on run %s: %s", run_id, exc)
    return RegistrationResult(
        name=registry.model_name, version=version, aliases=aliases, promoted=decision.promote,
        decision=decision.to_dict(), run_id=run_id, model_uri=f"models:/{registry.model_name}/{version}",
    )


def _to_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _await_ready(client: Any, name: str, version: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} did not become READY (status {status})")
        time.sleep(1)


def resolve_champion_adapter(config: PipelineConfig) -> Path | None:
    """The champion's adapter folder, downloaded once to `<output_dir>/champion/<name>-v<version>`.

    None when there is no champion, or when the champion was trained on a different base model than
    the config's (it cannot be put on this base; the new version then cannot be promoted
    automatically: move the alias by hand after looking at the numbers).
    """
    registry = config.registry
    apply_http_settings(config)
    uri = resolve_tracking_uri(config)
    client = client_for(uri)
    check_reachable(client, uri)
    champion = current_champion(client, registry)
    if champion is None:
        return None
    recorded = champion.tags.get("base_model")
    if recorded:
        from tasks.modeling import base_model_reference

        now = base_label(base_model_reference(config))
        if now != recorded:
            logger.warning("champion %s v%s was trained on %s, the config's base is %s: not comparing",
                           registry.model_name, champion.version, recorded, now)
            return None
    return download_adapter(config, registry.model_name, str(champion.version))


def download_adapter(config: PipelineConfig, name: str, version: str) -> Path:
    """A registered version's adapter folder, fetched once to `<output_dir>/champion/<name>-v<version>`.

    Downloaded into a staging folder and renamed into place, so an interrupted download never
    leaves a half folder that a later run would take for the adapter.
    """
    import mlflow

    uri = resolve_tracking_uri(config)
    target = Path(config.training.output_dir) / "champion" / f"{name}-v{version}"
    if (target / "adapter_config.json").exists():
        return target
    staging = target.with_name(f".{target.name}.download-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with using_tracking_uri(uri), quiet_artifact_transfers():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                             dst_path=str(staging)))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        from tasks.pyfunc_model import ADAPTER_ARTIFACT

        subpath = mlmodel["flavors"]["python_function"]["artifacts"][ADAPTER_ARTIFACT]["path"]
        shutil.rmtree(target, ignore_errors=True)
        (local / subpath).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def champion_adapter_for(config: PipelineConfig) -> Path | None:
    """What the new adapter is compared against: `evaluation.champion_adapter` when set (a folder, or a
    `models:/<name>/<version>` / `models:/<name>@<alias>` URI, downloaded), else the registry's champion."""
    from mlflow.exceptions import MlflowException

    source = config.evaluation.champion_adapter
    if not source:
        return resolve_champion_adapter(config)
    if not source.startswith("models:/"):
        path = Path(source)
        if not (path / "adapter_config.json").is_file():
            raise AdapterFilesMissing(f"evaluation.champion_adapter={source}: no adapter_config.json there; "
                                      "point it at a peft adapter folder or a models:/<name>/<version> URI")
        return path
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))/?", source)
    if not match:
        raise ConfigError(f"evaluation.champion_adapter={source}: expected models:/<name>/<version> or "
                          "models:/<name>@<alias>")
    name, version, alias = match.groups()
    apply_http_settings(config)
    uri = resolve_tracking_uri(config)
    client = client_for(uri)
    check_reachable(client, uri)
    if alias:
        try:
            version = str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            raise ConfigError(f"evaluation.champion_adapter={source}: no version of {name} holds alias "
                              f"'{alias}' in {uri}") from exc
    return download_adapter(config, name, version)


def load_registered_model(config: PipelineConfig, model_uri: str | None = None,
                          base_model_path: str | Path | None = None) -> Any:
    """The pyfunc model at `model_uri` (default `models:/<model_name>@<champion_alias>`) from the config's
    tracking server; `base_model_path` points a version at a local base that moved (hash still checked)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    registry = config.registry
    uri = model_uri or f"models:/{registry.model_name}@{registry.champion_alias}"
    options = {"base_model_path": str(Path(base_model_path).resolve())} if base_model_path else None
    apply_http_settings(config)
    try:
        with using_tracking_uri(resolve_tracking_uri(config)), quiet_artifact_transfers():
            return mlflow.pyfunc.load_model(uri, model_config=options)
    except MlflowException as exc:
        raise ModelNotLoadable(f"cannot load {uri}: {str(exc).splitlines()[0]}") from exc
