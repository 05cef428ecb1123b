"""Stage 5: the adapter becomes a model version in the MLflow registry, promoted only when it wins.

Order of work, chosen so that a failure at any point leaves nothing half-done:
1. check the adapter files and reach the tracking server (an unreachable server fails here, with
   nothing written anywhere; the adapter files are only ever read);
2. find the current champion and decide promotion (`tasks.promotion.decide_promotion`, a pure function);
3. check that the adapter is the one its training wrote (its content hash), log the pyfunc model into
   the pipeline run, then create the version with all lineage tags and the model card in one call;
4. move the aliases, once, last: `challenger` always, `champion` only when promoted. If anything
   after the version's creation fails, the version is deleted again and a moved alias put back, so no
   half-registered version and no alias on one remains. If the champion alias moved while this
   version was being registered, the decision is stale and the version stays challenger.

This module holds the stage, its lineage (what each version records about where it came from) and
the model card; the registry calls are `tasks.registry`'s, the adapter folder's contract `tasks.adapter`'s.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.paths import source_checkout
from configs.schema import ConfigError, PipelineConfig
from tasks.adapter import (
    check_adapter_dir,
    read_train_summary,
    read_training_config,
    same_base,
    verify_adapter_content,
)
from tasks.evaluate import forgetting_line
from tasks.promotion import PromotionDecision, as_finite, decide_promotion
from tasks.registry import (
    alias_version,
    await_ready,
    base_label,
    check_reachable,
    current_champion,
    ensure_registered_model,
    log_adapter_model,
)
from tasks.tracking import (
    PipelineTracker,
    apply_http_settings,
    client_for,
    library_versions,
    resolve_tracking_uri,
    using_tracking_uri,
)

if TYPE_CHECKING:
    from tasks.evaluate import EvalReport
    from tasks.gpu import TrainingPlan
    from tasks.validate_result import ValidationResult

logger = logging.getLogger(__name__)

MAX_TAG_VALUE = 5000


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
# Lineage


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

    if plan is not None:
        return plan.summary()
    recorded = read_train_summary(adapter_dir).get("plan")
    if not recorded:
        return "unknown"
    try:
        return TrainingPlan.from_dict(recorded).summary()
    except TypeError:  # written by another version of the plan
        return json.dumps(recorded, sort_keys=True, default=str)


def base_reference(config: PipelineConfig, adapter_dir: Path) -> dict[str, Any]:
    """What the model needs to find its base again, plus how it was quantized and generation defaults.

    Refuses an adapter whose recorded training config names another base (`tasks.adapter.same_base`)."""
    from tasks.modeling import base_model_reference

    trained_with = read_training_config(adapter_dir).get("model", {}).get("name_or_path")
    now = config.model.name_or_path
    if trained_with and not same_base(str(trained_with), now):
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


def _fmt(value: Any, spec: str = ".2f") -> str:
    number = as_finite(value)
    return format(number, spec) if number is not None else "n/a"


# Model card rows: metric -> number format (points, losses, shares).
CARD_METRICS = {"bleu": ".2f", "chrf": ".2f", "exact_match": ".2f", "rouge1": ".2f", "rouge2": ".2f",
                "rougeL": ".2f", "eval_loss": ".4f", "general_text_loss": ".4f", "runaway_share": ".1%"}


def training_outcome_tags(summary: dict[str, Any]) -> dict[str, str]:
    """How training ended, from the adapter's train_summary.json: the step the adapter holds, the best
    evaluated step, whether it stopped early and why, and each out-of-memory re-plan (tasks.oom)."""
    if not summary:
        return {}
    tags = {"training.stopped_early": str(bool(summary.get("stopped_early"))).lower(),
            "training.stop_reason": str(summary.get("stop_reason") or "unknown"),
            "training.global_step": str(summary.get("global_step"))}
    for key in ("adapter_step", "best_step", "best_metric", "best_metric_value"):
        if summary.get(key) is not None:
            tags[f"training.{key}"] = str(summary[key])
    replans = summary.get("replans") or []
    if replans:
        tags["training.replans"] = json.dumps(replans, sort_keys=True)
    return tags


def training_input_tags(summary: dict[str, Any]) -> dict[str, str]:
    """What training started from and read, from the adapter's train_summary.json: each data source with
    its own fingerprint (`dataset_sources`, a JSON list) and the adapter it started from (`init_adapter`:
    the source as configured, the registry version it resolved to, its content hash)."""
    tags = {}
    sources = summary.get("data_sources") or []
    if sources:
        tags["dataset_sources"] = json.dumps(sources, sort_keys=True)
    init = summary.get("init_adapter")
    if init:
        tags["init_adapter"] = str(init.get("source"))
        tags["init_adapter.version"] = str(init.get("version") or "none (a folder)")
        tags["init_adapter.sha256"] = str(init.get("adapter_sha256"))
    return tags


def lineage_tags(config: PipelineConfig, adapter_dir: Path, eval_report: EvalReport,
                 validation: ValidationResult | None, plan: TrainingPlan | None, reference: dict[str, Any],
                 decision: PromotionDecision, run_id: str) -> dict[str, str]:
    commit, dirty = git_commit()
    tags: dict[str, Any] = {
        "base_model": base_label(reference),
        "base_model_reference": json.dumps(reference, sort_keys=True),
        "dataset_fingerprint": dataset_fingerprint(validation, eval_report),
        "dataset_path": config.data.path or ", ".join(source.path for source in config.data.source_list()),
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
    if eval_report.general_text:
        tags["eval.general_text"] = eval_report.general_text["path"]
    if eval_report.canaries:
        tags["eval.canaries"] = eval_report.canaries["path"]
        tags["eval.canaries_failed"] = eval_report.canaries["failed"]
    summary = read_train_summary(adapter_dir)
    tags.update(training_outcome_tags(summary))
    tags.update(training_input_tags(summary))
    tags.update({f"lib.{name}": version for name, version in library_versions().items()})
    for system, scores in eval_report.systems.items():
        for metric, value in (scores or {}).items():
            if as_finite(value) is not None:
                tags[f"metric.{system}.{metric}"] = f"{float(value):.4f}"
    for key, value in decision.numbers.items():
        tags[f"decision.{key}"] = value if not isinstance(value, float) else f"{value:.6g}"
    return {key: str(value)[:MAX_TAG_VALUE] for key, value in tags.items()}


def model_card(config: PipelineConfig, reference: dict[str, Any], tags: dict[str, str],
               eval_report: dict[str, Any], decision: PromotionDecision, adapter_dir: Path) -> str:
    """A short markdown model card: base, data, LoRA settings, metrics vs base (and champion), verdict."""
    registry = config.registry
    systems = eval_report.get("systems") or {}
    names = [s for s in ("base", "adapter", "champion") if systems.get(s)]
    metrics = [m for m in CARD_METRICS if any(as_finite(systems[s].get(m)) is not None for s in names)]
    header = "| metric | " + " | ".join(names) + " | adapter − base |"
    rows = [header, "|---" * (len(names) + 2) + "|"]
    for metric in metrics:
        spec = CARD_METRICS[metric]
        values = [_fmt(systems[s].get(metric), spec) for s in names]
        delta = "n/a"
        if as_finite(systems["adapter"].get(metric)) is not None and as_finite(systems["base"].get(metric)) is not None:
            delta = format(systems["adapter"][metric] - systems["base"][metric], "+" + spec)
        rows.append(f"| {metric} | " + " | ".join(values) + f" | {delta} |")
    checks = _checks_markdown(eval_report, systems)
    training = ""
    summary = read_train_summary(adapter_dir)
    if summary:
        held = summary.get("adapter_step")
        kept = f" (adapter from step {held}, the best evaluation)" if held not in (None, summary.get("global_step")) \
            else ""
        replans = len(summary.get("replans") or [])
        replanned = f"; re-planned {replans} time(s) after running out of memory" if replans else ""
        training = (f"- **Training:** {summary.get('global_step')} steps{kept}, eval loss "
                    f"{_fmt(summary.get('eval_loss_before'))} → {_fmt(summary.get('eval_loss_after'))}, "
                    f"{tags['gpu_plan']}; {summary.get('stop_reason') or 'stop reason not recorded'}{replanned}\n")
    quant = reference.get("quantization", {})
    verdict = "promoted to **champion**" if decision.promote else "**challenger** only (not promoted)"
    reasons = "\n".join(f"  - {r}" for r in decision.reasons)
    return (
        f"### QLoRA adapter for `{tags['base_model'].split('@')[0]}`\n\n"
        f"- **Base:** `{tags['base_model']}` (not copied; loaded from this reference at load time)\n"
        f"- **Data:** {_data_line(config)}, fingerprint `{tags['dataset_fingerprint']}`, "
        f"validation passed: {tags['validation_success']}\n"
        f"{_init_line(summary)}"
        f"- **LoRA:** {tags['lora']}; base in "
        f"{'4-bit ' + str(quant.get('quant_type')) if quant.get('load_in_4bit') else '16-bit'}"
        f"{' + double quant' if quant.get('load_in_4bit') and quant.get('double_quant') else ''}\n"
        f"{training}"
        f"- **Code:** git `{tags['git_commit'][:12]}`, config hash `{tags['config_hash']}`\n\n"
        f"Evaluation on {eval_report.get('n_samples', '?')} held-out rows (points, 0-100):\n\n"
        + "\n".join(rows)
        + checks
        + f"\n\n**Decision:** {verdict} on `{registry.primary_metric}`\n{reasons}\n\n"
        f"Load: `mlflow.pyfunc.load_model(\"models:/{registry.model_name}@{registry.champion_alias}\")"
        ".predict([\"prompt\"])`\n"
    )


def _data_line(config: PipelineConfig) -> str:
    """The model card's data: the file and its format, or each source with its weight."""
    sources = config.data.source_list()
    if config.data.sources is None:
        return f"`{sources[0].path}` ({sources[0].format})"
    return "mixed from " + " + ".join(f"`{s.path}` ({s.format}, weight {s.weight:g})" for s in sources)


