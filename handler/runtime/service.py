"""The function's runtime: request -> validated job -> warm pipeline -> A1111 response.

One `Service` per worker process. It owns the model store, the warm pipeline cache, the options store, the
job progress and the device executor: one thread loads and generates, one job at a time, and the HTTP
threads only validate, wait for it and encode.
Nothing heavy happens in the constructor: torch and diffusers load on first use or at warm-up.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from handler.contract import a1111
from handler.security import lifecycle_key as lifecycle
from handler.records import metering
from handler.storage import outputs
from handler.runtime import stages
from handler.security.auth import Authenticator
from handler.records.consumers import Consumers
from handler.runtime.batching import Batcher, Member
from handler.records.billing import Pricing
from handler.runtime.coldstart import ColdStart
from handler.records.db import Database
from handler.errors import Busy, InvalidRequest, NotReady, Timeout, out_of_memory
from handler.runtime.executor import DeviceExecutor, JobTimeout
from handler.contract.images import b64, decode_image, read_image
from handler.records.ledger import ImageRecord, Ledger
from handler.logs import flush_logs
from handler.runtime.metrics import Metrics
from handler.contract.options import DEFAULT_OPTIONS, MemoryOptionsStore, OptionsStore, check_option_value
from handler.runtime.progress import Progress
from handler.contract.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from handler.settings import Settings, WarmupShape
from handler.storage.backends import make_storage
from handler.runtime.tasks import TaskRunner, check_callback_url, public_view
from handler.records.tasks import TaskStore
from pipelines.errors import ModelNotFound
from pipelines.hashing import HashCache, addnet_hash
from pipelines.styles import StyleStore
from pipelines.adapters.embeddings import EmbeddingStore, encoder_dims
from pipelines.adapters.lora import LoraAdapters, LoraStore
from pipelines.store import CheckpointEntry, ModelStore, VaeEntry, format_title

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A generation's A1111 response body and the image records it makes."""

    response: dict[str, Any]
    records: list[ImageRecord]
    generation_seconds: float


CONTROLNET_CACHE = 2  # ControlNet models kept loaded (A1111's control_net_model_cache_size default)


@dataclass
class Selection:
    """The models one request runs on and the options it sees."""

    checkpoint: CheckpointEntry
    vae: VaeEntry | None
    clip_skip: int
    options: dict[str, Any]


