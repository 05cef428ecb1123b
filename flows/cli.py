"""The `qlora` command line: each stage on its own, and the whole flow.

Commands are thin: they load the config, call the stage function, print a short result, and turn the
pipeline's own errors (config, data, plan) into one readable line and a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:  # the CLI imports the pipeline lazily, per command, so that `qlora --help` starts fast
    from configs.schema import PipelineConfig
    from tasks.data import DatasetSplits
    from tasks.gpu import TrainingPlan

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a Prefect server, `qlora run` starts a temporary one. Its first start creates the database
# (~/.prefect/prefect.db) and takes longer than Prefect's 20 s default on a small machine; a timeout
# there would fail the flow before it began. No telemetry leaves a machine that may have no network.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(help="QLoRA fine-tuning pipeline: validate -> check GPU -> train -> evaluate -> register.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML config (default: configs/demo.yaml in $QLORA_PIPELINE_DIR or the working "
                           "directory, else the demo config shipped with the package)")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a config key: section.key=value (repeatable)")
]


def pipeline_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Known pipeline errors become a red message and exit code 2; anything else keeps its traceback."""
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from configs.schema import ConfigError
        from tasks.data import DataError
        from tasks.tracking import TrackingServerUnreachable

        try:
            return func(*args, **kwargs)
        except (ConfigError, DataError, TrackingServerUnreachable) as exc:
            console.print("[bold red]error:[/]", escape(str(exc)))
            raise typer.Exit(2) from None

    return wrapper


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare `qlora NAME`: a typer command whose known pipeline errors are one red line (`pipeline_errors`)."""
    def declare(func: Callable[..., Any]) -> Callable[..., Any]:
        return app.command(name)(pipeline_errors(func))

    return declare


def load(config: Path | None, overrides: list[str] | None):  # -> PipelineConfig
    from configs.schema import load_config

    return load_config(config, overrides or [])


def stage_inputs(cfg: PipelineConfig) -> tuple[TrainingPlan, DatasetSplits]:
    """What a stage command needs before its stage runs, as the flow gives it: the plan for this
    machine (printed, as the flow logs it) and the data, read once; in the order the stages take them."""
    from tasks.data import load_splits
    from tasks.gpu import check_gpu

    splits = load_splits(cfg.data)
    _, plan = check_gpu(cfg)
    console.print(f"plan: {plan.summary()}")
    return plan, splits


def preflight(cfg: PipelineConfig) -> None:
    """Fail in seconds on what would fail a flow run later (after a Prefect server started, or at 2 am):
    the data files are missing, or an http(s) tracking server does not answer."""
    from tasks.data import check_data_files
    from tasks.tracking import check_tracking_server, resolve_tracking_uri

    check_data_files(cfg.data)
    check_tracking_server(resolve_tracking_uri(cfg))


def flow_config_path(config: Path | None) -> str:
    """The config file a flow run reads: the one given, else the default `load` used (an absolute path,
    so a scheduled run reads the same file whatever its working directory)."""
    from configs.paths import default_config_path

    return str(config or default_config_path())


@command("demo-assets")
def demo_assets_command(
    out_dir: Annotated[Path, typer.Option(help="where the dataset and model go")] = Path(".cache/demo"),
    seed: Annotated[int, typer.Option(help="same seed, same files")] = 0,
    force: Annotated[bool, typer.Option(help="rebuild even when present")] = False,
) -> None:
    """Build the offline demo dataset and tiny Llama base model (no network)."""
    from tasks.demo_assets import build_demo_assets

    assets = build_demo_assets(out_dir, seed=seed, force=force)
    console.print(f"demo data: {assets.data_path}\ndemo base model: {assets.model_dir}")


@command("validate")
def validate_command(
    data_path: Annotated[str | None, typer.Argument(help="data file or hub id (default: data.path)")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Run the data contract (Great Expectations suite); exit code 1 when it fails."""
    from tasks.validate import validate_data

    result = validate_data(load(config, set_), data_path)
    print(json.dumps(result.to_dict(), indent=2) if as_json else result.markdown())
    if not result.success:
        console.print(f"data contract failed: {', '.join(result.failed_names())}", style="bold red", markup=False)
        raise typer.Exit(1)
    console.print(f"data contract passed in {result.duration_s:.1f} s; fingerprint {result.fingerprint}",
                  markup=False)


