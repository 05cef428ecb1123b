"""The model server's models: one base in memory, many LoRA adapters on it, switched at runtime.

`ModelPool` loads the base once (tasks.modeling.load_model: 4-bit on a GPU, on the CPU as the CPU plan
says) and puts every served adapter on it as a named peft adapter. A served entry (`serving.models`)
points at a *slot*: one loaded adapter (a registry version or a folder). Several entries may share a
slot (`@champion` and `/7` naming the same version load it once).

Switching: the pool watches the registry aliases it serves. When `models:/name@alias` moves, the new
version is downloaded and loaded as a new slot, then the entry is pointed at it in one assignment
under the pool lock. Requests take a lease on their slot when they are accepted, so the old slot stays
loaded until its last in-flight request is answered, and is only then deleted from the model.

`Batcher` answers requests in batches of at most `serving.max_batch_size`, waiting at most
`serving.max_wait_ms` for a batch to fill, through tasks.generation.generate_tokens with peft's
mixed-adapter batches (`adapter_names=`): requests for different adapters share one `generate`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, PipelineConfig, ServedModel
from tasks.adapter import ADAPTER_CONFIG

logger = logging.getLogger(__name__)

BASE_MODEL_NAME = "__base__"  # peft's own name for "no adapter" in a mixed batch, and the API's


class UnknownModel(LookupError):
    """A request named a model the server does not serve."""


@dataclass
class AdapterSlot:
    """One adapter loaded into the shared PeftModel (or the base itself, `peft_name == "__base__"`)."""

    key: str  # "<registered name>/<version>" or the folder's resolved path; "__base__" for none
    peft_name: str
    version: str  # what the API reports as the answering version
    tokenizer: Any
    in_flight: int = 0
    retired: bool = False


@dataclass
class ServedEntry:
    """A name clients use, and the slot answering it now."""

    name: str
    source: str
    slot: AdapterSlot
    registered_name: str | None = None
    alias: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "owned_by": "qlora-pipeline", "source": self.source,
                "version": self.slot.version, "alias": self.alias}


@dataclass
class Lease:
    """A request's hold on the slot that answers it; released once the answer is complete."""

    entry_name: str
    slot: AdapterSlot
    released: bool = False


def parse_registry_source(source: str) -> tuple[str, str | None, str | None]:
    """(registered name, version, alias) of `models:/name/7` or `models:/name@alias`."""
    body = source.removeprefix("models:/").rstrip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias
    name, version = body.rsplit("/", 1)
    return name, version, None


@dataclass
class LocatedAdapter:
    """Where an adapter of `serving.models` (or `qlora export --model`) is, and what it was trained on."""

    key: str  # "<registered name>/<version>", or the folder's resolved path
    folder: Path
    reference: dict[str, Any] | None  # the registered base reference; None for a folder (the config's base)
    registered_name: str | None = None
    version: str | None = None
    alias: str | None = None


def locate_adapter(config: PipelineConfig, source: str, client: Any = None, uri: str | None = None) -> LocatedAdapter:
    """A registry URI's version resolved (alias followed) and its adapter downloaded, or a folder checked."""
    from mlflow.exceptions import MlflowException

    from tasks.registry import download_adapter

    if not source.startswith("models:/"):
        folder = Path(source).resolve()
        if not (folder / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"{source} has no {ADAPTER_CONFIG}; point it at a peft adapter folder "
                              "(<training.output_dir>/adapter) or a models:/<name>@<alias> or models:/<name>/<N> URI")
        return LocatedAdapter(str(folder), folder, None)
    if client is None:
        from tasks.tracking import apply_http_settings, client_for, resolve_tracking_uri

        apply_http_settings(config)
        uri = resolve_tracking_uri(config)
        client = client_for(uri)
    name, version, alias = parse_registry_source(source)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ConfigError(f"{source} not found in the registry at {uri} ({str(exc).splitlines()[0][:200]}); "
                          "register it first or fix the URI") from exc
    reference = json.loads(found.tags["base_model_reference"]) if "base_model_reference" in found.tags else None
    folder = download_adapter(config, name, str(found.version))
    return LocatedAdapter(f"{name}/{found.version}", folder, reference, name, str(found.version), alias)


