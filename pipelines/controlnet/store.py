"""The ControlNet models folder, `<data>/models/ControlNet`, as sd-webui-controlnet lists it
(scripts/global_state.py).

`ControlNetStore` lists `.safetensors` files and diffusers folders with the extension's titles
(`<stem> [<8-hex>]`, A1111's legacy hash: sha256 of the 64 KiB at 1 MiB) and resolves a unit's `model` as the
extension does. Pickle files are never offered. Links that lead out of the folder are skipped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.controlnet.loading import (
    WEIGHT_FILES,
    ControlNetSpec,
    inspect_controlnet,
    is_controlnet_dir,
)
from pipelines.errors import InvalidParameter, ModelNotFound, PickleCheckpointRefused
from pipelines.hashing import legacy_model_hash
from pipelines.store import PICKLE_SUFFIXES, leads_outside

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlNetEntry:
    """One ControlNet: `name` is its path relative to the folder; `title` is what the extension lists."""

    name: str
    path: Path
    is_dir: bool
    short_hash: str  # A1111's legacy 8-hex hash (of the weights file for a diffusers folder)

    @property
    def stem(self) -> str:
        return self.path.name if self.is_dir else self.path.stem

    @property
    def title(self) -> str:
        return f"{self.stem} [{self.short_hash}]"

    @property
    def weights(self) -> Path:
        """The safetensors file holding the weights."""
        if not self.is_dir:
            return self.path
        return next((self.path / n for n in WEIGHT_FILES if (self.path / n).is_file()), self.path / WEIGHT_FILES[0])


class ControlNetStore:
    """The ControlNets under `root` (sub-folders too), scanned on construction and on `refresh`. Thread-safe.

    Single `.safetensors` files and diffusers folders (`config.json` of a `ControlNetModel` plus a safetensors
    weights file). Pickle files are never offered (naming one is a clear error); hidden files, a file whose stem
    is `None`, and links leading out of `root` are skipped. Titles repeat the extension's: `<stem> [<hash>]`,
    sorted by file name; of two models with one stem the first in path order is kept.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._entries: list[ControlNetEntry] = []
        self._refused: dict[str, Path] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._specs: dict[tuple[str, int, int], ControlNetSpec] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folder."""
        entries: list[ControlNetEntry] = []
        refused: dict[str, Path] = {}
        root = self.root
        if root.is_dir():
            real_root = root.resolve()
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if any(part.startswith(".") for part in rel.parts) or _inside_model_dir(path, root):
                    continue
                if path.is_dir():
                    if not is_controlnet_dir(path) or leads_outside(path, real_root, "ControlNet"):
                        continue
                    weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
                    if weights is None:
                        log.warning("ControlNet folder %s has no safetensors weights and is not offered", rel)
                        continue
                    entries.append(ControlNetEntry(rel.as_posix(), path, True, self._hash(weights)))
                elif path.suffix.lower() in PICKLE_SUFFIXES:
                    refused[rel.as_posix()] = path
                elif (path.suffix == ".safetensors" and path.stem != "None"
                      and not leads_outside(path, real_root, "ControlNet")):
                    entries.append(ControlNetEntry(rel.as_posix(), path, False, self._hash(path)))
        for rel in refused:
            log.warning("ControlNet %s is a pickle file and is not offered; convert it to .safetensors", rel)
        seen: set[str] = set()
        unique: list[ControlNetEntry] = []
        for entry in entries:
            if entry.stem.lower() in seen:
                log.warning("ControlNet %s has the name of another one and is not offered", entry.name)
                continue
            seen.add(entry.stem.lower())
            unique.append(entry)
        unique.sort(key=lambda e: e.path.name)
        with self._lock:
            self._entries, self._refused = unique, refused
        log.info("found %d ControlNet model(s)", len(unique))

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = legacy_model_hash(path)
            with self._lock:
                self._hashes[key] = known
        return known

    @property
    def entries(self) -> list[ControlNetEntry]:
        with self._lock:
            return list(self._entries)

    def model_list(self) -> list[str]:
        """The titles, as the extension's `GET /controlnet/model_list` gives them (without "None")."""
        return [e.title for e in self.entries]

    def find(self, name: str, field: str) -> ControlNetEntry:
        """Resolve a unit's `model` as the extension does: the title, then the stem ignoring case, then the
        shortest stem containing the name; a title whose hash differs from the file's resolves by its stem
        (logged). Unknown -> ModelNotFound; "None" -> InvalidParameter; a pickle file -> PickleCheckpointRefused;
        all naming `field`."""
        wanted = (name or "").strip() if isinstance(name, str) else ""
        if wanted in ("", "None", "none"):
            raise InvalidParameter(f"{field}: no ControlNet model selected", field=field)
        entries = self.entries
        low = wanted.lower()
        for entry in entries:
            if wanted == entry.title:
                return entry
        for entry in entries:
            if low in (entry.stem.lower(), entry.name.lower()):
                return entry
        bare, _, bracket = wanted.partition(" [")
        if bracket.endswith("]"):
            for entry in entries:
                if bare.lower() == entry.stem.lower():
                    log.warning("%s: '%s' has hash [%s] here; using it", field, entry.stem, entry.short_hash)
                    return entry
        containing = sorted((e for e in entries if low in e.stem.lower()), key=lambda e: len(e.stem))
        if containing:
            return containing[0]
        stem = Path(bare).stem if Path(bare).suffix.lower() in PICKLE_SUFFIXES else bare
        with self._lock:
            refused = dict(self._refused)
        if any(bare == rel or stem.lower() == Path(rel).stem.lower() for rel in refused):
            raise PickleCheckpointRefused(f"{field}: ControlNet '{wanted}' is a pickle file; only .safetensors "
                                          "models are loaded", field=field)
        raise ModelNotFound(f"{field}: ControlNet model '{wanted}' not found under models/ControlNet", field=field)

    def spec(self, entry: ControlNetEntry, field: str | None = None) -> ControlNetSpec:
        """`inspect_controlnet` of the entry, cached while the file is unchanged."""
        st = entry.weights.stat()
        key = (str(entry.path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._specs.get(key)
        if known is None:
            known = inspect_controlnet(entry.path, field=field)
            with self._lock:
                self._specs[key] = known
        return known


def _inside_model_dir(path: Path, root: Path) -> bool:
    """Whether `path` lies inside a diffusers ControlNet folder under `root` (part of that model, not one)."""
    for parent in path.parents:
        if parent == root:
            return False
        if is_controlnet_dir(parent):
            return True
    return False