@command("check-gpu")
def check_gpu_command(config: ConfigOption = None, set_: SetOption = None,
                      as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Report the hardware and the training plan for the config, or why it cannot run."""
    from tasks.gpu import check_gpu

    report, plan = check_gpu(load(config, set_))
    if as_json:
        print(json.dumps({"report": report.to_dict(), "plan": plan.to_dict()}, indent=2))
        return
    console.print(report.markdown(), markup=False)
    console.print(plan.markdown(), markup=False)


@command("train")
def train_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Train the LoRA adapter (QLoRA where the plan says so); resumes from the last checkpoint.

    Refused at once when another run holds training.output_dir (see training.output_dir_lock)."""
    from tasks.run_lock import hold_output_dir
    from tasks.train import train

    cfg = load(config, set_)
    with hold_output_dir(cfg.training):
        plan, splits = stage_inputs(cfg)
        result = train(cfg, plan, splits)
    s = result.summary
    console.print(
        f"adapter: {result.adapter_dir}\nsteps {s.global_step} (resumed from {s.resumed_from_step}), "
        f"eval loss {s.eval_loss_before} -> {s.eval_loss_after}, {s.tokens_per_second:.0f} tokens/s"
    )


@command("evaluate")
def evaluate_command(
    adapter: Annotated[Path, typer.Option("--adapter", help="adapter folder to score (from `qlora train`)")],
    config: ConfigOption = None,
    set_: SetOption = None,
    champion: Annotated[Path | None, typer.Option("--champion", help="serving adapter folder to compare with")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="report folder (default <output_dir>/evaluation)")] = None,
) -> None:
    """Score base vs adapter (and champion): BLEU/ROUGE, eval loss, paired-bootstrap significance."""
    from tasks.evaluate import evaluate_adapter

    cfg = load(config, set_)
    plan, splits = stage_inputs(cfg)
    report = evaluate_adapter(cfg, plan, splits, adapter, champion_adapter=champion or cfg.evaluation.champion_adapter)
    paths = report.save(out or Path(cfg.training.output_dir) / "evaluation")
    print(report.markdown())
    console.print("report: " + ", ".join(str(path) for path in paths.values()))


@command("register")
def register_command(
    adapter: Annotated[Path, typer.Option("--adapter", help="adapter folder to register (from `qlora train`)")],
    config: ConfigOption = None,
    set_: SetOption = None,
    report: Annotated[Path | None, typer.Option(
        "--report", help="evaluation report JSON (default <output_dir>/evaluation/eval_report.json)")] = None,
    validation: Annotated[Path | None, typer.Option(
        "--validation", help="data contract result JSON (`qlora validate --json`), recorded as lineage")] = None,
) -> None:
    """Register the adapter as a new model version: `challenger` always, `champion` only when it wins."""
    from configs.schema import ConfigError
    from tasks.evaluate import REPORT_FILE, EvalReport
    from tasks.register import register_adapter
    from tasks.run_lock import hold_output_dir
    from tasks.tracking import TrackingServerUnreachable
    from tasks.validate import ValidationResult

    cfg = load(config, set_)
    report_path = report or Path(cfg.training.output_dir) / "evaluation" / REPORT_FILE
    if not report_path.is_file():
        raise ConfigError(f"evaluation report {report_path} not found: run `qlora evaluate --adapter {adapter}` "
                          "first, or pass --report")
    evaluation = EvalReport.from_json(report_path)
    checks = ValidationResult.from_json(validation) if validation else None
    try:
        with hold_output_dir(cfg.training):  # no run may be rewriting the adapter while it is checked and uploaded
            result = register_adapter(cfg, adapter, evaluation, validation=checks)
    except TrackingServerUnreachable as exc:  # nothing was registered; the same command can be rerun
        console.print("[bold red]error:[/]", escape(str(exc)))
        raise typer.Exit(2) from None
    verdict = "promoted to champion" if result.promoted else "not promoted"
    reasons = "\n".join(f"  - {reason}" for reason in result.decision["reasons"])
    console.print(
        f"registered {result.name} version {result.version} (aliases: {', '.join(result.aliases)}; {verdict})\n"
        f"{reasons}\nmodel URI: {result.model_uri}\nMLflow run: {result.run_id}", markup=False)


@command("predict")
def predict_command(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts; each gets one completion")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="model URI, e.g. models:/NAME@champion or models:/NAME/3 "
                              "(default: the config's model at its champion alias)")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens to generate (default: as registered)")] = None,
    base_model_path: Annotated[Path | None, typer.Option(
        help="where the local base model lives now, if it moved since registration (its hash is checked)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print [{prompt, completion}] as JSON")] = False,
) -> None:
    """Print completions from a registered adapter (its base model is loaded from the recorded reference)."""
    from tasks.registry import load_registered_model

    loaded = load_registered_model(load(config, set_), model, base_model_path)
    params = {"max_new_tokens": max_new_tokens} if max_new_tokens else None
    completions = loaded.predict(list(prompts), params=params)
    if as_json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)],
                         indent=2, ensure_ascii=False))
        return
    for prompt, completion in zip(prompts, completions, strict=True):
        console.print(f"> {prompt}", style="dim", markup=False)
        print(completion)


