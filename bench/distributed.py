"""Several training processes against one, at the same global batch: tokens/s and final loss.

    python -m bench.distributed                       # 2 CPU ranks (gloo) vs 1 process, demo model
    python -m bench.distributed --strategy fsdp       # FSDP-QLoRA ranks instead of DDP
    python -m bench.distributed --ranks 4 --out F     # on a multi-GPU machine: 4 GPU ranks (nccl)

Both runs go through the pipeline's own train stage (`tasks.train.train`): the single process with the
configured batch, the ranks launched by torchrun with the plan's per-rank batch, so that
per-rank batch x accumulation x ranks equals the single batch. Reported: trained tokens per second of
the training loop (the Trainer's count over all ranks, divided by its runtime), the last logged
training loss and the final eval loss, and the relative difference of the final losses (target: 2%).
On a CPU the ranks share the cores: the single process gets all threads, each rank its share
(OMP_NUM_THREADS = cores / ranks), so the comparison is the same hardware split two ways.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, loadavg, machine_info


def run_once(overrides: list[str], output_dir: Path) -> dict[str, Any]:
    from configs.schema import load_config
    from tasks.data import load_splits
    from tasks.demo_assets import build_demo_assets
    from tasks.gpu import check_gpu
    from tasks.train import train

    assets = build_demo_assets(REPO_ROOT / ".cache" / "demo")
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"data.path={assets.data_path.resolve()}", f"model.name_or_path={assets.model_dir.resolve()}",
        f"training.output_dir={output_dir}", *overrides])
    _, plan = check_gpu(config)
    started = time.perf_counter()
    result = train(config, plan, load_splits(config.data))
    state = json.loads(max((output_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())
    losses = [row["loss"] for row in state["log_history"] if "loss" in row]
    return {"plan": plan.summary(), "world_size": plan.world_size, "effective_batch": plan.effective_batch_size,
            "tokens_per_second": result.summary.tokens_per_second, "train_tokens": result.summary.train_tokens,
            "final_logged_loss": losses[-1] if losses else None, "eval_loss_after": result.summary.eval_loss_after,
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="global batch of both runs")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "distributed_results.json")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    common = [f"training.max_steps={args.steps}", f"training.save_steps={args.steps}", "training.logging_steps=10",
              f"training.per_device_batch_size={args.batch}", "training.gradient_accumulation_steps=1"]
    with tempfile.TemporaryDirectory() as tmp:
        single = run_once(common, Path(tmp) / "one")
        ranks = run_once([*common, f"training.distributed={args.strategy}", f"training.num_processes={args.ranks}"],
                         Path(tmp) / "ranks")
    delta = None
    if single["final_logged_loss"] and ranks["final_logged_loss"]:
        delta = abs(ranks["final_logged_loss"] - single["final_logged_loss"]) / single["final_logged_loss"]
    speedup = ranks["tokens_per_second"] / single["tokens_per_second"] if single["tokens_per_second"] else None
    result = {"machine": machine_info(), "loadavg": loadavg(), "steps": args.steps, "global_batch": args.batch,
              "strategy": args.strategy, "single": single, "ranks": ranks, "speedup": speedup,
              "final_loss_relative_difference": delta, "final_loss_target_met": delta is not None and delta <= 0.02}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
