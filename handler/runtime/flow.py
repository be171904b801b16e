"""The generation flow: admit a request, plan it, run the plan on the device, shape and charge the response.

A request flows one way: handler.runtime.admission admits it (or answers 503 / 429), handler.runtime.planning
turns it into a validated plan (every 422 before any device work), the device thread (handler.runtime.engine)
loads the models and generates, alone or batched with compatible requests (handler.runtime.batching),
handler.runtime.respond shapes A1111's response, and the charge is committed with the image records before the
response goes out (handler.records.ledger). The request's meter (handler.records.metering) receives what ran
and where the time went: queue wait, model load, generation, encoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from handler.contract.a1111 import task_ids
from handler.contract.schemas import GenerationRequest
from handler.errors import ChargeUnknown, out_of_memory
from handler.records import metering
from handler.records.billing import Pricing
from handler.records.ledger import Ledger
from handler.runtime.admission import Admission
from handler.runtime.batching import Batcher, Member
from handler.runtime.controlnets import ControlNets
from handler.runtime.engine import Engine
from handler.runtime.executor import JobTimeout
from handler.runtime.planning import Planner, Selection
from handler.runtime.progress import Progress, TaskEntry
from handler.runtime.respond import Outcome, Responder
from handler.settings import Settings
from pipelines.adapters.embeddings import EmbeddingStore
from pipelines.adapters.lora import LoraAdapters
from pipelines.store import CheckpointEntry

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Collaborators:
    """What the generation flow works with; all of them are the worker's own (handler.runtime.service)."""

    admission: Admission
    engine: Engine
    planner: Planner
    responder: Responder
    batcher: Batcher
    progress: Progress
    lora_adapters: LoraAdapters
    embeddings: EmbeddingStore
    controlnets: ControlNets
    pricing: Pricing
    ledger: Ledger | None