@command("run")
def run_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Run the whole flow (validate -> check GPU -> train -> evaluate -> register) as a Prefect flow run."""
    from flows.finetune import finetune_flow

    preflight(load(config, set_))
    outcome = finetune_flow(config_path=flow_config_path(config), overrides=list(set_ or []))
    metric = outcome.primary_metric
    console.print(
        f"\n[bold green]registered[/] {outcome.registered_model} version {outcome.version} "
        f"(aliases: {', '.join(outcome.aliases) or 'none'}; {'promoted' if outcome.promoted else 'not promoted'})\n"
        f"{metric}: base {outcome.metrics['base'][metric]:.1f} -> adapter {outcome.metrics['adapter'][metric]:.1f} "
        f"({outcome.gain_over_base(metric):+.1f}); rougeL {outcome.gain_over_base('rougeL'):+.1f}\n"
        f"adapter: {outcome.adapter_dir}\nMLflow run: {outcome.run_id}\n\n"
        "Look at it:\n"
        "  make ui       # Prefect UI http://127.0.0.1:4200 + MLflow UI http://127.0.0.1:5000 (Ctrl-C stops)\n"
        f"  qlora predict --model models:/{outcome.registered_model}/{outcome.version} "
        "$'Rewrite this in Zorbish.\\n\\nred cat runs'"
    )


@command("sweep")
def sweep_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Search hyper-parameters (the config's sweep: section) as the Prefect flow qlora-sweep; a rerun continues
    the same Optuna study, and the best trial's adapter is evaluated and registered like the nightly flow's."""
    from flows.sweep import sweep_flow
    from tasks.sweep import require_sweep

    cfg = load(config, set_)
    require_sweep(cfg)  # no sweep section: refused before a Prefect server starts
    preflight(cfg)
    outcome = sweep_flow(config_path=flow_config_path(config), overrides=list(set_ or []))
    for row in outcome.trials:
        console.print(f"trial {row['trial']}: {row['state']} value={row['value']} "
                      + " ".join(f"{k}={v}" for k, v in row.items() if "." in k), markup=False)
    console.print(f"study {outcome.study_name} ({outcome.storage}); ran now: {outcome.ran_now}; "
                  f"MLflow run {outcome.run_id}", markup=False)
    if outcome.registration is not None:
        reg = outcome.registration
        console.print(f"best trial registered as {reg.name} version {reg.version} (aliases: "
                      f"{', '.join(reg.aliases)}; {'promoted' if reg.promoted else 'not promoted'})", markup=False)


@command("serve")
def serve_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    cron: Annotated[str, typer.Option(help="schedule, cron syntax (UTC)")] = "0 2 * * *",
    name: Annotated[str, typer.Option(help="deployment name")] = "finetune-nightly",
) -> None:
    """Serve the flow on a schedule from this process (no work pool needed); Ctrl-C stops it."""
    from flows.finetune import finetune_flow

    preflight(load(config, set_))  # fail now on a bad config, not at 2 am
    finetune_flow.serve(name=name, cron=cron,
                        parameters={"config_path": flow_config_path(config), "overrides": list(set_ or [])})


@app.command("serve-model")
@pipeline_errors
def serve_model_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (default serving.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default serving.port)")] = None,
) -> None:
    """Serve the adapters of serving.models over an OpenAI-compatible HTTP API (one base in memory).

    Binding beyond 127.0.0.1 needs a bearer token in QLORA_SERVING_TOKEN; see README "Serving"."""
    from tasks.serving import serve

    cfg = load(config, set_)
    if host is not None:
        cfg.serving.host = host
    if port is not None:
        cfg.serving.port = port
    serve(cfg)


@app.command("ab-report")
@pipeline_errors
def ab_report_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    run_id: Annotated[str | None, typer.Option(help="serving run (default: the latest of the serving experiment)")]
    = None,
    level: Annotated[float, typer.Option(help="significance level of the feedback test")] = 0.05,
) -> None:
    """The A/B arms of a serving run side by side, with Welch's t-test on their feedback scores."""
    from tasks.serving_ab import ab_report, format_report

    arms, extra = ab_report(load(config, set_), run_id)
    print(format_report(arms, extra, level))


@app.command("export")
@pipeline_errors
def export_command(
    model: Annotated[str, typer.Option("--model", "-m", help="models:/NAME@ALIAS, models:/NAME/N or adapter folder")],
    out: Annotated[Path, typer.Option("--out", help="new folder for the merged model")],
    merge: Annotated[bool, typer.Option("--merge", help="merge the adapter into the dequantized base")] = False,
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32")] = "float16",
    register: Annotated[bool, typer.Option("--register", help="register as <name>-merged, linked to the version")]
    = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Export a standalone model for vLLM/TGI/transformers: base dequantized, adapter merged, logits checked."""
    from configs.schema import ConfigError
    from tasks.export import export_merged

    if not merge:
        raise ConfigError("export writes merged models only: pass --merge (serve adapters unmerged with "
                          "`qlora serve-model` or vLLM --enable-lora, see README \"Serving\")")
    result = export_merged(load(config, set_), model, out, dtype=dtype, register=register)
    console.print(f"merged model: {result.out_dir} ({result.dtype}); largest next-token logit difference to "
                  f"base + adapter {result.max_abs_diff:.3g} ({result.relative_diff:.3%})"
                  + (f"\nregistered: {result.registered}" if result.registered else ""), markup=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
