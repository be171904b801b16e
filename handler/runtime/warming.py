"""Warm-up coordination: the initializer (`POST /initialize`, or a background thread at worker start).

It preloads the warm-up checkpoints and runs each one's warm-up shapes (warmup.initializer) as real txt2img
generations through the request path (planning, device job, PNG, infotext, base64) minus HTTP and metering, so
the first real request finds all of it warm. It is idempotent: a second call, or one made while the first runs,
waits for it and loads nothing. Its start and end move the worker's state (handler.runtime.admission: STARTING,
then READY or FAILED). After a warm-up the records schema is made ready and every checkpoint is hashed in the
background.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from handler.contract.schemas import Txt2ImgRequest
from handler.records.db import Database
from handler.runtime.admission import Admission
from handler.runtime.consumer_options import ConsumerOptions
from handler.runtime.engine import Engine
from handler.runtime.flow import GenerationFlow
from handler.settings import Settings, WarmupShape
from pipelines.errors import ModelNotFound
from pipelines.store import CheckpointEntry, ModelStore

log = logging.getLogger(__name__)


class Warmer:
    """Runs the warm-up of one worker; `report` is the last successful one's (None before)."""

    def __init__(self, settings: Settings, *, store: ModelStore, options: ConsumerOptions, admission: Admission,
                 engine: Engine, flow: GenerationFlow, db: Database | None) -> None:
        self.settings = settings
        self.store = store
        self.options = options
        self.admission = admission
        self.engine = engine
        self.flow = flow
        self.db = db
        self._lock = threading.Lock()
        self.report: dict[str, Any] | None = None

    def start(self) -> None:
        """Warm up in a background thread (worker start); the state is STARTING from this call on."""
        self.admission.begin_warm_up()

        def run() -> None:
            try:
                self.warmup()
            except Exception:
                pass  # logged by warmup(); the state says FAILED

        threading.Thread(target=run, name="sdfunc-warmup", daemon=True).start()

    def warmup(self) -> dict[str, Any]:
        """Preload the warm-up checkpoints and run their warm-up shapes; the report. Refused (503) once pre-stop
        was called; a second call returns the first report with `warmed` false."""
        self.admission.refuse_if_stopping()
        with self._lock:
            if self.report is not None:
                self.admission.end_warm_up(None)
                return {**self.report, "warmed": False, "cold_start": self.engine.coldstart.report()}
            started = time.perf_counter()
            self.admission.begin_warm_up()
            ok: bool | None = None  # stays None when a BaseException interrupts it: FAILED is for errors
            try:
                names = self.settings.warmup.checkpoints
                entries = ([self.store.find_checkpoint(n) for n in names] if names
                           else [self.options.default_checkpoint(None)])
                if len(entries) > self.settings.max_loaded_models:
                    log.warning("warm-up names %d checkpoints but max_loaded_models is %d: the first ones will "
                                "be evicted", len(entries), self.settings.max_loaded_models)
                with self.admission.admitted():
                    records = self._warm(entries)
                ok = True
            except Exception:
                log.exception("warm-up failed")
                ok = False
                raise
            finally:
                self.admission.end_warm_up(ok)
            seconds = time.perf_counter() - started
            self.report = {"status": "READY", "checkpoints": records, "seconds": round(seconds, 3)}
            self._prepare_records()
            log.info("warm-up done in %.2f s (%s)", seconds, ", ".join(r["checkpoint"] for r in records))
            threading.Thread(target=self._hash_all, name="sdfunc-hash", daemon=True).start()
            return {**self.report, "warmed": True, "cold_start": self.engine.coldstart.report()}

    def _warm(self, entries: list[CheckpointEntry]) -> list[dict[str, Any]]:
        """Each warm-up generation is a real txt2img through the request path (validation, device job, PNG,
        infotext, base64), minus HTTP and metering: the first real request finds all of it warm."""
        from warmup.initializer import warm_up

        def load(entry: CheckpointEntry) -> Any:
            return self.engine.device.run(self.engine.load, entry)[0]

        def generate(entry: CheckpointEntry, shape: Any) -> float:
            return self.flow.run("txt2img", warmup_request(entry, shape), "", None).generation_seconds

        return warm_up(entries, self.settings.warmup.shapes, load, generate)

    def _prepare_records(self) -> None:
        """Create or upgrade the records schema now rather than in the first request (failures are logged;
        requests retry and answer 503 while the database is unreachable)."""
        if self.db is None:
            return
        try:
            self.db.ready()
        except Exception:
            log.exception("records database not ready")

    def _hash_all(self) -> None:
        """Hash every checkpoint once, in the background, so listings show titles with hashes (the hashes
        persist in <data>/cache/sha256.json, so each file is read once per mount, not once per instance)."""
        for entry in self.store.checkpoints:
            try:
                self.store.sha256(entry)
            except (OSError, ModelNotFound):
                log.warning("could not hash %s", entry.name)


def warmup_request(entry: CheckpointEntry, shape: WarmupShape) -> Txt2ImgRequest:
    """The txt2img request that warms `entry` at `shape`: Euler, fixed seed, nothing saved."""
    return Txt2ImgRequest(prompt="warm-up", seed=0, steps=shape.steps, width=shape.width, height=shape.height,
                          sampler_name="Euler", override_settings={"sd_model_checkpoint": entry.name})
