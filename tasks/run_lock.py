"""Who owns a pipeline run: the process identity, the output-folder lock, and the test for a dead owner.

One run at a time per `training.output_dir`. Two runs writing checkpoints into one folder would each
take the other's checkpoints for stale or resume from them, and both would register whatever adapter
happened to be in `adapter/` last. So a run holds its output folder for its whole lifetime with an
OS lock, `fcntl.flock` on `<output_dir>/run.lock`:

- the kernel releases it when the process dies, however it dies (`kill -9` included), so a lock is
  never stale and nobody has to clean one up;
- the holder writes who it is into the file (PID, host, start time, Prefect flow run), so a refused
  run can name it;
- a second run is refused at once by default, before it touches anything in the folder
  (`training.output_dir_lock: fail`), or waits up to `training.lock_timeout_s` (`wait`);
- the lock is re-entrant within one process: the flow takes it for the whole pipeline run and the
  train stage's own acquisition inside it is a no-op, while `qlora train` alone takes it itself.

The same process identity is recorded on each MLflow run (`tasks.tracking`); `process_is_gone` lets a
later run find runs whose process died without marking them finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from configs.schema import ConfigError, TrainingConfig

LOCK_FILE = "run.lock"
POLL_INTERVAL_S = 0.5

logger = logging.getLogger(__name__)


class OutputDirInUse(ConfigError):
    """Another live run holds this `training.output_dir`; nothing in the folder was touched."""


# --------------------------------------------------------------------------------------------------
# Process identity


@dataclass(frozen=True)
class ProcessIdentity:
    """Enough to name a process to a person and to tell later, from the same machine, whether it died.

    `pid_namespace` (boot id + PID namespace) says whether two processes' PIDs are comparable: only
    then can one of them check the other's liveness. `started` (the process's creation time) guards
    against PID reuse.
    """

    pid: int
    host: str
    pid_namespace: str
    started: float
    flow_run_id: str | None = None
    command: str = ""

    def describe(self) -> str:
        flow = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ", not a Prefect flow run"
        since = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"PID {self.pid} on host {self.host}{flow}, started {since}" + (
            f" ({self.command})" if self.command else "")


def _pid_namespace() -> str:
    """Boot id and PID-namespace inode: equal for two processes exactly when their PIDs are comparable."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts) or "unknown"


def _process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # psutil missing, or no such process
        return None


def current_flow_run_id() -> str | None:
    """The Prefect flow run this process is executing, if any (without importing Prefect when unused)."""
    if "prefect" not in sys.modules:
        return os.environ.get("PREFECT__FLOW_RUN_ID") or None
    from prefect.runtime import flow_run

    return flow_run.id or None


def this_process() -> ProcessIdentity:
    pid = os.getpid()
    return ProcessIdentity(
        pid=pid,
        host=socket.gethostname(),
        pid_namespace=_pid_namespace(),
        started=_process_start_time(pid) or time.time(),
        flow_run_id=current_flow_run_id(),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv and sys.argv[0] else "",
    )


def process_is_gone(pid: int, host: str, pid_namespace: str, started: float | None) -> bool | None:
    """True when that process certainly no longer runs, False when it does, None when this machine cannot tell.

    Only a process of this host and this PID namespace can be checked. A live PID whose creation time
    differs from the recorded one belongs to a newer process: the recorded one is gone. A zombie is gone.
    """
    me = this_process()
    if host != me.host or pid_namespace != me.pid_namespace or pid_namespace == "unknown":
        return None
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return started is not None and abs(process.create_time() - started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return None


# --------------------------------------------------------------------------------------------------
# The output-folder lock


@dataclass
class _Held:
    fd: int
    path: Path
    created_dir: bool
    depth: int = 1


_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


def read_holder(path: Path) -> ProcessIdentity | None:
    """Who wrote the lock file last (the holder, when the lock is held); None when unreadable or empty."""
    try:
        data = json.loads(path.read_text() or "null")
        return ProcessIdentity(**data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def _refusal(output_dir: Path, holder: ProcessIdentity | None, waited_s: float | None) -> OutputDirInUse:
    who = holder.describe() if holder else "another process (it has not written its details yet)"
    waited = f" after waiting {waited_s:.0f} s (training.lock_timeout_s)" if waited_s is not None else ""
    return OutputDirInUse(
        f"training.output_dir {output_dir} is in use by another run: {who}. This run stopped{waited} before "
        "touching the folder. Wait for that run to finish, or give this run another training.output_dir "
        "(e.g. --set training.output_dir=outputs/other), or set training.output_dir_lock=wait to queue "
        "behind it."
    )


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on the file now at `path`, or None when another process holds it.

    The lock file is removed on release, so a file opened just before that removal may be locked
    after it: the lock then guards nothing. Holding the lock counts only when `path` still names the
    locked file.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed in between by a releasing run
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold_output_dir(training: TrainingConfig) -> Iterator[Path]:
    """Hold `training.output_dir` for this process until the block ends; see the module docstring.

    Refused (OutputDirInUse) before anything in the folder is read or changed. When the folder did
    not exist and is still empty at the end, it is removed again, so a run that fails early leaves
    no trace.
    """
    output_dir = Path(training.output_dir).resolve()
    path = output_dir / LOCK_FILE
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None:
            held.depth += 1
    if held is None:
        held = _acquire(output_dir, path, training)
    try:
        yield output_dir
    finally:
        with _HELD_GUARD:
            held.depth -= 1
            last = held.depth == 0
            if last:
                _HELD.pop(path, None)
        if last:
            _release(held)


def _acquire(output_dir: Path, path: Path, training: TrainingConfig) -> _Held:
    existed = output_dir.exists()
    started = time.monotonic()
    announced = False
    while True:
        fd = _try_lock(path)
        if fd is not None:
            break
        holder = read_holder(path)
        if training.output_dir_lock == "fail":
            raise _refusal(output_dir, holder, None)
        waited = time.monotonic() - started
        if waited >= training.lock_timeout_s:
            raise _refusal(output_dir, holder, waited)
        if not announced:
            logger.warning("training.output_dir %s is in use by %s; waiting up to %.0f s for it",
                           output_dir, holder.describe() if holder else "another process", training.lock_timeout_s)
            announced = True
        time.sleep(POLL_INTERVAL_S)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(this_process()), indent=2).encode(), 0)
    os.fsync(fd)
    held = _Held(fd=fd, path=path, created_dir=not existed)
    with _HELD_GUARD:
        _HELD[path] = held
    return held


def _release(held: _Held) -> None:
    """Remove the lock file while still holding it, then let go (closing the fd drops the lock)."""
    with contextlib.suppress(OSError):
        held.path.unlink()
    os.close(held.fd)
    if held.created_dir:
        with contextlib.suppress(OSError):  # not empty (the run wrote something), or gone: keep it
            held.path.parent.rmdir()