class ModelPool:
    """The base model, its adapters, and which served name answers with which adapter now."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.model: Any = None
        self.base_tokenizer: Any = None
        self.entries: dict[str, ServedEntry] = {}
        self.slots: dict[str, AdapterSlot] = {}
        self.model_lock = threading.Lock()  # generation, adapter loading and unloading take turns on the model
        self.lock = threading.Lock()  # entries, slots and leases
        self.reference: dict[str, Any] | None = None
        self.switches: list[dict[str, Any]] = []
        self._names = (f"adapter_{n}" for n in itertools.count(1))
        self._client: Any = None
        self._uri: str | None = None

    # ------------------------------------------------------------------------------------------
    # Registry

    def client(self) -> Any:
        if self._client is None:
            from tasks.tracking import apply_http_settings, client_for, resolve_tracking_uri

            apply_http_settings(self.config)
            self._uri = resolve_tracking_uri(self.config)
            self._client = client_for(self._uri)
        return self._client

    def _registered_version(self, name: str, version: str | None, alias: str | None, source: str) -> Any:
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            if alias is not None:
                return client.get_model_version_by_alias(name, alias)
            return client.get_model_version(name, version)
        except MlflowException as exc:
            raise ConfigError(f"serving.models: {source} not found in the registry at {self._uri} "
                              f"({str(exc).splitlines()[0][:200]}); register it first or fix the entry") from exc

    def _locate(self, served: ServedModel) -> tuple[str, Path, dict[str, Any] | None, str | None, str | None]:
        """(slot key, adapter folder, base reference or None, registered name, alias) of one entry."""
        found = locate_adapter(self.config, served.source, self.client(), self._uri)
        return found.key, found.folder, found.reference, found.registered_name, found.alias

    # ------------------------------------------------------------------------------------------
    # Loading

    def _base_reference(self, references: list[dict[str, Any]]) -> dict[str, Any]:
        """The one base every served adapter was trained on; refuses a mix."""
        from tasks.modeling import base_model_reference
        from tasks.registry import base_label

        config_reference = {**base_model_reference(self.config), "quantization": {
            "load_in_4bit": self.config.quantization.load_in_4bit, "quant_type": self.config.quantization.quant_type,
            "double_quant": self.config.quantization.double_quant},
            "trust_remote_code": self.config.model.trust_remote_code}
        chosen = references[0] if references else config_reference
        for reference in references[1:]:
            if base_label(reference) != base_label(chosen):
                raise ConfigError(f"serving.models: adapters of different bases ({base_label(chosen)} and "
                                  f"{base_label(reference)}); one server holds one base: serve them separately")
        return chosen

    def _new_slot(self, key: str, folder: Path, version: str) -> AdapterSlot:
        """Load an adapter folder into the shared model under a fresh peft name (caller holds model_lock)."""
        from peft import PeftModel

        from tasks.modeling import load_tokenizer

        peft_name = next(self._names)
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(folder), adapter_name=peft_name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=peft_name)
        self.model.eval()
        slot = AdapterSlot(key=key, peft_name=peft_name, version=version,
                           tokenizer=load_tokenizer(self.config, folder))
        self.slots[key] = slot
        return slot

    def load(self) -> None:
        """Resolve every served entry, load the base once, and put each distinct adapter on it."""
        from tasks.modeling import load_model, load_tokenizer
        from tasks.pyfunc_model import BaseModelUnavailable, resolve_base, runtime_precision

        if not self.config.serving.models:
            raise ConfigError("serving.models is empty: list the adapters to serve (models:/<name>@champion, "
                              "models:/<name>/<version> or an adapter folder)")
        located = [(served, *self._locate(served)) for served in self.config.serving.models]
        self.reference = self._base_reference([ref for _, _, _, ref, _, _ in located if ref is not None])
        source, revision = resolve_base(self.reference)
        precision = runtime_precision(self.reference.get("quantization") or {}, None)
        try:
            self.model = load_model(source, revision=revision, trust_remote_code=bool(
                self.reference.get("trust_remote_code", False)), **precision)
        except OSError as exc:
            raise BaseModelUnavailable(f"cannot load the base model {source} (revision {revision}): {exc}") from exc
        self.base_tokenizer = load_tokenizer(self.config, source)
        base_slot = AdapterSlot(key=BASE_MODEL_NAME, peft_name=BASE_MODEL_NAME, version="base",
                                tokenizer=self.base_tokenizer)
        with self.model_lock:
            for served, key, folder, _, registered, alias in located:
                slot = self.slots.get(key) or self._new_slot(key, folder, key if registered else folder.name)
                self.entries[served.served_name()] = ServedEntry(served.served_name(), served.source, slot,
                                                                 registered, alias)
        self.entries[BASE_MODEL_NAME] = ServedEntry(BASE_MODEL_NAME, "base", base_slot)
        logger.info("serving %s on %s (%s)", ", ".join(self.entries), source, precision)

    # ------------------------------------------------------------------------------------------
    # Leases

    def acquire(self, name: str) -> Lease:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                raise UnknownModel(name)
            entry.slot.in_flight += 1
            return Lease(name, entry.slot)

    def release(self, lease: Lease) -> None:
        with self.lock:  # idempotent: a stream's generator and its background task may both release
            if lease.released:
                return
            lease.released = True
            lease.slot.in_flight -= 1
            unload = lease.slot.retired and lease.slot.in_flight == 0
        if unload:  # not in the caller's thread: it may be the event loop, and a batch may hold the model
            threading.Thread(target=self._unload, args=(lease.slot,), name="qlora-unload", daemon=True).start()

    def _unload(self, slot: AdapterSlot) -> None:
        with self.model_lock:
            if slot.peft_name in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(slot.peft_name)
        logger.info("unloaded %s (%s)", slot.key, slot.peft_name)

    def describe(self) -> list[dict[str, Any]]:
        with self.lock:
            return [entry.describe() for entry in self.entries.values()]

    # ------------------------------------------------------------------------------------------
    # Switching

    def refresh(self) -> list[dict[str, Any]]:
        """Follow every served alias that moved: load the new version, switch, retire the old one."""
        from tasks.registry import download_adapter

        switched = []
        for entry in [e for e in self.entries.values() if e.alias is not None]:
            found = self._registered_version(entry.registered_name, None, entry.alias, entry.source)
            key = f"{entry.registered_name}/{found.version}"
            if key == entry.slot.key:
                continue
            slot = self.slots.get(key)
            if slot is None:
                folder = download_adapter(self.config, entry.registered_name, str(found.version))  # outside locks
                with self.model_lock:
                    slot = self._new_slot(key, folder, key)
            with self.lock:
                old, entry.slot = entry.slot, slot
                unload = self._retire_if_unused(old)
            if unload:
                self._unload(old)
            change = {"model": entry.name, "from": old.version, "to": slot.version, "at": time.time()}
            self.switches.append(change)
            switched.append(change)
            logger.info("switched %s from %s to %s", entry.name, old.version, slot.version)
        return switched

    def _retire_if_unused(self, slot: AdapterSlot) -> bool:
        """Mark a slot no entry points at as retired; True when it can be unloaded now (caller holds lock)."""
        if any(entry.slot is slot for entry in self.entries.values()):
            return False
        slot.retired = True
        self.slots.pop(slot.key, None)
        return slot.in_flight == 0

    def watch(self, interval_s: float, stop: threading.Event) -> threading.Thread:
        """A daemon thread calling `refresh` every `interval_s`; registry errors are logged, serving goes on."""
        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception as exc:  # an unreachable registry must not stop serving
                    logger.warning("alias check failed, still serving the loaded versions: %s", exc)

        thread = threading.Thread(target=loop, name="qlora-alias-watch", daemon=True)
        thread.start()
        return thread


# ----------------------------------------------------------------------------------------------
# Batching


@dataclass
class Job:
    """One prompt to answer; `on_token` (streaming) gets each new token id as it is generated."""

    prompt_ids: list[int]
    lease: Lease
    max_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    on_token: Callable[[int], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    batch_size: int = 0

    def sampling(self) -> tuple[bool, float]:
        return (self.do_sample, self.temperature if self.do_sample else 1.0)


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos) or "length" (max_tokens)
    batch_size: int


class _BatchStreamer:
    """transformers' streamer protocol for a whole batch: hands each row's new token to its job."""

    def __init__(self, jobs: list[Job], eos: set[int]) -> None:
        self.jobs, self.eos = jobs, eos
        self.prompt_seen = False
        self.done = [job.on_token is None for job in jobs]
        self.counts = [0] * len(jobs)

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.eos:
                self.done[row] = True
                continue
            self.counts[row] += 1
            self.jobs[row].on_token(token)
            if self.counts[row] >= self.jobs[row].max_tokens:
                self.done[row] = True

    def end(self) -> None:
        pass


def finish(job: Job, new_tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    """A row's own answer from its batch's output: cut at eos or at the job's max_tokens."""
    for index, token in enumerate(new_tokens[:job.max_tokens]):
        if token in eos:
            return new_tokens[:index], "stop"
    return new_tokens[:job.max_tokens], "length"


