"""A1111's extras (`/sdapi/v1/extra-single-image`, `/sdapi/v1/extra-batch-images`) as a metered request.

An extras request flows as a generation does: every 422 / 404 before any device work (images decoded, upscaler
and face-restorer names checked, the largest image the chain makes within `max_input_pixels`), then admission,
the device thread (one job for all of the request's images, with progress and interruption after an image), and
the charge committed with one image record per result before the response goes out. Device time is billed as a
generation's (`handler.records.billing`); a failed request is not charged.

The result PNGs keep the input's text chunks and its `parameters`, and add A1111's `postprocessing` chunk (the
infotext of the steps that ran); `html_info` is that infotext as A1111's HTML. PAI-EAS `alwayson_scripts.save_dir`
saves them (`<save_dir>/extras-images/<day>/...`) and answers with `parameters.image_url`.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from PIL import Image

from handler.contract.extras import ExtrasRequest
from handler.contract.images import b64, read_image
from handler.errors import InvalidRequest
from handler.records import metering
from handler.records.billing import Pricing
from handler.records.ledger import ImageRecord, Ledger
from handler.runtime.admission import Admission
from handler.runtime.consumer_options import ConsumerOptions
from handler.runtime.engine import Engine
from handler.runtime.executor import JobTimeout
from handler.runtime.progress import Progress
from handler.runtime.upscaling import Upscaling
from handler.settings import Settings
from handler.storage import outputs
from handler.storage.backends import Storage
from pipelines.postprocess import ExtrasPlan, run_extras

log = logging.getLogger(__name__)

MAX_BATCH = 64  # images in one extra-batch-images request
BATCH_PIXELS = 4  # the images of one request hold at most this many times `max_input_pixels` together
MAX_KEPT_TEXT = 64 * 1024  # characters of the input's text chunks a result PNG keeps (A1111 infotexts are < 10 kB)


@dataclass
class ExtrasJob:
    """A checked extras request: its decoded images with their PNG text chunks, and the plan."""

    images: list[Image.Image]
    single: bool  # extra-single-image: answered with `image`, not `images`
    plan: ExtrasPlan
    options: dict[str, Any]
    eas: dict[str, Any]


class ExtrasFlow:
    """Runs the extras requests of one worker (see the module docstring)."""

    def __init__(self, settings: Settings, *, admission: Admission, engine: Engine, progress: Progress,
                 upscaling: Upscaling, options: ConsumerOptions, pricing: Pricing, ledger: Ledger | None,
                 storage: Storage) -> None:
        self.settings = settings
        self.admission = admission
        self.engine = engine
        self.progress = progress
        self.upscaling = upscaling
        self.options = options
        self.pricing = pricing
        self.ledger = ledger
        self.storage = storage

    # checking (any thread) -------------------------------------------------------------------------------
    def prepare(self, req: ExtrasRequest, images: list[tuple[str, str]], consumer: str, *,
                single: bool) -> ExtrasJob:
        """The job of `req` for `images` ((base64, the field that holds it) each); every refusal here, naming its
        field."""
        if not images:
            raise InvalidRequest("imageList: at least one image is required", field="imageList")
        if len(images) > MAX_BATCH:
            raise InvalidRequest(f"imageList: at most {MAX_BATCH} images per request", field="imageList")
        limit = self.settings.max_input_pixels
        decoded, total = [], 0
        for data, field in images:
            decoded.append(read_image(data, field=field, max_pixels=limit))
            total += decoded[-1].width * decoded[-1].height
            if total > BATCH_PIXELS * limit:
                raise InvalidRequest(f"imageList: the images hold more than {BATCH_PIXELS * limit} pixels together; "
                                     "send them in several requests", field="imageList")
        if req.codeformer_visibility > 0:
            self.upscaling.check_restorer("CodeFormer", "codeformer_visibility")
        upscaler_1 = self.upscaling.check(req.upscaler_1, "upscaler_1")
        upscaler_2 = self.upscaling.check(req.upscaler_2, "upscaler_2")
        if req.gfpgan_visibility > 0:
            self.upscaling.check_restorer("GFPGAN", "gfpgan_visibility")
        plan = ExtrasPlan(
            resize_mode=req.resize_mode, upscaling_resize=req.upscaling_resize, width=req.upscaling_resize_w,
            height=req.upscaling_resize_h, crop=req.upscaling_crop,
            upscaler_1=None if upscaler_1 == "None" else upscaler_1,
            upscaler_2=None if upscaler_2 == "None" else upscaler_2,
            upscaler_2_visibility=req.extras_upscaler_2_visibility, gfpgan_visibility=req.gfpgan_visibility,
            codeformer_visibility=req.codeformer_visibility, codeformer_weight=req.codeformer_weight)
        field = "upscaling_resize_w" if req.resize_mode == 1 else "upscaling_resize"
        upscalers = [name for name, on in ((plan.upscaler_1, True), (plan.upscaler_2, plan.upscaler_2_visibility > 0))
                     if name is not None and on]
        for image, (_data, image_field) in zip(decoded, images):
            for name in upscalers:
                self.upscaling.check_size(image.width, image.height, plan.scale_for(image), name, field, image_field)
        from handler.contract.a1111 import eas_values

        eas = eas_values(req.alwayson_scripts)
        outputs.check_save_dir(eas.get("save_dir"), self.storage, self.settings.outputs_dir)
        return ExtrasJob(images=decoded, single=single, plan=plan, options=self.options.options(consumer), eas=eas)

    # running -----------------------------------------------------------------------------------------
    def run(self, req: ExtrasRequest, images: list[tuple[str, str]], consumer: str, *, single: bool) -> dict[str, Any]:
        """Check, admit, run on the device and charge an extras request for `images` ((base64, field) each); the
        response is A1111's (`image` when `single`, else `images`), plus PAI-EAS's `parameters` when the request
        has PAI-EAS keys."""
        meter = metering.current()
        if meter is not None:
            meter.mode, meter.consumer = "extras", consumer or None
        self.engine.import_runtime()
        job = self.prepare(req, images, consumer, single=single)
        self.admission.wait_for_warmup()
        task_ids = [job.eas["id_task"]] if job.eas.get("id_task") else []
        with (self.admission.admitted(generation=True), self.progress.tracking(task_ids, consumer or None) as task):
            claim = (self.ledger.claim(consumer, meter.request_key) if self.ledger is not None and meter is not None
                     else contextlib.nullcontext())
            with claim:
                return self._run(job, consumer, meter, task)

    def _run(self, job: ExtrasJob, consumer: str, meter: metering.RequestMeter | None, task: Any) -> dict[str, Any]:
        job_id = uuid.uuid4().hex
        submitted = time.perf_counter()
        timings: dict[str, float] = {}

        def on_device() -> tuple[list[Image.Image], dict[str, Any], float]:
            timings["queue_wait"] = time.perf_counter() - submitted
            return self._device_run(job, owner=consumer or None, job_id=job_id, task=task)

        try:
            results, info, seconds = self.engine.device.run(on_device, timeout=self.settings.queue.timeout_seconds,
                                                            on_timeout=lambda: self.progress.stop_job(job_id))
        except JobTimeout as exc:
            raise self.admission.timed_out("extras job", exc.started) from None
        finally:
            if meter is not None:
                meter.queue_wait_seconds = timings.get("queue_wait")
        self.admission.observe_service_time(seconds)
        encode_started = time.perf_counter()
        response, records = self._respond(job, results, info, seconds)
        if meter is None:
            return response
        meter.generation_seconds = seconds
        meter.encode_seconds = time.perf_counter() - encode_started
        meter.images = len(results)
        if results:
            meter.width, meter.height = results[0].size
        charge = self.pricing.charge(seconds, len(results), self.engine.device_type())
        meter.charge = charge
        if self.ledger is not None:
            self.ledger.record_success(meter, charge, records)
            meter.recorded = True
        return response

    def _device_run(self, job: ExtrasJob, *, owner: str | None, job_id: str,
                    task: Any) -> tuple[list[Image.Image], dict[str, Any], float]:
        """Every image through the chain (device thread); stops after the image being made when interrupted.
        Returns the results, the last one's infotext items and the device seconds."""
        from handler.errors import out_of_memory

        started = time.perf_counter()
        tasks = (task,) if task is not None else ()
        self.progress.activate(tasks)
        self.progress.begin("extras", job_count=len(job.images), sampling_steps=1, owner=owner, job_id=job_id,
                            tasks=tasks)
        from pipelines.upscalers.tiling import Interrupted

        results: list[Image.Image] = []
        info: dict[str, Any] = {}
        try:
            for i, image in enumerate(job.images):
                source = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
                keep_going = functools.partial(self.progress.step, 0, 1, i + 1)  # interrupted or out of time?
                try:
                    out, info = run_extras(
                        source, job.plan,
                        upscale=lambda im, name, scale: self.upscaling.upscale(im, name, scale, job.options,
                                                                               keep_going=keep_going),
                        restore=lambda im, name, weight: self.upscaling.restore(im, name, weight))
                except Interrupted:  # between two tiles: the images made so far are the answer
                    break
                results.append(out)
                if not self.progress.step(1, 1, i + 1):
                    break
        except Exception as exc:
            if out_of_memory(exc):
                self.engine.recover_memory(exc, keep=None)
            raise
        finally:
            self.progress.end()
            self.progress.deactivate(tasks)
        return results, info, time.perf_counter() - started

    def _respond(self, job: ExtrasJob, results: list[Image.Image], info: dict[str, Any],
                 seconds: float) -> tuple[dict[str, Any], list[ImageRecord]]:
        """PNGs with the input's chunks and `postprocessing`, saved when asked, the response and the records."""
        from pipelines.infotext import format_value, png_with_chunks, read_image_info

        infotext = ", ".join(k if k == v else f"{k}: {format_value(v)}" for k, v in info.items() if v is not None)
        pngs = []
        for source, result in zip(job.images, results):
            parameters, items = read_image_info(source)
            chunks = {k: v for k, v in items.items() if isinstance(k, str) and isinstance(v, str)}
            if parameters:
                chunks["parameters"] = parameters
            chunks = _bounded(chunks, MAX_KEPT_TEXT)
            chunks["postprocessing"] = infotext
            pngs.append(png_with_chunks(result, chunks))
        eas = job.eas
        written = outputs.Saved()
        if eas.get("save_dir"):
            written = outputs.save_outputs(self.storage, self.settings.outputs_dir, "extras", pngs=pngs,
                                           seeds=list(range(len(pngs))), save_dir=eas.get("save_dir"))
        meter = metering.current()
        keep = eas.get("save_to_db", self.settings.save_images_to_db or bool(meter and meter.idempotency_key))
        encoded = [b64(data) for data in pngs]
        records = [ImageRecord(prompt="", negative_prompt="", steps=0, seed=-1, sampler="", cfg_scale=0.0,
                               size=f"{result.width}x{result.height}", model_hash=None,
                               model=job.plan.upscaler_1 or ("GFPGAN" if job.plan.gfpgan_visibility else
                                                             "CodeFormer" if job.plan.codeformer_visibility else None),
                               image_base64=data if keep else None,
                               image_url=written.images[i] if i < len(written.images) else None)
                   for i, (result, data) in enumerate(zip(results, encoded))]
        response: dict[str, Any] = {"html_info": plaintext_to_html(infotext)}
        if job.single:
            response["image"] = encoded[0] if encoded else None
        else:
            response["images"] = encoded
        if eas:
            response["parameters"] = {"id_task": eas.get("id_task"), "status": 0, "image_url": ",".join(written.images),
                                      "error_msg": "", "total_time": round(seconds, 3)}
        log.info("extras: %d image(s), %s, %.3f s on the device", len(results), infotext or "nothing to do", seconds)
        return response, records


def _bounded(chunks: dict[str, str], budget: int) -> dict[str, str]:
    """The chunks a result keeps: `parameters` first, then the others in order, while they fit in `budget`
    characters (an input may carry megabytes of compressed text; a result never inflates them)."""
    kept: dict[str, str] = {}
    for key in sorted(chunks, key=lambda k: k != "parameters"):
        if len(key) + len(chunks[key]) <= budget:
            kept[key] = chunks[key]
            budget -= len(key) + len(chunks[key])
    if len(kept) < len(chunks):
        log.info("extras: %d text chunk(s) of the input are not kept (over %d characters)",
                 len(chunks) - len(kept), MAX_KEPT_TEXT)
    return {key: kept[key] for key in chunks if key in kept}  # in the input's order, parameters where it was


def plaintext_to_html(text: str) -> str:
    """A1111's `plaintext_to_html`: each line escaped, joined by `<br>`, in one paragraph."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