class Service:
    """Everything a worker needs to answer requests; built by the app factory.

    State: STARTING (a warm-up is pending or running), READY, BUSY (the device is running a job), FAILED
    (the last warm-up failed), STOPPING (pre-stop was called; new work gets 503).
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
        self._controlnets: Any = None
        self._controlnet_models: collections.OrderedDict[tuple[str, str, str], Any] = collections.OrderedDict()
        self.options_store: OptionsStore = options_store or MemoryOptionsStore()
        self.storage = make_storage(settings)
        self.progress = Progress()
        self.device = DeviceExecutor()  # the one thread that loads and generates
        self.batcher = Batcher(settings.batch)
        self.coldstart = ColdStart()
        self.metrics = Metrics(self, enabled=settings.metrics)
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pricing = Pricing(settings.billing)
        # The records database is opened lazily (no connection until the first use) and migrated then.
        self.db = Database(settings.resolved_database_url) if settings.record_requests else None
        self.ledger = Ledger(self.db, settings.billing.currency) if self.db is not None else None
        self.consumers = Consumers(self.db) if self.db is not None else None
        self.auth = Authenticator(settings.auth, self.consumers)
        # With auth on, the lifecycle hooks need this key (or an admin): handler/security/lifecycle_key.py.
        self.lifecycle_key = (lifecycle.create_key(lifecycle.key_file(settings.port))
                              if settings.auth.mode != "none" else None)
        self.tasks = TaskStore(self.db) if self.db is not None else None
        self.task_runner = TaskRunner(self, self.tasks, settings.tasks) if self.tasks is not None else None
        self._device_type: str | None = None
        self._cache = None
        self._cache_lock = threading.Lock()
        self._warm_lock = threading.Lock()
        self._warm_report: dict[str, Any] | None = None
        self._warming = False  # a warm-up is scheduled or running
        self._warm_done = threading.Event()  # set when no warm-up is scheduled or running
        self._warm_done.set()
        self._failed = False
        self._stopping = False
        self._work = threading.Condition()  # guards the counts below; notified when admitted work ends
        self._in_flight = 0  # admitted generation requests and warm-up
        self._generations = 0  # admitted generation requests: the running one and those waiting (queue.max_waiting)
        self._service_seconds: float | None = None  # moving average of one generation job's device time

    @property
    def state(self) -> str:
        if self._stopping:
            return "STOPPING"
        if self._warming:
            return "STARTING"
        if self._failed:
            return "FAILED"
        return "BUSY" if self.device.pending else "READY"

    @property
    def in_flight(self) -> int:
        """Generation requests admitted and not yet answered."""
        with self._work:
            return self._in_flight

    # models ---------------------------------------------------------------------------------------------
    @property
    def cache(self):  # -> pipelines.cache.PipelineCache (imports torch lazily)
        with self._cache_lock:
            if self._cache is None:
                from pipelines.cache import PipelineCache

                device = self.settings.resolved_device()
                cfg = self.settings.cache
                load_options = {"direct_to_device": cfg.direct_to_device}
                if cfg.copy_to_local:
                    load_options.update(local_dir=cfg.resolved_local_dir, local_max_bytes=cfg.local_max_bytes)
                self._cache = PipelineCache(
                    self.store, device=device, dtype=self.settings.resolved_dtype(device),
                    capacity=self.settings.max_loaded_models, device_bytes=cfg.device_bytes,
                    device_fraction=cfg.device_fraction, host_bytes=cfg.host_bytes, load_options=load_options,
                    compile_cache_dir=str(self.settings.compile_cache_dir) if self.settings.warmup.compile else None,
                )
            return self._cache

    @property
    def cache_if_loaded(self) -> Any:
        """The PipelineCache if one exists, else None; never imports torch."""
        return self._cache

    def device_name(self) -> str:
        """The device pipelines run on, or the configured value before the first load (no torch import)."""
        return self._cache.device if self._cache is not None else self.settings.device

    def device_type(self) -> str:
        """What billing prices: `cpu`, or the GPU's model name (`NVIDIA H100 80GB HBM3`)."""
        if self._device_type is None:
            device = self.device_name()
            if device.startswith("cuda"):
                import torch

                self._device_type = torch.cuda.get_device_name(torch.device(device))
            else:
                self._device_type = device
        return self._device_type

    def _load(self, checkpoint: CheckpointEntry, vae: VaeEntry | None = None) -> tuple[Any, float | None]:
        """The warm pipeline for (checkpoint, vae) and the seconds spent loading it (None on a hit). Runs
        on the device thread; loads during the cold start go into its breakdown."""
        self.coldstart.import_runtime()  # timed before the cache resolves the device (which imports torch)
        cache = self.cache
        self.coldstart.init_device(cache.device)
        stats = cache.stats
        before, phases = stats.loads + stats.host_hits, dict(stats.phase_seconds)  # from disk or from host RAM
        started = time.perf_counter()
        model = cache.get(checkpoint, vae)
        if stats.loads + stats.host_hits == before:
            return model, None
        for name, total in cache.stats.phase_seconds.items():
            self.coldstart.record(name, total - phases.get(name, 0.0))
        return model, time.perf_counter() - started

    def _first_image(self, seconds: float) -> None:
        """A generation finished on the device: part of the cold start until the first one completes it."""
        self.coldstart.record("first_generation", seconds)
        if self.coldstart.complete():
            self.metrics.cold_start_done()
            report = self.coldstart.report()
            log.info("cold start: %.2f s to the first image (%s)", report["total_seconds"],
                     ", ".join(f"{k} {v:.2f} s" for k, v in report["phases"].items()),
                     extra={"fields": {"cold_start": report}})

    def options(self, consumer: str) -> dict[str, Any]:
        """A1111's defaults overlaid with what the caller set."""
        return {**DEFAULT_OPTIONS, **self.options_store.get(consumer)}

    def default_checkpoint(self, consumer: str | None) -> CheckpointEntry:
        """The caller's `sd_model_checkpoint` option (none for consumer None), else the configured default,
        else the first found."""
        mine = self.options_store.get(consumer).get("sd_model_checkpoint") if consumer is not None else None
        return self._checkpoint_or_default(mine)

    def _checkpoint_or_default(self, chosen: str | None) -> CheckpointEntry:
        chosen = chosen or self.settings.default_checkpoint
        if chosen:
            return self.store.find_checkpoint(chosen)
        entries = self.store.checkpoints
        if not entries:
            raise NotReady("no checkpoint under models/Stable-diffusion; add one or run `sdfunc demo-models`")
        return entries[0]

    def start_warmup(self) -> None:
        """Warm up in a background thread (worker start); the state is STARTING from this call on."""
        self._warming = True
        self._warm_done.clear()

        def run() -> None:
            try:
                self.warmup()
            except Exception:
                pass  # logged by warmup(); the state says FAILED

        threading.Thread(target=run, name="sdfunc-warmup", daemon=True).start()

    def warmup(self) -> dict[str, Any]:
        """The initializer: preload the warm-up checkpoints and run their warm-up shapes (warmup/). Idempotent:
        a second call (or one made while the first runs) waits for it and loads nothing. Refused (503) once
        pre-stop was called."""
        if self._stopping:
            raise _stopping_error(self.settings.warmup.retry_after)
        with self._warm_lock:
            if self._warm_report is not None:
                self._warming = False
                self._warm_done.set()
                return {**self._warm_report, "warmed": False, "cold_start": self.coldstart.report()}
            started = time.perf_counter()
            self._warming = True
            self._warm_done.clear()
            try:
                names = self.settings.warmup.checkpoints
                entries = [self.store.find_checkpoint(n) for n in names] if names else [self.default_checkpoint(None)]
                if len(entries) > self.settings.max_loaded_models:
                    log.warning("warm-up names %d checkpoints but max_loaded_models is %d: the first ones will "
                                "be evicted", len(entries), self.settings.max_loaded_models)
                with self._admitted():
                    records = self._warm(entries)
            except Exception:
                log.exception("warm-up failed")
                self._failed = True
                raise
            finally:
                self._warming = False
                self._warm_done.set()
            self._failed = False
            seconds = time.perf_counter() - started
            self._warm_report = {"status": "READY", "checkpoints": records, "seconds": round(seconds, 3)}
            self._prepare_records()
            log.info("warm-up done in %.2f s (%s)", seconds, ", ".join(r["checkpoint"] for r in records))
            threading.Thread(target=self._hash_all, name="sdfunc-hash", daemon=True).start()
            return {**self._warm_report, "warmed": True, "cold_start": self.coldstart.report()}

    def _warm(self, entries: list[CheckpointEntry]) -> list[dict[str, Any]]:
        """Each warm-up generation is a real txt2img through the request path (validation, device job, PNG,
        infotext, base64), minus HTTP and metering: the first real request finds all of it warm."""
        from warmup.initializer import warm_up

        def load(entry: CheckpointEntry) -> Any:
            return self.device.run(self._load, entry)[0]

        def generate(entry: CheckpointEntry, shape: Any) -> float:
            return self._run_generation("txt2img", _warmup_request(entry, shape), "", None).generation_seconds

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

    def loaded_models(self) -> list[str]:
        """Titles of the warm pipelines (empty before the first load)."""
        return [m.title for m in self._cache.loaded()] if self._cache is not None else []

    def stop(self) -> dict[str, Any]:
        """FC pre-stop: refuse new work, wait up to `prestop_grace_seconds` for admitted requests, then
        release the device memory and flush the logs. Idempotent."""
        started = time.perf_counter()
        with self._work:
            self._stopping = True  # under the lock: no request is admitted after this line
            waited_for = self._in_flight
            drained = self._work.wait_for(lambda: self._in_flight == 0, timeout=self.settings.prestop_grace_seconds)
            left = self._in_flight
        if self.task_runner is not None:
            self.task_runner.stop()  # tasks still queued here are adopted by a live instance after tasks.stale_seconds
        released = self.device.run(self._release) if drained else 0
        if self.db is not None:
            self.db.dispose()  # every charge was committed before its response: nothing is left to flush
        flush_logs()
        waited = time.perf_counter() - started
        log.info("pre-stop: %s after %.2f s, %d model(s) released", "drained" if drained else
                 f"{left} request(s) still running", waited, released)
        return {"status": "stopped", "drained": drained, "waited_for": waited_for, "in_flight": left,
                "waited_seconds": round(waited, 3), "released_models": released}

    def _release(self) -> int:
        """Drop every warm pipeline and hand cached device memory back. Runs on the device thread."""
        cache = self._cache
        if cache is None:
            return 0
        count = len(cache.loaded())
        cache.clear()
        self._controlnet_models.clear()
        if cache.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return count

    def _hash_all(self) -> None:
        """Hash every checkpoint once, in the background, so listings show titles with hashes (the hashes
        persist in <data>/cache/sha256.json, so each file is read once per mount, not once per instance)."""
        for entry in self.store.checkpoints:
            try:
                self.store.sha256(entry)
            except (OSError, ModelNotFound):
                log.warning("could not hash %s", entry.name)

    # asynchronous tasks ---------------------------------------------------------------------------------
    def submit_task(self, mode: str, req: GenerationRequest, consumer: str, *, tag: str | None,
                    callback_url: str | None) -> tuple[dict[str, Any], bool]:
        """Queue `req` as a task (handler.runtime.tasks); returns its public view and whether it is new (the same
        request id from the same consumer returns the existing task)."""
        if self.tasks is None or self.task_runner is None:
            raise InvalidRequest("async: tasks need the records database (SDFUNC_RECORD_REQUESTS=true)", field="async")
        if self._stopping:
            raise _stopping_error(self.settings.warmup.retry_after)
        meter = metering.current()
        if callback_url:
            check_callback_url(callback_url, allow_private=self.settings.tasks.callback_allow_private,
                               network=self.settings.network)
        self._validate(req, consumer)  # a bad request is a 422 now, not a failed task later
        request_id = meter.request_key if meter is not None else uuid.uuid4().hex
        task, created = self.tasks.create(consumer=consumer, request_id=request_id, mode=mode, tag=tag,
                                          request_json=req.model_dump_json(), callback_url=callback_url,
                                          runner=self.task_runner.runner_id)
        if created:
            self.task_runner.submit(task["id"])
        if meter is not None:
            meter.recorded = True  # the ledger row is the task's, written when it runs
        return public_view(task), created

    def _validate(self, req: GenerationRequest, consumer: str) -> None:
        """The checks a generation makes before any device work: limits, models, sampler, EAS keys."""
        from pipelines.samplers import resolve_sampler

        if not self.coldstart.imported:  # the heavy imports, timed, on the device thread like all torch work
            self.device.run(self.coldstart.import_runtime)
        if req.infotext:
            req = a1111.apply_infotext(req)
        req = self._styled(req)
        width, height = self._check_common(req)
        selection = self._select(req, consumer, a1111.eas_values(req.alwayson_scripts))
        sampler = resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)
        self.loras.resolve(req.prompt, apply=not req.disable_extra_networks)
        hires, refiner = self._stages(req, width, height, sampler, selection)
        self._control_units(req, selection, hires, refiner)

    def task_request(self, mode: str, data: dict[str, Any], task_id: str) -> GenerationRequest:
        """The stored request of a task, set to save its images to storage and tagged with the task id (which
        also makes the response EAS-shaped: `parameters.image_url`, `seed`, `status`...)."""
        scripts = {**(data.get("alwayson_scripts") or {}), "id_task": task_id}
        values = {**data, "alwayson_scripts": scripts, "save_images": True, "send_images": False}
        return (Txt2ImgRequest if mode == "txt2img" else Img2ImgRequest).model_validate(values)

    # options --------------------------------------------------------------------------------------------
    def get_options(self, consumer: str) -> dict[str, Any]:
        options = self.options(consumer)
        try:
            entry = self._checkpoint_or_default(options["sd_model_checkpoint"])
        except (NotReady, ModelNotFound):
            return options
        sha = self.store.sha256(entry)
        options["sd_model_checkpoint"] = format_title(entry.name, sha)
        options["sd_checkpoint_hash"] = sha
        return options

    def set_options(self, consumer: str, values: dict[str, Any]) -> None:
        """Validate every key first (422 / 404), then store all of them: all or nothing."""
        clean: dict[str, Any] = {}
        for key, value in values.items():
            reason = check_option_value(key, value)
            if reason:
                raise InvalidRequest(f"{key}: {reason}", field=key)
            if key == "sd_model_checkpoint":
                value = self.store.title(self.store.find_checkpoint(value), compute=True)
            elif key == "sd_vae":
                self.store.find_vae(value)
            elif key == "sd_checkpoint_hash":
                continue  # derived from sd_model_checkpoint
            clean[key] = value
        self.options_store.update(consumer, clean)

    # generation -----------------------------------------------------------------------------------------
    def txt2img(self, req: Txt2ImgRequest, consumer: str) -> dict[str, Any]:
        return self._generate("txt2img", req, consumer)

    @staticmethod
    def require_init_image(req: Img2ImgRequest) -> None:
        """img2img needs `init_images` or PAI-EAS `alwayson_scripts.image_link`: 422 naming init_images."""
        if not req.init_images and not a1111.eas_values(req.alwayson_scripts).get("image_link"):
            raise InvalidRequest("init_images: at least one init image (or alwayson_scripts.image_link) is required",
                                 field="init_images")

    def img2img(self, req: Img2ImgRequest, consumer: str) -> dict[str, Any]:
        self.require_init_image(req)
        if len(req.init_images or []) > req.batch_size:
            raise InvalidRequest(
                f"init_images: {len(req.init_images)} images but batch_size is {req.batch_size}", field="init_images"
            )
        if not req.init_images:  # fetched before admission: a slow link must not hold a place in the queue
            req = req.model_copy(update={"init_images": [self._fetch_image_link(req)]})
        return self._generate("img2img", req, consumer)

    def _fetch_image_link(self, req: Img2ImgRequest) -> str:
        """PAI-EAS `image_link`: the init image by URL, as base64 for the usual decoding and limits."""
        return self._fetch_link(a1111.eas_values(req.alwayson_scripts)["image_link"], "alwayson_scripts.image_link")

    def _fetch_link(self, url: str, field: str) -> str:
        """An image by URL (handler.security.netguard: public addresses only unless allow-listed, pinned connection, size
        and time limits), as base64; a bad link or image is a 422 naming `field`."""
        import base64

        from handler.security.netguard import FetchError, Guard

        net = self.settings.network
        try:
            raw = Guard(net).get_bytes(url, max_bytes=net.max_image_bytes, deadline_seconds=net.fetch_deadline_seconds)
        except FetchError as exc:
            raise exc.for_field(field) from None
        data = base64.b64encode(raw).decode("ascii")
        decode_image(data, field=field, max_pixels=self.settings.max_input_pixels)  # a bad image names the link
        return data

    def _check_common(self, req: GenerationRequest) -> tuple[int, int]:
        s = self.settings
        if req.restore_faces:
            raise InvalidRequest("restore_faces: face restoration is not offered", field="restore_faces")
        if req.script_name:
            raise InvalidRequest(f"script_name: script '{req.script_name}' is not installed", field="script_name")
        if not isinstance(req, Txt2ImgRequest) and stages.other_checkpoint(self.store, req.refiner_checkpoint,
                                                                        "refiner_checkpoint") is not None:
            raise InvalidRequest("refiner_checkpoint: the refiner is offered for txt2img", field="refiner_checkpoint")
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            if getattr(req, name) not in (-1, 0):
                raise InvalidRequest(f"{name}: seed resize is not offered", field=name)
        texts = [("prompt", req.prompt), ("negative_prompt", req.negative_prompt)]
        if isinstance(req, Txt2ImgRequest) and req.enable_hr:
            texts += [("hr_prompt", req.hr_prompt), ("hr_negative_prompt", req.hr_negative_prompt)]
        from pipelines.prompts import parse_prompt_attention

        for name, text in texts:
            if len(text) > s.max_prompt_chars:
                raise InvalidRequest(f"{name}: longer than {s.max_prompt_chars} characters", field=name)
            try:
                parse_prompt_attention(text)
            except ValueError:  # `(word:1.2.3)`: A1111 fails there too; the message never quotes the prompt
                raise InvalidRequest(f"{name}: an attention weight such as (word:1.2) is not a number",
                                     field=name) from None
        if req.steps > s.max_steps:
            raise InvalidRequest(f"steps: at most {s.max_steps}", field="steps")
        width, height = stages.first_pass_size(req) if isinstance(req, Txt2ImgRequest) else (req.width, req.height)
        width, height = width // 8 * 8, height // 8 * 8
        for name, size in (("firstphase_width", width), ("firstphase_height", height)):
            if size < 8:  # only the legacy first-pass fields can get here (width and height are at least 8)
                raise InvalidRequest(f"{name}: at least 8", field=name)
        if isinstance(req, Txt2ImgRequest) and req.enable_hr and req.hr_second_pass_steps > s.max_steps:
            raise InvalidRequest(f"hr_second_pass_steps: at most {s.max_steps}", field="hr_second_pass_steps")
        if width > s.max_width:
            raise InvalidRequest(f"width: at most {s.max_width}", field="width")
        if height > s.max_height:
            raise InvalidRequest(f"height: at most {s.max_height}", field="height")
        if req.batch_size * req.n_iter > s.max_images:
            field = "batch_size" if req.batch_size > s.max_images else "n_iter"  # the one that tipped it over
            raise InvalidRequest(
                f"{field}: batch_size x n_iter = {req.batch_size * req.n_iter} exceeds {s.max_images} images",
                field=field,
            )
        outputs.check_request(req, self.storage, s.outputs_dir)  # a bad save_dir is a 422 before any work
        return width, height

    def _select(self, req: GenerationRequest, consumer: str, eas: dict[str, Any]) -> Selection:
        """Checkpoint, VAE and clip skip for this request: EAS alwayson_scripts, then override_settings, then
        the caller's options. Per-request choices never change anyone's defaults."""
        options = self.options(consumer)
        overrides = req.override_settings or {}
        for key, value in overrides.items():
            if key in ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"):
                reason = check_option_value(key, value)
                if reason:
                    raise InvalidRequest(f"override_settings.{key}: {reason}", field=f"override_settings.{key}")
        ckpt_name = eas.get("sd_model_checkpoint") or overrides.get("sd_model_checkpoint")
        field = "alwayson_scripts.sd_model_checkpoint" if eas.get("sd_model_checkpoint") else "override_settings.sd_model_checkpoint"
        checkpoint = (self.store.find_checkpoint(ckpt_name, field=field) if ckpt_name
                      else self._checkpoint_or_default(options["sd_model_checkpoint"]))
        stages.check_not_refiner(checkpoint, field if ckpt_name else "sd_model_checkpoint")
        vae_name = eas.get("sd_vae") or overrides.get("sd_vae") or options.get("sd_vae")
        vae_field = "alwayson_scripts.sd_vae" if eas.get("sd_vae") else "override_settings.sd_vae"
        vae = self.store.find_vae(vae_name, field=vae_field) if vae_name else None
        clip_skip = int(overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1)))
        return Selection(checkpoint=checkpoint, vae=vae, clip_skip=clip_skip, options=options)

    def _generate(self, mode: str, req: GenerationRequest, consumer: str) -> dict[str, Any]:
        """Admit a generation request (not while stopping; not during warm-up when told not to wait), run it,
        and fill the request's meter (handler.records.metering) with what it ran and where the time went."""
        meter = metering.current()
        if meter is not None:
            meter.mode, meter.consumer = mode, consumer or None
        if self._warming:
            if not self.settings.warmup.requests_wait:
                raise NotReady("the function is warming up; retry shortly",
                               headers={"Retry-After": str(self.settings.warmup.retry_after)})
            self._warm_done.wait(self.settings.timeout)  # then run on warm models, after the warm-up's work
        with self._admitted(generation=True):
            deadline = time.monotonic() + self.settings.queue.timeout_seconds
            if meter is None:  # no HTTP request: nothing to charge or record
                return self._run_generation(mode, req, consumer, None, deadline).response
            claim = (self.ledger.claim(consumer, meter.request_key) if self.ledger is not None
                     else contextlib.nullcontext())
            with claim:
                outcome = self._run_generation(mode, req, consumer, meter, deadline)
                return self._charge(outcome, meter)

    def _charge(self, outcome: Outcome, meter: metering.RequestMeter) -> dict[str, Any]:
        """Price the generation, put the charge in `parameters.billing`, and commit the ledger row with its
        image records before the response goes out (handler.records.ledger)."""
        charge = self.pricing.charge(outcome.generation_seconds, len(outcome.records), self.device_type())
        meter.charge = charge
        outcome.response["parameters"]["billing"] = {"request_id": meter.request_key, "consumer": meter.consumer,
                                                     **charge.as_dict()}
        if self.ledger is not None:
            self.ledger.record_success(meter, charge, outcome.records)
            meter.recorded = True
        return outcome.response

    def _run_generation(self, mode: str, req: GenerationRequest, consumer: str,
                        meter: metering.RequestMeter | None, deadline: float | None = None) -> Outcome:
        """Validate, select the models, run the job on the device thread, and shape A1111's response. The
        meter (if any) receives what ran and the queue wait, model load, generation and encode seconds. Past
        `deadline` (monotonic) the job is dropped or stopped and Timeout raised."""
        timings: dict[str, Any] = {}
        job_id = uuid.uuid4().hex
        if not self.coldstart.imported:  # the heavy imports, timed, on the device thread like all torch work
            self.device.run(self.coldstart.import_runtime)
        if req.infotext:
            req = a1111.apply_infotext(req)
        sent, req = req, self._styled(req)
        eas = a1111.eas_values(req.alwayson_scripts)
        job, selection = self._build_job(mode, req, consumer, eas)
        if meter is not None:
            meter.checkpoint, meter.width, meter.height, meter.steps = (
                selection.checkpoint.name, job.width, job.height, job.steps)
            if self.settings.log_prompts:
                meter.prompt, meter.negative_prompt = req.prompt, req.negative_prompt
        submitted = time.perf_counter()

        def run_on_device() -> tuple[Any, Any]:
            timings["queue_wait"] = time.perf_counter() - submitted  # admitted work runs even after pre-stop
            model, timings["model_load"], result = self._device_generate(selection, job, owner=consumer or None,
                                                                         job_id=job_id)
            return model, result

        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        # Batch only when there is company or a wait anyway (other generations admitted, or the device busy): a
        # lone request on an idle device would just pay the batching window.
        crowded = self._generations > 1 or self.device.pending > 0
        key = (self.batcher.key(job, selection.checkpoint, selection.vae)
               if meter is not None and self.batcher.enabled and crowded else None)
        try:
            if key is None:
                model, result = self.device.run(run_on_device, timeout=remaining,
                                                on_timeout=lambda: self.progress.stop_job(job_id))
            else:
                member = self.batcher.run(key, Member(job=job, consumer=consumer), self.device,
                                          lambda members: self._run_group(selection, members), deadline)
                timings["queue_wait"], timings["model_load"] = member.queue_wait, member.model_load
                model, result = member.outcome
        except JobTimeout as exc:
            limit = self.settings.queue.timeout_seconds
            raise Timeout(f"the generation {'was stopped after running' if exc.started else 'waited'} past the "
                          f"{limit:g} s limit (queue.timeout_seconds) and is not charged; retry later",
                          headers={"Retry-After": str(self.retry_after())}) from None
        finally:
            if meter is not None:
                meter.queue_wait_seconds = timings.get("queue_wait")
                meter.model_load_seconds = timings.get("model_load")
        encode_started = time.perf_counter()
        outcome = self._respond(mode, req, job, model, result, eas, selection.options, sent)
        timings["encode"] = time.perf_counter() - encode_started
        if meter is not None:
            meter.generation_seconds = result.generation_seconds
            meter.encode_seconds = timings["encode"]
            meter.images = len(result.images)
        return outcome

    def _device_generate(self, selection: Selection, job: Any, *, owner: str | None,
                         job_id: str | None = None) -> tuple[Any, float | None, Any]:
        """Load (or find warm) the selected model and run `job` on it, with progress, the service-time average
        and the cold start kept up to date. Device thread only. Returns (model, load seconds or None, result).
        Out of device memory (loading or generating), the warm cache is trimmed before the error goes on to
        the caller (a 503 out_of_memory, not charged): `_recover_memory`."""
        from pipelines.generate import generate

        model = None
        try:
            model, load = self._load(selection.checkpoint, selection.vae)
            adapters = self.lora_adapters
            before = (adapters.loads, adapters.unloads, len(model.pipe.tokenizer))
            adapters.apply(model.pipe, job.loras)
            job.embeddings = self.embeddings.prepare(model.pipe, _job_texts(job))  # textual inversions they name
            for control in job.controls:
                control.model = self._controlnet_model(control.entry, model)
            if (adapters.loads, adapters.unloads, len(model.pipe.tokenizer)) != before:
                self.cache.remeasure(model)  # adapters and embedding rows are device memory too
            batches = math.ceil(len(job.seeds) / job.batch_size)
            self.progress.begin(job.mode, job_count=batches * 2 if job.staged else batches,
                                sampling_steps=job.steps, owner=owner, job_id=job_id)
            try:
                result = generate(model, job, progress=self.progress.step, load_model=self._second_model(job))
            finally:
                self.progress.end()
        except Exception as exc:
            if out_of_memory(exc):
                self._recover_memory(exc, keep=model)
            raise
        if result.load_seconds:
            load = (load or 0.0) + result.load_seconds
        self._observe_service_time((load or 0.0) + result.generation_seconds)
        if not self.coldstart.done:
            self._first_image(result.generation_seconds)
        return model, load, result

    def _second_model(self, job: Any) -> Any:
        """The loader a staged job uses for its hires checkpoint or refiner (device thread): the model from
        the warm cache (same memory budget; it may evict the first one, whose pass is done), its load
        seconds, and the job's textual inversions loaded into it."""
        def load(entry: CheckpointEntry) -> tuple[Any, float, list[Any]]:
            model, seconds = self._load(entry, None)
            if getattr(model.pipe, "text_encoder", None) is None:  # the refiner's own layout: no LoRA, no TI fit it
                self.lora_adapters.apply(model.pipe, [])
                self.cache.remeasure(model)
                return model, seconds or 0.0, []
            self.lora_adapters.apply(model.pipe, job.loras)  # the request's LoRAs, and no one else's, as in A1111
            embeddings = self.embeddings.prepare(model.pipe, _job_texts(job))
            self.cache.remeasure(model)
            return model, seconds or 0.0, embeddings
        return load

    def _recover_memory(self, exc: BaseException, keep: Any) -> None:
        """After an out-of-memory error on the device thread: release the failed job's tensors (the frames of
        its traceback hold its latents and activations until the error object dies, which is after the
        response), then trim the warm cache to `keep`, the pipeline the job ran on (None when the error came
        while loading: then every pipeline goes). Never raises: the original error is what the caller gets."""
        traceback.clear_frames(exc.__traceback__)  # the running frame (ours) is skipped; the rest are done
        self._controlnet_models.clear()
        cache = self._cache
        try:
            dropped = cache.trim(keep=keep) if cache is not None else 0
        except Exception:  # best effort: the request fails with the out-of-memory error either way
            log.exception("trimming the warm cache after running out of device memory failed")
            return
        report = cache.report() if cache is not None else {}
        log.warning("out of device memory on %s: %d pipeline(s) left the device, %s kept; %d model(s) and "
                    "%.2f GiB of weights remain there", self.device_name(), dropped,
                    keep.entry.name if keep is not None else "none", report.get("device_models", 0),
                    report.get("device_bytes", 0) / 2**30, extra={"fields": {"cache": report}})

    def _run_group(self, selection: Selection, members: list[Member]) -> None:
        """Run a batch group as one job (device thread): per-image prompts and seeds, then each member gets its
        images and a share of the device time by image count (handler.runtime.batching)."""
        import dataclasses

        from pipelines.generate import GenerationResult

        started = time.perf_counter()
        jobs = [m.job for m in members]
        merged = dataclasses.replace(
            jobs[0], seeds=[s for j in jobs for s in j.seeds], subseeds=[s for j in jobs for s in j.subseeds],
            prompts=[j.prompt for j in jobs for _ in j.seeds],
            negative_prompts=[j.negative_prompt for j in jobs for _ in j.seeds],
            batch_size=sum(len(j.seeds) for j in jobs))
        owners = {m.consumer for m in members}
        # A shared batch can be interrupted by an admin only: no single consumer may stop the others' images.
        owner = owners.pop() if len(owners) == 1 else "<batch>"
        model, load, result = self._device_generate(selection, merged, owner=owner or None)
        made, first = len(result.images), 0
        log.info("batched %d request(s), %d image(s), %.3f s generating", len(members), made,
                 result.generation_seconds)
        for m in members:
            n = len(m.job.seeds)
            end = min(first + n, made)
            images = result.images[first:end] if first < made else []
            share = result.generation_seconds * len(images) / made if made else 0.0
            m.outcome = (model, GenerationResult(images=images, seeds=m.job.seeds[:len(images)],
                                                 subseeds=m.job.subseeds[:len(images)], generation_seconds=share,
                                                 interrupted=result.interrupted))
            m.queue_wait, m.model_load = started - m.submitted, load
            first += n
            m.done.set()

    @contextlib.contextmanager
    def _admitted(self, *, generation: bool = False) -> Iterator[None]:
        """Admit work unless pre-stop was called (503) or, for a generation request, the queue is full (429:
        one running and `queue.max_waiting` waiting), and count it as in flight until it ends (pre-stop waits
        for it)."""
        with self._work:
            if self._stopping:
                raise _stopping_error(self.settings.warmup.retry_after)
            limit = self.settings.queue.max_waiting + 1
            if generation and self._generations >= limit:
                wait = self.retry_after()
                raise Busy(f"the instance is busy: {limit - 1} request(s) already wait for the device; retry in "
                           f"about {wait} s", headers={"Retry-After": str(wait)})
            self._in_flight += 1
            self._generations += generation
        try:
            yield
        finally:
            with self._work:
                self._in_flight -= 1
                self._generations -= generation
                self._work.notify_all()

    def _observe_service_time(self, seconds: float) -> None:
        """Feed the moving average of one generation job's device time (Retry-After's estimate)."""
        previous = self._service_seconds
        self._service_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until the device is likely to take one more request: the admitted generations times the
        measured time of one job (the warm-up's Retry-After before any job was measured), within 1..600."""
        per_job = self._service_seconds
        if per_job is None:
            return self.settings.warmup.retry_after
        return max(1, min(600, math.ceil(per_job * max(1, self._generations))))

    def _build_job(self, mode: str, req: GenerationRequest, consumer: str,
                   eas: dict[str, Any]) -> tuple[Any, Selection]:
        from pipelines.generate import ImageJob
        from pipelines.samplers import resolve_sampler

        width, height = self._check_common(req)
        selection = self._select(req, consumer, eas)
        sampler = resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)
        seeds, subseeds = a1111.all_seeds(req)
        prompt, loras = self.loras.resolve(req.prompt, apply=not req.disable_extra_networks)
        job = ImageJob(
            mode=mode, prompt=prompt, negative_prompt=req.negative_prompt, seeds=seeds, subseeds=subseeds,
            subseed_strength=req.subseed_strength, batch_size=req.batch_size, steps=req.steps,
            cfg_scale=req.cfg_scale, width=width, height=height, sampler=sampler, clip_skip=selection.clip_skip,
            tiling=bool(req.tiling if req.tiling is not None else selection.options.get("tiling")),
            eta=req.eta if sampler.sampler.name in a1111.ETA_KEYS else None, loras=loras,
        )
        if isinstance(req, Img2ImgRequest):
            self._img2img_inputs(req, job, selection.options)
        job.hires, job.refiner = self._stages(req, width, height, sampler, selection)
        if job.hires is not None:
            job.denoising_strength = job.hires.denoising_strength
        job.controls = self._controls(req, job, selection)
        return job, selection

    @property
    def controlnets(self) -> Any:
        """The ControlNet models folder (pipelines.controlnet.store.ControlNetStore), made on first use: the module
        brings torch, which health checks and app start never import."""
        if self._controlnets is None:
            from pipelines.controlnet.store import ControlNetStore

            self._controlnets = ControlNetStore(self.settings.models_dir / "ControlNet")
        return self._controlnets

    def _control_units(self, req: GenerationRequest, selection: Selection, hires: Any,
                       refiner: Any) -> list[tuple[Any, Any]]:
        """The ControlNet units of `req` with their model entries: parsed, models found (404) and matched to
        the checkpoint's architecture (422), all before any device work."""
        from pipelines.controlnet.loading import check_compatible
        from pipelines.controlnet.units import controlnet_script_args, parse_units

        found = controlnet_script_args(req.alwayson_scripts)
        if found is None:
            return []
        prefix, value = found
        units = parse_units(value, prefix, img2img=isinstance(req, Img2ImgRequest))
        if not units:
            return []
        if refiner is not None:
            raise InvalidRequest("refiner_checkpoint: the refiner together with ControlNet is not offered",
                                 field="refiner_checkpoint")
        archs = [stages.checkpoint_arch(selection.checkpoint, "sd_model_checkpoint")]
        if hires is not None and hires.checkpoint is not None:
            archs.append(stages.checkpoint_arch(hires.checkpoint, "hr_checkpoint_name"))
        out = []
        for unit in units:
            entry = self.controlnets.find(unit.model, unit.field("model"))
            for arch in archs:
                check_compatible(self.controlnets.spec(entry, unit.field("model")), arch,
                                 unit.field("model"), entry.title)
            out.append((unit, entry))
        return out

    def _controls(self, req: GenerationRequest, job: Any, selection: Selection) -> list[Any]:
        """The job's ControlNet units with their detected maps (computed here, on the request's thread: no device
        time): the unit's image (base64, PAI-EAS `image_link`, or img2img's init image), its mask."""
        from PIL import Image

        from pipelines.controlnet.detectmap import detect, fit_map
        from pipelines.controlnet.units import resize_mode_from_value
        from pipelines.generate import Control

        controls = []
        limit = self.settings.max_input_pixels
        for unit, entry in self._control_units(req, selection, job.hires, job.refiner):
            resize_mode = None
            if unit.use_init_image:
                image = job.init_images[0]
                resize_mode = resize_mode_from_value(job.resize_mode)
            elif unit.image_link:
                image = decode_image(self._fetch_link(unit.image_link, unit.field("image_link")),
                                     field=unit.field("image_link"), max_pixels=limit)
            else:
                image = read_image(unit.image, field=unit.image_field, max_pixels=limit)
            mask = read_image(unit.mask, field=unit.mask_field, max_pixels=limit) if unit.mask else None
            mode = resize_mode or unit.resize_mode
            detected = detect(unit, image, job.width, job.height, mask=mask, resize_mode=mode)

            def fitted(width: int, height: int) -> Image.Image:  # the one detection, fitted to a pass's size
                return Image.fromarray(fit_map(detected, mode, width // 8 * 8, height // 8 * 8), "RGB")

            hr_map = fitted(job.hires.width, job.hires.height) if job.hires is not None else None
            controls.append(Control(unit=unit, entry=entry, map=fitted(job.width, job.height), hr_map=hr_map))
        return controls

    def _controlnet_model(self, entry: Any, model: Any) -> Any:
        """The ControlNet model of `entry` on `model`'s device and dtype (device thread): the last two used stay
        loaded, as A1111's ControlNet cache keeps them."""
        from pipelines.controlnet.loading import load_controlnet

        unet = model.pipe.unet
        key = (str(entry.path), str(unet.device), str(unet.dtype))
        cached = self._controlnet_models.pop(key, None)
        if cached is None:
            started = time.perf_counter()
            cached = load_controlnet(entry, dtype=unet.dtype, device=str(unet.device),
                                     spec=self.controlnets.spec(entry))
            log.info("ControlNet %s loaded in %.2f s", entry.title, time.perf_counter() - started)
        self._controlnet_models[key] = cached
        while len(self._controlnet_models) > CONTROLNET_CACHE:
            self._controlnet_models.popitem(last=False)
        return cached

    def _stages(self, req: GenerationRequest, width: int, height: int, sampler: Any,
                selection: Selection) -> tuple[Any, Any]:
        """The hires plan and the refiner plan of a txt2img request (None, None otherwise); 422 / 404 for
        fields that cannot be honoured."""
        if not isinstance(req, Txt2ImgRequest):
            return None, None
        hires = None
        if req.enable_hr:
            hr_prompt, _ = self.loras.resolve(req.hr_prompt or req.prompt, apply=False)
            hires = stages.hires_plan(req, width, height, sampler, self.store, selection.options,
                                      self.settings.max_width, self.settings.max_height, hr_prompt)
        return hires, stages.refiner_plan(req, self.store, selection.checkpoint)

    def _styled(self, req: GenerationRequest) -> GenerationRequest:
        """`req` with its `styles` applied to the prompts (hires prompts too, when given), as A1111 does
        before anything else; 422 naming `styles.<i>` for an unknown style."""
        if not req.styles:
            return req
        update: dict[str, Any] = {}
        update["prompt"], update["negative_prompt"] = self.styles.apply(req.prompt, req.negative_prompt, req.styles)
        if isinstance(req, Txt2ImgRequest) and (req.hr_prompt or req.hr_negative_prompt):
            hr, hr_negative = self.styles.apply(req.hr_prompt or req.prompt, req.hr_negative_prompt or req.negative_prompt,
                                                req.styles)
            update["hr_prompt"] = hr if req.hr_prompt else ""
            update["hr_negative_prompt"] = hr_negative if req.hr_negative_prompt else ""
        return req.model_copy(update=update)

    def _respond(self, mode: str, req: GenerationRequest, job: Any, model: Any, result: Any,
                 eas: dict[str, Any], options: dict[str, Any], sent: GenerationRequest | None = None) -> Outcome:
        """PNGs with their infotexts, optional saving, the A1111 response body and the image records. `req`
        has its styles applied (the infotexts' and `info`'s prompts, as A1111's `Processed` has them); `sent` is
        the request as sent, which `parameters` echoes."""
        sent = sent or req
        from pipelines.infotext import png_bytes

        extras = a1111.extra_params(req, job)
        if job.controls:  # scripts add their keys before the hires ones (A1111 runs them before `p.init`)
            from pipelines.controlnet.units import infotext_params

            extras.update(infotext_params([c.unit for c in job.controls]))
        if isinstance(req, Txt2ImgRequest):
            extras.update(stages.infotext_keys(req, job.hires, job.refiner, job.sampler, self.store))
        # The extension appends each unit's detected map to the images (not to the infotexts; with hires fix the
        # second pass's map, then the first's), unless the unit says `save_detected_map: false`; a saving request
        # stores them (PAI-EAS `image_mask_url`).
        map_pngs = [png_bytes(m, "") for c in job.controls if c.unit.save_detected_map
                    for m in ((c.hr_map, c.map) if c.hr_map is not None else (c.map,))]
        if job.loras:
            extras["Lora hashes"] = self.loras.hashes_infotext(job.loras)
        used = self.embeddings.mentioned([job.prompt, job.negative_prompt], encoder_dims(model.pipe))
        if used:
            extras["TI hashes"] = self.embeddings.ti_hashes(used)
        params = a1111.infotext_params(req, job, model, extras)
        infotexts: list[str] = []
        pngs: list[bytes] = []
        for image, seed, subseed in zip(result.images, result.seeds, result.subseeds):
            text = a1111.image_infotext(req.prompt, req.negative_prompt, params, seed,
                                        subseed if req.subseed_strength else None)
            infotexts.append(text)
            pngs.append(png_bytes(image, text))
        saved, saved_maps = [], []
        options = {**options, **(req.override_settings or {})}  # the caller's options, this request's overrides
        if req.save_images or eas.get("save_dir"):  # PAI-EAS: a save_dir means save there
            written = outputs.save_outputs(
                self.storage, self.settings.outputs_dir, mode, pngs=pngs, seeds=result.seeds, images=result.images,
                infotexts=infotexts, save_dir=eas.get("save_dir"),
                grid=outputs.wants_grid(len(pngs), options), maps=map_pngs)
            saved, saved_maps = written.images, written.maps
        parameters = sent.model_dump(mode="json")
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            parameters["init_images"] = None
            parameters["mask"] = None
        if eas:
            parameters.update(id_task=eas.get("id_task"), status="finished", image_url=",".join(saved),
                              seed=str(result.seeds[0]) if result.seeds else "", error_msg="",
                              total_time=round(result.generation_seconds, 3))
            if saved_maps:
                parameters["image_mask_url"] = ",".join(saved_maps)
        # A1111 puts a grid first when the request saves images, there are two or more and `return_grid` is on
        # (the API overwrites `do_not_save_grid` with `not save_images`); its infotext is the first image's.
        grid = req.save_images and len(pngs) > 1 and bool(options.get("return_grid", True))
        if grid:
            pngs.insert(0, png_bytes(outputs.image_grid(result.images), infotexts[0]))
            infotexts.insert(0, infotexts[0])
        info = a1111.info_object(req, job, model, result, infotexts, extras, index_of_first_image=int(grid))
        log.info("%s: %d image(s) %dx%d, %d steps, %.3f s generating", mode, len(pngs), job.width, job.height,
                 job.steps, result.generation_seconds)
        # "Save to DataBase": per request, else the setting; a client that sends an Idempotency-Key expects a
        # retry to find the images it paid for, so those are kept too.
        meter = metering.current()
        keep = eas.get("save_to_db", self.settings.save_images_to_db or bool(meter and meter.idempotency_key))
        encoded: list[Any] = [b64(data) if req.send_images or keep else None for data in pngs]
        records = [ImageRecord(prompt=req.prompt, negative_prompt=req.negative_prompt, steps=job.steps, seed=seed,
                               sampler=str(params.get("Sampler", "")), cfg_scale=float(job.cfg_scale),
                               size=f"{job.width}x{job.height}", model_hash=params.get("Model hash"),
                               model=params.get("Model"), image_base64=data if keep else None,
                               image_url=saved[i] if i < len(saved) else None)
                   for i, (seed, data) in enumerate(zip(result.seeds, encoded[int(grid):]))]
        response = {
            "images": [*encoded, *(b64(data) for data in map_pngs)] if req.send_images else [],
            "parameters": parameters,
            "info": json.dumps(info, ensure_ascii=False),
        }
        return Outcome(response=response, records=records, generation_seconds=result.generation_seconds)

    def _img2img_inputs(self, req: Img2ImgRequest, job: Any, options: dict[str, Any]) -> None:
        limit = self.settings.max_input_pixels
        background = str(options.get("img2img_background_color", "#ffffff"))
        job.init_images = [decode_image(data, field=f"init_images.{i}", max_pixels=limit, background=background)
                           for i, data in enumerate(req.init_images or [])]
        if len(job.init_images) > 1:
            job.batch_size = len(job.init_images)
            if len(job.seeds) % job.batch_size:
                raise InvalidRequest("init_images: batch_size x n_iter must be a multiple of the number of init images",
                                     field="init_images")
        job.denoising_strength = req.denoising_strength
        job.resize_mode = req.resize_mode
        if req.mask:
            job.mask = decode_image(req.mask, field="mask", max_pixels=limit, background="#000000")
            blur = req.mask_blur
            job.mask_blur_x = req.mask_blur_x if blur is None else blur
            job.mask_blur_y = req.mask_blur_y if blur is None else blur
            job.inpainting_fill = req.inpainting_fill
            job.inpaint_full_res = req.inpaint_full_res
            job.inpaint_full_res_padding = req.inpaint_full_res_padding
            job.inpainting_mask_invert = bool(req.inpainting_mask_invert)


def _job_texts(job: Any) -> list[str]:
    """Every prompt a job encodes: its (per-image) prompts and negative prompts, and the hires pass's."""
    texts = [*(job.prompts or [job.prompt]), *(job.negative_prompts or [job.negative_prompt])]
    if job.hires is not None:
        texts += [job.hires.prompt, job.hires.negative_prompt]
    return texts


def _stopping_error(retry_after: int) -> NotReady:
    return NotReady("the function is stopping; retry on another instance", headers={"Retry-After": str(retry_after)})


def _warmup_request(entry: CheckpointEntry, shape: WarmupShape) -> Txt2ImgRequest:
    """The txt2img request that warms `entry` at `shape`: Euler, fixed seed, nothing saved."""
    return Txt2ImgRequest(prompt="warm-up", seed=0, steps=shape.steps, width=shape.width, height=shape.height,
                          sampler_name="Euler", override_settings={"sd_model_checkpoint": entry.name})
