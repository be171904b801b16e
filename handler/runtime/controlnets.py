"""The ControlNet models of a worker: the models folder and the few models kept loaded.

The folder (`pipelines.controlnet.store.ControlNetStore`: find, inspect, list) is opened on first use: that module
brings torch, which health checks and app start never import. Loaded models are kept as A1111's ControlNet
extension keeps them: the last `CONTROLNET_CACHE` used (its `control_net_model_cache_size` default), per file,
device and dtype, in a `cachetools.LRUCache`. Loading and that cache belong to the device thread.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cachetools import LRUCache

log = logging.getLogger(__name__)

CONTROLNET_CACHE = 2  # ControlNet models kept loaded (A1111's control_net_model_cache_size default)


class ControlNets:
    """The folder `folder` (`store`) and the loaded models (`model`, `clear`: device thread only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._store: Any = None
        self._loaded: LRUCache[tuple[str, str, str], Any] = LRUCache(maxsize=CONTROLNET_CACHE)

    @property
    def store(self) -> Any:
        """The ControlNet models folder (pipelines.controlnet.store.ControlNetStore), made on first use."""
        if self._store is None:
            from pipelines.controlnet.store import ControlNetStore

            self._store = ControlNetStore(self.folder)
        return self._store

    def model(self, entry: Any, model: Any) -> Any:
        """The ControlNet model of `entry` on `model`'s device and dtype, loaded unless it is one of the last
        ones used."""
        from pipelines.controlnet.loading import load_controlnet

        unet = model.pipe.unet
        key = (str(entry.path), str(unet.device), str(unet.dtype))
        try:
            return self._loaded[key]  # and it becomes the most recently used
        except KeyError:
            pass
        started = time.perf_counter()
        loaded = load_controlnet(entry, dtype=unet.dtype, device=str(unet.device),
                                 spec=self.store.spec(entry))
        log.info("ControlNet %s loaded in %.2f s", entry.title, time.perf_counter() - started)
        self._loaded[key] = loaded  # the least recently used one leaves when the cache is full
        return loaded

    def clear(self) -> None:
        """Drop every loaded model (device memory release, out-of-memory recovery)."""
        self._loaded.clear()
