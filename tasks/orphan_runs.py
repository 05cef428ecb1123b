"""Runs killed hard: who owns an MLflow run, and the sweep that marks the dead owners' runs KILLED.

Each pipeline run records the process that owns it (tags `host`, `pid`, `pid_namespace`,
`process_started`, and `prefect_flow_run_id` in a flow run). A process killed hard (`kill -9`, OOM
killer, power loss of a container) cannot end its run, so the next pipeline run of the experiment
(`PipelineTracker.start`) marks such orphans KILLED: RUNNING runs whose process provably no longer
exists (same host and PID namespace, PID gone or reused; `tasks.run_lock.process_is_gone`). Runs of
other machines, whose liveness cannot be checked from here, are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.run_lock import process_is_gone, this_process

logger = logging.getLogger(__name__)


def process_tags() -> dict[str, str]:
    """Who owns a run: enough for a later run on this machine to tell whether the owner is still alive."""
    me = this_process()
    tags = {"host": me.host, "pid": str(me.pid), "pid_namespace": me.pid_namespace,
            "process_started": repr(me.started)}
    if me.flow_run_id:
        tags["prefect_flow_run_id"] = me.flow_run_id
    return tags


def mark_orphans_killed(client: Any, experiment_id: str, found_by: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose owning process is provably gone; return their ids.

    Only runs that recorded their process (`process_tags`) on this host are candidates, and only those
    whose process `process_is_gone` confirms dead are touched: a live run, or one of another machine
    or PID namespace, is never changed. `found_by`, the run doing the sweep, is named on each orphan.
    """
    host = this_process().host.replace("'", "")
    candidates = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                  f"tags.host = '{host}'", max_results=1000)
    killed = []
    for run in candidates:
        tags = run.data.tags
        try:
            pid = int(tags["pid"])
            started = float(tags["process_started"]) if tags.get("process_started") else None
        except (KeyError, ValueError):
            continue
        if run.info.run_id == found_by or not process_is_gone(pid, tags["host"], tags.get("pid_namespace", ""),
                                                              started):
            continue
        reason = f"process {pid} on {tags['host']} ended without finishing the run (killed hard)"
        client.set_tag(run.info.run_id, "killed_reason", reason)
        if found_by:
            client.set_tag(run.info.run_id, "killed_found_by", found_by)
        client.set_terminated(run.info.run_id, status="KILLED")
        logger.warning("MLflow run %s marked KILLED: %s", run.info.run_id, reason)
        killed.append(run.info.run_id)
    return killed