class Batcher:
    """A worker thread that answers queued jobs in bounded batches, several adapters per batch."""

    def __init__(self, pool: ModelPool, max_batch_size: int, max_wait_ms: float,
                 on_batch: Callable[[list[Job], float], None] | None = None) -> None:
        self.pool, self.max_batch_size, self.max_wait_s = pool, max_batch_size, max_wait_ms / 1000
        self.on_batch = on_batch
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="qlora-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self.cond:
            if self.stopped:
                raise RuntimeError("the server is shutting down")
            self.pending.append(job)
            self.cond.notify_all()
        return job.future

    def _take(self) -> list[Job]:
        """Up to max_batch_size jobs with the first one's sampling, after waiting at most max_wait for it."""
        with self.cond:
            while not self.pending and not self.stopped:
                self.cond.wait()
            if self.stopped and not self.pending:
                return []
            deadline = self.pending[0].enqueued + self.max_wait_s
            key = self.pending[0].sampling()
            while (sum(job.sampling() == key for job in self.pending) < self.max_batch_size
                   and (left := deadline - time.monotonic()) > 0 and not self.stopped):
                self.cond.wait(left)
            batch = [job for job in self.pending if job.sampling() == key][:self.max_batch_size]
            for job in batch:
                self.pending.remove(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._answer(batch)
            except Exception as exc:
                logger.exception("batch of %d failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _answer(self, batch: list[Job]) -> None:
        from tasks.generation import generate_tokens, generation_config

        tokenizer = self.pool.base_tokenizer
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        first = batch[0]
        config = generation_config(tokenizer, max(job.max_tokens for job in batch), first.do_sample,
                                   first.temperature)
        streamer = _BatchStreamer(batch, eos) if any(job.on_token for job in batch) else None
        started = time.monotonic()
        with self.pool.model_lock:
            outputs = generate_tokens(self.pool.model, tokenizer, [job.prompt_ids for job in batch], config,
                                      adapter_names=[job.lease.slot.peft_name for job in batch], streamer=streamer)
        elapsed = time.monotonic() - started
        for job, new_tokens in zip(batch, outputs, strict=True):
            tokens, reason = finish(job, new_tokens, eos)
            text = job.lease.slot.tokenizer.decode(tokens, skip_special_tokens=True)
            job.batch_size = len(batch)
            job.future.set_result(Answer(text=text, token_ids=tokens, finish_reason=reason, batch_size=len(batch)))
        if self.on_batch is not None:
            self.on_batch(batch, elapsed)