class GenerationFlow:
    """Runs generation requests of one worker: `generate` for a request (admitted, charged), `run` for the
    planned and executed generation alone (the warm-up uses it without admission or metering)."""

    def __init__(self, settings: Settings, parts: Collaborators) -> None:
        self.settings = settings
        self.admission = parts.admission
        self.engine = parts.engine
        self.planner = parts.planner
        self.responder = parts.responder
        self.batcher = parts.batcher
        self.progress = parts.progress
        self.lora_adapters = parts.lora_adapters
        self.embeddings = parts.embeddings
        self.controlnets = parts.controlnets
        self.pricing = parts.pricing
        self.ledger = parts.ledger

    def generate(self, mode: str, req: GenerationRequest, consumer: str) -> dict[str, Any]:
        """Admit a generation request (not while stopping; not during warm-up when told not to wait), run it,
        and fill the request's meter (handler.records.metering) with what it ran and where the time went."""
        meter = metering.current()
        if meter is not None:
            meter.mode, meter.consumer = mode, consumer or None
        self.admission.wait_for_warmup()
        with (self.admission.admitted(generation=True),
              self.progress.tracking(task_ids(req), consumer or None) as task):  # queued until the device starts it
            deadline = time.monotonic() + self.settings.queue.timeout_seconds
            if meter is None:  # no HTTP request: nothing to charge or record
                return self.run(mode, req, consumer, None, deadline, task=task).response
            claim = (self.ledger.claim(consumer, meter.request_key) if self.ledger is not None
                     else contextlib.nullcontext())
            with claim:
                outcome = self.run(mode, req, consumer, meter, deadline, task=task)
                return self._charge(outcome, meter)

    def _charge(self, outcome: Outcome, meter: metering.RequestMeter) -> dict[str, Any]:
        """Price the generation, put the charge in `parameters.billing`, and commit the ledger row with its
        image records before the response goes out (handler.records.ledger). A charge whose outcome is unknown
        raises ChargeUnknown carrying the response (`result`)."""
        charge = self.pricing.charge(outcome.generation_seconds, len(outcome.records), self.engine.device_type())
        meter.charge = charge
        outcome.response["parameters"]["billing"] = {"request_id": meter.request_key, "consumer": meter.consumer,
                                                     **charge.as_dict()}
        if self.ledger is not None:
            try:
                self.ledger.record_success(meter, charge, outcome.records)
            except ChargeUnknown as exc:
                exc.result = outcome.response  # a task waits for the database to tell (handler.runtime.tasks)
                raise
            meter.recorded = True
        return outcome.response

    def run(self, mode: str, req: GenerationRequest, consumer: str, meter: metering.RequestMeter | None,
            deadline: float | None = None, *, task: TaskEntry | None = None) -> Outcome:
        """Plan, run the job on the device thread, and shape A1111's response. The meter (if any) receives
        what ran and the queue wait, model load, generation and encode seconds. Past `deadline` (monotonic)
        the job is dropped or stopped and Timeout raised. `task` (the request's place in the progress registry)
        becomes active when the device starts its job."""
        timings: dict[str, Any] = {}
        job_id = uuid.uuid4().hex
        self.engine.import_runtime()
        plan = self.planner.plan(mode, req, consumer)
        job, selection = plan.job, plan.selection
        if meter is not None:
            meter.checkpoint, meter.width, meter.height, meter.steps = (
                selection.checkpoint.name, job.width, job.height, job.steps)
            if self.settings.log_prompts:
                meter.prompt, meter.negative_prompt = plan.req.prompt, plan.req.negative_prompt
        submitted = time.perf_counter()

        def run_on_device() -> tuple[Any, Any]:
            timings["queue_wait"] = time.perf_counter() - submitted  # admitted work runs even after pre-stop
            model, timings["model_load"], result = self.device_generate(
                selection, job, owner=consumer or None, job_id=job_id, tasks=(task,) if task is not None else ())
            return model, result

        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        device = self.engine.device
        # Batch only when there is company or a wait anyway (other generations admitted, or the device busy): a
        # lone request on an idle device would just pay the batching window.
        crowded = self.admission.generations > 1 or device.pending > 0
        key = (self.batcher.key(job, selection.checkpoint, selection.vae)
               if meter is not None and self.batcher.enabled and crowded else None)
        try:
            if key is None:
                model, result = device.run(run_on_device, timeout=remaining,
                                           on_timeout=lambda: self.progress.stop_job(job_id))
            else:
                member = self.batcher.run(key, Member(job=job, consumer=consumer, task=task), device,
                                          lambda members: self._run_group(selection, members), deadline)
                timings["queue_wait"], timings["model_load"] = member.queue_wait, member.model_load
                model, result = member.outcome
        except JobTimeout as exc:
            raise self.admission.timed_out("generation", exc.started) from None
        finally:
            if meter is not None:
                meter.queue_wait_seconds = timings.get("queue_wait")
                meter.model_load_seconds = timings.get("model_load")
        encode_started = time.perf_counter()
        outcome = self.responder.respond(plan, model, result)
        timings["encode"] = time.perf_counter() - encode_started
        if meter is not None:
            meter.generation_seconds = result.generation_seconds
            meter.encode_seconds = timings["encode"]
            meter.images = len(result.images)
        return outcome

    # device thread --------------------------------------------------------------------------------------
    def device_generate(self, selection: Selection, job: Any, *, owner: str | None, job_id: str | None = None,
                        tasks: Sequence[TaskEntry] = ()) -> tuple[Any, float | None, Any]:
        """Load (or find warm) the selected model and run `job` on it, with progress (of the job and of the
        `tasks` it serves: active from the start, model load included, as A1111's start_task), the service-time
        average and the cold start kept up to date. Device thread only. Returns (model, load seconds or None,
        result). Out of device memory (loading or generating), the warm cache is trimmed before the error goes
        on to the caller (a 503 out_of_memory, not charged): `Engine.recover_memory`."""
        from pipelines.generate import generate

        engine = self.engine
        model = None
        self.progress.activate(tasks)
        try:
            model, load = engine.load(selection.checkpoint, selection.vae)
            adapters = self.lora_adapters
            before = (adapters.loads, adapters.unloads, len(model.pipe.tokenizer))
            adapters.apply(model.pipe, job.loras)
            job.embeddings = self.embeddings.prepare(model.pipe, _job_texts(job))  # textual inversions they name
            for control in job.controls:
                control.model = self.controlnets.model(control.entry, model)
            if (adapters.loads, adapters.unloads, len(model.pipe.tokenizer)) != before:
                engine.cache.remeasure(model)  # adapters and embedding rows are device memory too
            batches = math.ceil(len(job.seeds) / job.batch_size)
            self.progress.begin(job.mode, job_count=batches * 2 if job.staged else batches,
                                sampling_steps=job.steps, owner=owner, job_id=job_id, tasks=tasks)
            try:
                result = generate(model, job, progress=self.progress.step, load_model=self._second_model(job))
                if job.restore_faces is not None:  # A1111 restores each final image's faces; billed as generating
                    started = time.perf_counter()
                    result.images = [job.restore_faces(image) for image in result.images]
                    result.generation_seconds += time.perf_counter() - started
            finally:
                self.progress.end()
        except Exception as exc:
            if out_of_memory(exc):
                engine.recover_memory(exc, keep=model)
            raise
        finally:
            self.progress.deactivate(tasks)  # a load that failed never began the job
        if result.load_seconds:
            load = (load or 0.0) + result.load_seconds
        self.admission.observe_service_time((load or 0.0) + result.generation_seconds)
        if not engine.coldstart.done:
            engine.first_image(result.generation_seconds)
        return model, load, result

    def _second_model(self, job: Any) -> Any:
        """The loader a staged job uses for its hires checkpoint or refiner, or for its own model again after
        one of those (with its VAE) (device thread): the model from the warm cache (same memory budget; it
        may evict the first one, whose pass is done), its load seconds, and the job's textual inversions
        loaded into it."""
        def load(entry: CheckpointEntry, vae: Any = None) -> tuple[Any, float, list[Any]]:
            model, seconds = self.engine.load(entry, vae)
            if getattr(model.pipe, "text_encoder", None) is None:  # the refiner's own layout: no LoRA, no TI fit it
                self.lora_adapters.apply(model.pipe, [])
                self.engine.cache.remeasure(model)
                return model, seconds or 0.0, []
            self.lora_adapters.apply(model.pipe, job.loras)  # the request's LoRAs, and no one else's, as in A1111
            embeddings = self.embeddings.prepare(model.pipe, _job_texts(job))
            self.engine.cache.remeasure(model)
            return model, seconds or 0.0, embeddings
        return load

    def _run_group(self, selection: Selection, members: list[Member]) -> None:
        """Run a batch group as one job (device thread): per-image prompts and seeds, then each member gets its
        images and a share of the device time by image count (handler.runtime.batching)."""
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
        model, load, result = self.device_generate(selection, merged, owner=owner or None,
                                                   tasks=[m.task for m in members if m.task is not None])
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


def _job_texts(job: Any) -> list[str]:
    """Every prompt a job encodes: its (per-image) prompts and negative prompts, and the hires pass's."""
    texts = [*(job.prompts or [job.prompt]), *(job.negative_prompts or [job.negative_prompt])]
    if job.hires is not None:
        texts += [job.hires.prompt, job.hires.negative_prompt]
    return texts
