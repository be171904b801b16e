"""The worker's composition root: one `Service` per worker process, built by the app factory.

It builds the worker's parts and wires them, and offers the thin entry points the API layer, the task runner
and the CLI call. The work is in the runtime room's modules, each with one job:

- handler.runtime.admission: the state (STARTING, READY, BUSY, FAILED, STOPPING) and what it lets in;
- handler.runtime.planning: a request -> a validated generation plan (every 422 before any device work);
- handler.runtime.flow: admit, plan, run the plan on the device thread (alone or batched), charge;
- handler.runtime.engine: the one device thread, the warm pipeline cache, model loading, memory release;
- handler.runtime.respond: the A1111 / PAI-EAS response body and the image records;
- handler.runtime.extras: the extras routes (upscale, face restoration) as metered, charged requests;
- handler.runtime.upscaling: the upscaler and face-restoration models;
- handler.runtime.warming: the initializer; handler.runtime.controlnets: the ControlNet models;
- handler.runtime.consumer_options: each consumer's A1111 options.

Nothing heavy happens in the constructor: torch and diffusers load on first use or at warm-up.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from handler.contract.options import MemoryOptionsStore, OptionsStore
from handler.contract.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from handler.errors import InvalidRequest
from handler.logs import flush_logs
from handler.records import metering
from handler.records.billing import Pricing
from handler.records.consumers import Consumers
from handler.records.db import Database
from handler.records.ledger import Ledger
from handler.records.queue import QueueStore
from handler.records.tasks import TaskStore
from handler.runtime import planning
from handler.runtime.admission import Admission
from handler.runtime.batching import Batcher
from handler.runtime.coldstart import ColdStart
from handler.runtime.consumer_options import ConsumerOptions
from handler.runtime.controlnets import ControlNets
from handler.runtime.eas_queue import QueueService
from handler.runtime.engine import Engine
from handler.runtime.executor import DeviceExecutor
from handler.runtime.extras import ExtrasFlow
from handler.runtime.flow import Collaborators, GenerationFlow
from handler.runtime.metrics import Metrics
from handler.runtime.planning import Planner
from handler.runtime.progress import Progress
from handler.runtime.respond import Responder
from handler.runtime.task_progress import TaskProgress
from handler.runtime.tasks import TaskRunner, check_callback_url, public_view
from handler.runtime.upscaling import Upscaling
from handler.runtime.warming import Warmer
from handler.security import lifecycle_key as lifecycle
from handler.security.auth import Authenticator
from handler.settings import Settings
from handler.storage.backends import make_storage
from pipelines.adapters.embeddings import EmbeddingStore
from pipelines.adapters.lora import LoraAdapters, LoraStore
from pipelines.hashing import HashCache, addnet_hash
from pipelines.prefetch import PrefetchWatch
from pipelines.store import CheckpointEntry, ModelStore
from pipelines.styles import StyleStore

log = logging.getLogger(__name__)


class Service:
    """Everything a worker needs to answer requests; built by the app factory.

    It implements handler.runtime.ports.WorkerStatus for the metrics. The parts it wires: `admission`,
    `engine` (device thread and warm pipelines), `planner`, `responder`, `flow`, `warmer`, `controlnet_models`,
    `consumer_options`, and the stores, records and security objects the API layer reads directly.
    """

    def __init__(self, settings: Settings, options_store: OptionsStore | None = None) -> None:
        self.settings = settings
        settings.ensure_layout()
        self.store = ModelStore(settings.checkpoints_dir, settings.vae_dir, HashCache(settings.cache_dir / "sha256.json"))
        self.loras = LoraStore(
            settings.lora_dir,
            HashCache(settings.cache_dir / "addnet.json", compute=addnet_hash),
            max_per_prompt=settings.max_loras_per_prompt,
        )
        self.lora_adapters = LoraAdapters(settings.max_loaded_loras)
        self.embeddings = EmbeddingStore(settings.data_dir / "embeddings", self.store.hashes)
        self.styles = StyleStore(settings.data_dir / "styles.csv")
        self.controlnet_models = ControlNets(settings.models_dir / "ControlNet")
        self.consumer_options = ConsumerOptions(settings, self.store, options_store or MemoryOptionsStore())
        self.storage = make_storage(settings)
        self.progress = Progress()
        self.coldstart = ColdStart()
        self.metrics = Metrics(self, enabled=settings.metrics)
        self.engine = Engine(settings, self.store, self.coldstart, self.controlnet_models,
                             cold_start_done=self.metrics.cold_start_done, prefetch=PrefetchWatch.from_env())
        self.batcher = Batcher(settings.batch)
        self.admission = Admission(settings, device_busy=lambda: self.device_busy)
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pricing = Pricing(settings.billing)
        # The records database is opened lazily (no connection until the first use) and migrated then.
        self.db = Database(settings.resolved_database_url) if settings.record_requests else None
        self.ledger = Ledger(self.db, settings.billing.currency) if self.db is not None else None
        self.consumers = Consumers(self.db) if self.db is not None else None
        self.auth = Authenticator(settings.auth, self.consumers)
        # The lifecycle hooks need this key (or an admin), in every auth mode: handler/security/lifecycle_key.py.
        self.lifecycle_key = lifecycle.create_key(lifecycle.key_file(settings.port))
        self.upscaling = Upscaling(settings, self.engine)
        self.planner = Planner(settings, store=self.store, loras=self.loras, styles=self.styles,
                               options=self.consumer_options, storage=self.storage, controlnets=self.controlnet_models,
                               upscaling=self.upscaling)
        self.responder = Responder(settings, store=self.store, loras=self.loras, embeddings=self.embeddings,
                                   storage=self.storage)
        self.flow = GenerationFlow(settings, Collaborators(
            admission=self.admission, engine=self.engine, planner=self.planner, responder=self.responder,
            batcher=self.batcher, progress=self.progress, lora_adapters=self.lora_adapters,
            embeddings=self.embeddings, controlnets=self.controlnet_models, pricing=self.pricing, ledger=self.ledger))
        self.extras = ExtrasFlow(settings, admission=self.admission, engine=self.engine, progress=self.progress,
                                 upscaling=self.upscaling, options=self.consumer_options, pricing=self.pricing,
                                 ledger=self.ledger, storage=self.storage)
        self.warmer = Warmer(settings, store=self.store, options=self.consumer_options, admission=self.admission,
                             engine=self.engine, flow=self.flow, db=self.db)
        self.tasks = TaskStore(self.db) if self.db is not None else None
        self.queues = (QueueService(QueueStore(self.db), max_watchers=settings.tasks.max_watchers,
                                    poll_seconds=settings.tasks.watch_poll_seconds,
                                    stopping=lambda: self.admission.stopping)
                       if self.db is not None else None)
        self.task_runner = (TaskRunner(self, self.tasks, settings.tasks,
                                       on_finished=self.queues.notify if self.queues is not None else None)
                            if self.tasks is not None else None)
        self.task_progress = TaskProgress(self.progress, self.tasks)

    # state (handler.runtime.ports.WorkerStatus) ---------------------------------------------------------
    @property
    def state(self) -> str:
        return self.admission.state

    @property
    def accepts_tasks(self) -> bool:
        """READY or BUSY, with a free place in the queue: a task runner may claim a task."""
        return self.state in ("READY", "BUSY") and self.admission.generations <= self.settings.queue.max_waiting

    @property
    def queue_watchers(self) -> int:
        return self.queues.watching if self.queues is not None else 0

    @property
    def in_flight(self) -> int:
        """Generation requests admitted and not yet answered."""
        return self.admission.in_flight

    @property
    def queue_depth(self) -> int:
        return self.engine.device.queued

    @property
    def device_busy(self) -> bool:
        return self.engine.device.pending > 0

    @property
    def started_at(self) -> float:
        return self.coldstart.started_at

    def cold_start_report(self) -> dict[str, Any]:
        return self.coldstart.report()

    def cache_report(self) -> dict[str, Any] | None:
        cache = self.engine.cache_if_loaded
        return cache.report() if cache is not None else None

    def cache_device(self) -> str | None:
        cache = self.engine.cache_if_loaded
        return cache.device if cache is not None else None

    def retry_after(self) -> int:
        """Seconds until the device is likely to take one more request (handler.runtime.admission)."""
        return self.admission.retry_after()

    # models ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> DeviceExecutor:
        """The one thread that loads and generates."""
        return self.engine.device

    @property
    def cache(self) -> Any:  # -> pipelines.cache.PipelineCache (imports torch lazily)
        return self.engine.cache

    @property
    def cache_if_loaded(self) -> Any:
        """The PipelineCache if one exists, else None; never imports torch."""
        return self.engine.cache_if_loaded

    def device_name(self) -> str:
        """The device pipelines run on, or the configured value before the first load (no torch import)."""
        return self.engine.device_name()

    def loaded_models(self) -> list[str]:
        """Titles of the warm pipelines (empty before the first load)."""
        return self.engine.loaded_models()

    @property
    def controlnets(self) -> Any:
        """The ControlNet models folder (pipelines.controlnet.store.ControlNetStore), made on first use."""
        return self.controlnet_models.store

    # options --------------------------------------------------------------------------------------------
    @property
    def options_store(self) -> OptionsStore:
        return self.consumer_options.options_store

    @options_store.setter
    def options_store(self, value: OptionsStore) -> None:
        self.consumer_options.options_store = value

    def options(self, consumer: str) -> dict[str, Any]:
        """A1111's defaults overlaid with what the caller set."""
        return self.consumer_options.options(consumer)

    def default_checkpoint(self, consumer: str | None) -> CheckpointEntry:
        """The caller's `sd_model_checkpoint` option (none for consumer None), else the configured default,
        else the first found."""
        return self.consumer_options.default_checkpoint(consumer)

    def get_options(self, consumer: str) -> dict[str, Any]:
        return self.consumer_options.get(consumer)

    def set_options(self, consumer: str, values: dict[str, Any]) -> None:
        """Validate every key first (422 / 404), then store all of them: all or nothing."""
        self.consumer_options.set(consumer, values)

    # lifecycle ------------------------------------------------------------------------------------------
    def start_warmup(self) -> None:
        """Warm up in a background thread (worker start); the state is STARTING from this call on."""
        self.warmer.start()

    def warmup(self) -> dict[str, Any]:
        """The initializer (handler.runtime.warming): idempotent; refused (503) once pre-stop was called."""
        return self.warmer.warmup()

    def stop(self) -> dict[str, Any]:
        """FC pre-stop: refuse new work, wait up to `prestop_grace_seconds` for admitted requests, then
        release the device memory and flush the logs. Idempotent."""
        started = time.perf_counter()
        waited_for, drained, left = self.admission.stop(self.settings.prestop_grace_seconds)
        if self.task_runner is not None:
            self.task_runner.stop()  # tasks still queued here are adopted by a live instance after tasks.stale_seconds
        released = self.engine.device.run(self.engine.release) if drained else 0
        if self.db is not None:
            self.db.dispose()  # every charge was committed before its response: nothing is left to flush
        flush_logs()
        waited = time.perf_counter() - started
        log.info("pre-stop: %s after %.2f s, %d model(s) released", "drained" if drained else
                 f"{left} request(s) still running", waited, released)
        return {"status": "stopped", "drained": drained, "waited_for": waited_for, "in_flight": left,
                "waited_seconds": round(waited, 3), "released_models": released}

    # generation -----------------------------------------------------------------------------------------
    def txt2img(self, req: Txt2ImgRequest, consumer: str) -> dict[str, Any]:
        return self.flow.generate("txt2img", req, consumer)

    def img2img(self, req: Img2ImgRequest, consumer: str) -> dict[str, Any]:
        return self.flow.generate("img2img", self.planner.img2img_request(req), consumer)

    @staticmethod
    def require_init_image(req: Img2ImgRequest) -> None:
        """img2img needs `init_images` or PAI-EAS `alwayson_scripts.image_link`, not both: 422
        (handler.runtime.planning.require_init_image)."""
        planning.require_init_image(req)

    # asynchronous tasks ---------------------------------------------------------------------------------
    def submit_task(self, mode: str, req: GenerationRequest, consumer: str, *, tag: str | None,
                    callback_url: str | None, queue: str | None = None,
                    tags: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]:
        """Queue `req` as a task (handler.runtime.tasks), on the PAI-EAS input queue `queue` with `tags` when given;
        returns its public view (with `index`, its place in that queue) and whether it is new (the same request
        id from the same consumer returns the existing task)."""
        if self.tasks is None or self.task_runner is None:
            raise InvalidRequest("async: tasks need the records database (SDFUNC_RECORD_REQUESTS=true)", field="async")
        self.admission.refuse_if_stopping()
        meter = metering.current()
        if callback_url:
            check_callback_url(callback_url, allow_private=self.settings.tasks.callback_allow_private,
                               network=self.settings.network)
        self.engine.import_runtime()
        self.planner.validate(req, consumer)  # a bad request is a 422 now, not a failed task later
        request_id = meter.request_key if meter is not None else uuid.uuid4().hex
        task, created = self.tasks.create(consumer=consumer, request_id=request_id, mode=mode, tag=tag,
                                          # what the client sent: the run applies defaults and infotext as a
                                          # synchronous request does (Planner.deployment_defaults)
                                          request_json=req.model_dump_json(exclude_unset=True),
                                          callback_url=callback_url, queue=queue, tags=tags)
        if created:
            self.task_runner.wake()
        if meter is not None:
            meter.recorded = True  # the ledger row is the task's, written when it runs
        view = public_view(task)
        if task.get("index") is not None:
            view["index"] = int(task["index"])
        return view, created

    def task_position(self, task_id: str) -> int | None:
        """A queued task's place among those no worker has taken yet (1: next), or None."""
        return self.tasks.position(task_id) if self.tasks is not None else None

    def task_snapshot(self, task_id: str, consumer: str) -> dict[str, Any] | None:
        """Where `consumer`'s task running on this worker is (steps, progress, ETA), for other instances to show."""
        return self.progress.task_snapshot(task_id, consumer)

    def task_view(self, task_id: str, consumer: str | None) -> dict[str, Any] | None:
        """GET /tasks/<id>: the task's public view with its `progress` (handler.runtime.task_progress), or None
        when there is no such task of `consumer` (None: an admin, any consumer's)."""
        if self.tasks is None:
            return None
        task = self.tasks.get(task_id, consumer=consumer)
        if task is None:
            return None
        return {**public_view(task), "progress": self.task_progress.task_view(task)}

    def task_request(self, mode: str, data: dict[str, Any], task_id: str) -> GenerationRequest:
        """The stored request of a task, set to save its images to storage and tagged with the task id (which
        also makes the response EAS-shaped: `parameters.image_url`, `seed`, `status`...)."""
        scripts = {**(data.get("alwayson_scripts") or {}), "id_task": task_id}
        values = {**data, "alwayson_scripts": scripts, "save_images": True, "send_images": False}
        return (Txt2ImgRequest if mode == "txt2img" else Img2ImgRequest).model_validate(values)
