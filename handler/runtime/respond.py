"""Response shaping: a finished generation -> A1111's response body (PAI-EAS fields when asked) and its records.

PNGs with their infotexts (A1111's order of keys), optional saving (handler.storage.outputs), the grid, the
detected ControlNet maps, `parameters` (the request as sent; PAI-EAS `image_url`, `seed`, `status`...) and
`info` (`images: []` for a PAI-EAS `save_dir` request that does not send `send_images: true`), and one ledger
record per image. It runs on the request's thread (no device time) and needs no HTTP:
the asynchronous task runner shapes its responses here too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from handler.contract import a1111
from handler.contract.images import b64
from handler.contract.schemas import Img2ImgRequest, Txt2ImgRequest
from handler.records import metering
from handler.records.ledger import ImageRecord
from handler.runtime import stages
from handler.runtime.planning import Plan
from handler.settings import Settings
from handler.storage import outputs
from handler.storage.backends import Storage
from pipelines.adapters.embeddings import EmbeddingStore, encoder_dims
from pipelines.adapters.lora import LoraStore
from pipelines.store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A generation's A1111 response body and the image records it makes."""

    response: dict[str, Any]
    records: list[ImageRecord]
    generation_seconds: float


class Responder:
    """Shapes the responses of one worker; reads the settings (saving, outputs folder) at call time."""

    def __init__(self, settings: Settings, *, store: ModelStore, loras: LoraStore, embeddings: EmbeddingStore,
                 storage: Storage) -> None:
        self.settings = settings
        self.store = store
        self.loras = loras
        self.embeddings = embeddings
        self.storage = storage

    def respond(self, plan: Plan, model: Any, result: Any) -> Outcome:
        """PNGs with their infotexts, optional saving, the A1111 response body and the image records. The
        infotexts and `info` describe `plan.req` (styles applied, as A1111's `Processed` has them);
        `parameters` echoes `plan.sent`, the request as sent."""
        from pipelines.infotext import png_bytes

        mode, req, sent, job, eas = plan.mode, plan.req, plan.sent, plan.job, plan.eas
        extras = a1111.extra_params(req, job)
        if job.controls:  # scripts add their keys before the hires ones (A1111 runs them before `p.init`)
            from pipelines.controlnet.units import infotext_params

            extras.update(infotext_params([c.unit for c in job.controls]))
        if isinstance(req, Txt2ImgRequest):
            extras.update(stages.infotext_keys(req, job.hires, job.sampler, self.store))
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
        if job.refiner is not None and result.refined:  # A1111 adds them when it switches
            extras.update(stages.refiner_infotext_keys(job.refiner, self.store))
        params = a1111.infotext_params(req, job, model, extras)
        infotexts: list[str] = []
        pngs: list[bytes] = []
        for image, seed, subseed in zip(result.images, result.seeds, result.subseeds):
            text = a1111.image_infotext(req.prompt, req.negative_prompt, params, seed,
                                        subseed if req.subseed_strength else None)
            infotexts.append(text)
            pngs.append(png_bytes(image, text))
        # the caller's options, this request's overrides
        options = {**plan.selection.options, **(req.override_settings or {})}
        saving = bool(req.save_images or eas.get("save_dir"))  # PAI-EAS: a save_dir means save there
        # A1111 puts a grid first when the request saves images, it makes one (two or more images, or one with
        # `grid_only_if_multiple` off) and `return_grid` is on (the API overwrites `do_not_save_grid` with
        # `not save_images`); its infotext is the first image's.
        grid = req.save_images and outputs.grid_allowed(len(pngs), options) and bool(options.get("return_grid", True))
        save_grid = saving and outputs.wants_grid(len(pngs), options)
        grid_png = (png_bytes(outputs.image_grid(result.images, options, job.batch_size), infotexts[0])
                    if grid or save_grid else None)
        written = outputs.Saved()
        if saving:
            written = outputs.save_outputs(
                self.storage, self.settings.outputs_dir, mode, pngs=pngs, seeds=result.seeds,
                save_dir=eas.get("save_dir"), grid=grid_png if save_grid else None, maps=map_pngs)
        saved = written.images
        parameters = sent.model_dump(mode="json")
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            parameters["init_images"] = None
            parameters["mask"] = None
        if eas:
            parameters.update(eas_parameters(eas, written, result.seeds, result.generation_seconds))
        if grid and grid_png is not None:
            pngs.insert(0, grid_png)
            infotexts.insert(0, infotexts[0])
        info = a1111.info_object(req, job, model, result, infotexts, extras, index_of_first_image=int(grid))
        log.info("%s: %d image(s) %dx%d, %d steps, %.3f s generating", mode, len(pngs), job.width, job.height,
                 job.steps, result.generation_seconds)
        # "Save to DataBase": per request, else the setting; a client that sends an Idempotency-Key expects a
        # retry to find the images it paid for, so those are kept too.
        meter = metering.current()
        keep = eas.get("save_to_db", self.settings.save_images_to_db or bool(meter and meter.idempotency_key))
        # PAI-EAS answers `images: []` to a request that saves to `save_dir` (the results are read from storage),
        # unless the request itself sends `send_images: true` (A1111's default is true, so only an explicit one counts).
        send = req.send_images and (not eas.get("save_dir") or "send_images" in sent.model_fields_set)
        encoded: list[Any] = [b64(data) if send or keep else None for data in pngs]
        records = [ImageRecord(prompt=req.prompt, negative_prompt=req.negative_prompt, steps=job.steps, seed=seed,
                               sampler=str(params.get("Sampler", "")), cfg_scale=float(job.cfg_scale),
                               size=f"{job.width}x{job.height}", model_hash=params.get("Model hash"),
                               model=params.get("Model"), image_base64=data if keep else None,
                               image_url=saved[i] if i < len(saved) else None)
                   for i, (seed, data) in enumerate(zip(result.seeds, encoded[int(grid):]))]
        response = {
            "images": [*encoded, *(b64(data) for data in map_pngs)] if send else [],
            "parameters": parameters,
            "info": json.dumps(info, ensure_ascii=False),
        }
        return Outcome(response=response, records=records, generation_seconds=result.generation_seconds)


def eas_parameters(eas: dict[str, Any], written: outputs.Saved, seeds: list[int],
                   generation_seconds: float) -> dict[str, Any]:
    """The keys PAI-EAS puts in a finished generation's `parameters`: `status` 0 (success), `image_url` (the saved
    grid first when one was saved, then every image), `image_mask_url` (the ControlNet maps; "" when none), `seed`
    (every image's, in image order), all comma-separated strings; `error_msg` "" and `total_time` in seconds."""
    urls = [written.grid, *written.images] if written.grid else written.images
    return {"id_task": eas.get("id_task"), "status": 0, "image_url": ",".join(urls),
            "image_mask_url": ",".join(written.maps), "seed": ",".join(str(seed) for seed in seeds),
            "error_msg": "", "total_time": round(generation_seconds, 3)}
