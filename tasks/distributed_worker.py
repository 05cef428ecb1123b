"""The entry module each torchrun rank runs: `python -m tasks.distributed_worker SPEC.json`.

It is started by `tasks.distributed.launch_training`, never by hand. It reads the run's inputs from
the spec the parent wrote, and calls the same `tasks.train.train` the single-process stage calls;
`train` sees it is inside a launched rank and trains in-rank. Rank 0 rebuilds the pipeline's
`PipelineTracker` from (run_id, uri) and logs through `training_callback`, then writes its result
(summary, adapter folder, loss history) next to the spec for the parent. `@record` writes a failing
rank's traceback to torchrun's error file, which the parent raises.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main(spec_path: str) -> None:
    from tasks.distributed import RESULT_FILE, die_with_parent, is_main_rank, read_spec

    die_with_parent()  # torchrun's agent; it dies with the launching stage, so a killed stage leaves no rank
    from tasks.train import train

    config, plan, splits, spec = read_spec(Path(spec_path))
    callbacks = []
    if is_main_rank() and spec.get("run_id") and spec.get("tracking_uri"):
        from tasks.tracking import PipelineTracker
        from tasks.training_callback import training_callback

        callbacks.append(training_callback(PipelineTracker(spec["run_id"], spec["tracking_uri"]),
                                           system_metrics=spec.get("system_metrics")))
    result = train(config, plan, splits, callbacks=callbacks, run_id=spec.get("run_id"))
    if is_main_rank():
        history = callbacks[0].history if callbacks else []
        staging = Path(spec_path).with_name(f".{RESULT_FILE}")
        staging.write_text(json.dumps({"adapter_dir": str(result.adapter_dir), "summary": asdict(result.summary),
                                       "history": history}))
        staging.replace(Path(spec_path).with_name(RESULT_FILE))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tasks.distributed_worker SPEC.json (started by tasks.distributed.launch_training)")
    main(sys.argv[1])