def _init_line(summary: dict[str, Any]) -> str:
    """The model card's starting point when training continued an existing adapter."""
    init = summary.get("init_adapter")
    if not init:
        return ""
    version = f" (version {init['version']})" if init.get("version") else ""
    digest = str(init.get("adapter_sha256"))[:16]
    return f"- **Started from:** `{init.get('source')}`{version}, adapter sha256 `{digest}`\n"


def _checks_markdown(eval_report: dict[str, Any], systems: dict[str, Any]) -> str:
    """The model card's forgetting line and canary results (empty when the evaluation ran neither)."""
    from tasks.canaries import canary_failures_markdown

    lines = []
    general = eval_report.get("general_text")
    if general:
        base, adapter = (as_finite(systems.get(s, {}).get("general_text_loss")) for s in ("base", "adapter"))
        lines.append(f"- **Forgetting:** {forgetting_line(general, base, adapter)}")
    canaries = canary_failures_markdown(eval_report.get("canaries"))
    if canaries:
        lines.append("- " + canaries[0])
        lines += ["  " + line for line in canaries[1:]]
    return "\n\n" + "\n".join(lines) if lines else ""


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


def register_adapter(config: PipelineConfig, adapter_dir: str | Path, eval_report: EvalReport,
                     validation: ValidationResult | None = None, plan: TrainingPlan | None = None,
                     tracker: PipelineTracker | None = None, expected_sha256: str | None = None,
                     extra_tags: dict[str, str] | None = None) -> RegistrationResult:
    """Register the adapter as a new version of `registry.model_name`; see the module docstring.

    The version is logged into `tracker`'s run (the pipeline run; its creator ends it) and tagged with
    the registration's outcome. Without a tracker (`qlora register`) registration starts a run of its
    own, once the checks have passed, and ends it. The adapter's content is checked against the hash
    its training took (`verify_adapter_content`) just before anything is written to the registry, and
    kept as the version tag `adapter_sha256`. `extra_tags` join the lineage tags (a sweep's study name
    and trial number).
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
        decision.numbers[f"{registry.primary_metric}_champion_registered"] = as_finite(
            _to_float(champion.tags.get(f"metric.adapter.{registry.primary_metric}")))

    adapter_sha256 = verify_adapter_content(adapter_dir, expected_sha256)
    own_run = tracker is None
    if tracker is None:
        tracker = PipelineTracker.start(config, run_name="register", tracking_uri=uri)
    run_id = tracker.run_id
    tags = lineage_tags(config, adapter_dir, eval_report, validation, plan, reference, decision, run_id)
    tags["adapter_sha256"] = adapter_sha256
    tags.update({key: str(value)[:MAX_TAG_VALUE] for key, value in (extra_tags or {}).items()})
    description = model_card(config, reference, tags, report, decision, adapter_dir)

    ensure_registered_model(client, registry.model_name)
    info = log_adapter_model(uri, run_id, adapter_dir, reference, config)
    with using_tracking_uri(uri):  # the sqlite registry resolves models:/<id> through the global client
        created = client.create_model_version(registry.model_name, source=info.model_uri, run_id=run_id,
                                              tags=tags, description=description, model_id=info.model_id)
    version = str(created.version)

    restore: dict[str, str | None] = {}
    try:
        await_ready(client, registry.model_name, version)
        now = alias_version(client, registry.model_name, registry.champion_alias)
        if decision.promote and now != champion_version:
            decision.promote = False
            decision.reasons.append(f"the champion moved from version {champion_version} to {now} during this "
                                    "registration; not promoted (evaluate against the new champion)")
            for key, value in (("decision", "keep challenger"), ("decision.reasons", "\n".join(decision.reasons))):
                client.set_model_version_tag(registry.model_name, version, key, value[:MAX_TAG_VALUE])
        moves = [registry.challenger_alias] + ([registry.champion_alias] if decision.promote else [])
        for alias in moves:
            restore[alias] = alias_version(client, registry.model_name, alias)
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


