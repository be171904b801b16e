"""Dynamic batching: compatible txt2img jobs that wait for the device together run as one pipeline call.

A job can share a UNet batch with others when they use the same model and VAE, size, steps, sampler, CFG scale,
clip skip, tiling and eta (txt2img only, no variation seed, `n_iter` 1). A request joins the open group of its
key, or opens one; the opener waits up to `batch.max_wait_ms` for company, then queues the group on the device
thread, and others may still join until the device starts it or it holds `batch.max_size` images. On the device
the group is one job with per-image prompts and seeds: image i depends only on its own seed, so each member gets
the images it would have got alone (within 1/255, the batch-vs-single tolerance). Each member is billed for a
share of the group's device time proportional to its image count, never for the whole batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handler.runtime.executor import DeviceExecutor, JobTimeout
from handler.runtime.progress import TaskEntry
from handler.settings import BatchSettings


@dataclass
class Member:
    """One request's place in a group; the device thread fills `outcome` (model, result) or `error`."""

    job: Any  # pipelines.generate.ImageJob
    consumer: str
    task: TaskEntry | None = None  # its place in the progress registry (active when the group starts)
    submitted: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    outcome: tuple[Any, Any] | None = None
    error: BaseException | None = None
    queue_wait: float | None = None
    model_load: float | None = None


@dataclass
class _Group:
    members: list[Member]
    images: int
    full: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Forms groups per compatibility key and runs each as one device job (`run_group` does the work)."""

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        self._open: dict[tuple[Any, ...], _Group] = {}
        self._lock = threading.Lock()
        self.groups_run = 0  # device jobs run for groups, and the requests they served
        self.members_run = 0

    @property
    def enabled(self) -> bool:
        return self.settings.max_size > 1

    def key(self, job: Any, checkpoint: Any, vae: Any) -> tuple[Any, ...] | None:
        """The compatibility key of `job`, or None when it runs alone."""
        if (not self.enabled or job.mode != "txt2img" or job.subseed_strength or len(job.seeds) != job.batch_size
                or job.batch_size >= self.settings.max_size or job.staged or job.controls or job.restore_faces):
            return None
        sampler = job.sampler
        return (str(checkpoint.path), str(vae.path) if vae is not None else None, job.width, job.height, job.steps,
                sampler.sampler.name, sampler.schedule_label, job.cfg_scale, job.clip_skip, job.tiling, job.eta,
                tuple(use.key for use in job.loras))

    def run(self, key: tuple[Any, ...], member: Member, device: DeviceExecutor,
            run_group: Callable[[list[Member]], None], deadline: float | None) -> Member:
        """Put `member` in a group for `key` and return it once its group ran (outcome or error set). Raises
        JobTimeout when `deadline` (monotonic) passes first; the group still runs for the others."""
        n = len(member.job.seeds)
        with self._lock:
            group = self._open.get(key)
            opener = group is None or group.images + n > self.settings.max_size
            if opener:
                group = _Group(members=[member], images=n)
                self._open[key] = group  # a group that cannot grow is closed at once below
            else:
                group.members.append(member)
                group.images += n
            if group.images >= self.settings.max_size:
                group.full.set()
                if self._open.get(key) is group:
                    del self._open[key]
        if opener:
            self._open_group(key, group, device, run_group)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not member.done.wait(remaining):
            raise JobTimeout(started=member.queue_wait is not None)
        if member.error is not None:
            raise member.error
        return member

    def _open_group(self, key: tuple[Any, ...], group: _Group, device: DeviceExecutor,
                    run_group: Callable[[list[Member]], None]) -> None:
        """Wait for company (or a full group), then run the group on the device thread."""
        group.full.wait(self.settings.max_wait_ms / 1000)

        def on_device() -> None:
            with self._lock:  # from here on nobody joins: the device has started this group
                if self._open.get(key) is group:
                    del self._open[key]
                members = list(group.members)
                self.groups_run += 1
                self.members_run += len(members)
            try:
                run_group(members)
            except BaseException as exc:
                for m in members:
                    if not m.done.is_set():
                        m.error = exc
                        m.done.set()
                raise

        try:
            device.run(on_device)
        except BaseException:
            pass  # every member got the error (above)
