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
from typing import Annotated, Any

import typer
from rich.console import Console

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="QLoRA fine-tuning pipeline: validate -> check GPU -> train -> evaluate -> register.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default configs/demo.yaml)")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a config key: section.key=value (repeatable)")
]


def pipeline_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Known pipeline errors become a red message and exit code 2; anything else keeps its traceback."""
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from configs.schema import ConfigError
        from tasks.data import DataError

        try:
            return func(*args, **kwargs)
        except (ConfigError, DataError) as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


def load(config: Path | None, overrides: list[str] | None):  # -> PipelineConfig
    from configs.schema import load_config

    return load_config(config, overrides or [])


@app.command("demo-assets")
@pipeline_errors
def demo_assets_command(
    out_dir: Annotated[Path, typer.Option(help="where the dataset and model go")] = Path(".cache/demo"),
    seed: Annotated[int, typer.Option(help="same seed, same files")] = 0,
    force: Annotated[bool, typer.Option(help="rebuild even when present")] = False,
) -> None:
    """Build the offline demo dataset and tiny Llama base model (no network)."""
    from tasks.demo_assets import build_demo_assets

    assets = build_demo_assets(out_dir, seed=seed, force=force)
    console.print(f"demo data: {assets.data_path}\ndemo base model: {assets.model_dir}")


@app.command("check-gpu")
@pipeline_errors
def check_gpu_command(config: ConfigOption = None, set_: SetOption = None,
                      as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Report the hardware and the training plan for the config, or why it cannot run."""
    from tasks.gpu import check_gpu

    report, plan = check_gpu(load(config, set_))
    if as_json:
        print(json.dumps({"report": report.to_dict(), "plan": plan.to_dict()}, indent=2))
        return
    console.print(report.markdown())
    console.print(plan.markdown())


@app.command("train")
@pipeline_errors
def train_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Train the LoRA adapter (QLoRA where the plan says so); resumes from the last checkpoint."""
    from tasks.data import load_splits
    from tasks.gpu import check_gpu
    from tasks.train import train

    cfg = load(config, set_)
    splits = load_splits(cfg.data)
    _, plan = check_gpu(cfg)
    console.print(f"plan: {plan.summary()}")
    result = train(cfg, plan, splits)
    s = result.summary
    console.print(
        f"adapter: {result.adapter_dir}\nsteps {s.global_step} (resumed from {s.resumed_from_step}), "
        f"eval loss {s.eval_loss_before} -> {s.eval_loss_after}, {s.tokens_per_second:.0f} tokens/s"
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
