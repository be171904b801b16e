"""LoRA as A1111 offers it: `<lora:name:weight>` tags in the prompt, files under models/Lora, adapters on the
warm pipelines.

- `parse_prompt` removes every extra-network tag (`<kind:args>`) from the text the encoder sees, as A1111's
  `extra_networks.parse_prompt` does; `LoraStore.resolve` turns the `lora` tags into `LoraUse`s (unknown
  name -> ModelNotFound naming it; more than `max_per_prompt` tags -> a 422 naming the prompt, before any file
  is looked at). Other kinds (`hypernet`, ...) are not offered: a 422 naming the prompt.
- `LoraStore` scans models/Lora (`.safetensors` only: pickle files can run code), lists them in A1111's shape
  and gives A1111's `Lora hashes` short hash (metadata `sshs_model_hash`, else the addnet hash's first 12 hex).
- `LoraAdapters` loads a LoRA once per set of pipeline modules with diffusers' `load_lora_weights(...,
  adapter_name=)` (kohya and diffusers formats both load: diffusers converts kohya keys), keeps at most
  `max_loaded` of them (least recently used deleted), and per job either activates exactly the requested
  adapters with their text-encoder and UNet weights (`set_adapters`) or disables every adapter, so a request
  without LoRA after one with LoRA runs the base weights. Adapters live on the UNet and text-encoder modules,
  which a checkpoint's pipelines (with and without an external VAE) share, so the registry is keyed by the
  UNet module. Device thread only: one job at a time sets the adapters it runs with.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidParameter, ModelNotFound
from pipelines.hashing import HashCache
from pipelines.safetensors_header import read_metadata
from pipelines.store import scan_safetensors

log = logging.getLogger(__name__)

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra_networks.re_extra_net
LORA_KINDS = ("lora", "lyco")  # A1111 treats <lyco:...> as a LoRA since 1.5
MAX_PER_PROMPT = 8  # the default of settings.max_loras_per_prompt

# peft warns on every second adapter of a model; several adapters per model is what this module is for.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA file. `name` is the file stem (A1111's name); `alias` its `ss_output_name`, else the name."""

    name: str
    path: Path
    alias: str
    metadata: dict[str, str] = field(hash=False, compare=False)


@dataclass(frozen=True)
class LoraUse:
    """A LoRA a prompt asked for: the name as written and the text-encoder and UNet multipliers."""

    written: str
    entry: LoraEntry
    te: float
    unet: float
    shorthash: str  # A1111's 12-hex LoRA hash, for the infotext

    @property
    def key(self) -> tuple[str, float, float]:
        return (str(self.entry.path), self.te, self.unet)


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The prompt without its extra-network tags, and the tags as (kind, args) in prompt order."""
    found: list[tuple[str, list[str]]] = []

    def take(match: re.Match[str]) -> str:
        found.append((match.group(1), match.group(2).split(":")))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), found


def _multipliers(args: list[str], field: str) -> tuple[float, float]:
    """A1111's LoRA arguments `name[:te[:unet]]` plus named `te=`, `unet=` (and `dyn=`, ignored):
    te defaults to 1, unet to te."""
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        te = unet = math.nan
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise InvalidParameter(f"{field}: <lora:{':'.join(args)}> has a weight that is not a finite number",
                               field=field)
    return te, unet


class LoraStore:
    """The LoRA files under models/Lora, rescanned by `refresh()` (POST /refresh-loras). A prompt may name at
    most `max_per_prompt` of them (settings.max_loras_per_prompt). Thread-safe."""

    def __init__(self, root: Path, hashes: HashCache, *, max_per_prompt: int = MAX_PER_PROMPT) -> None:
        self.root = root
        self.hashes = hashes  # computes addnet hashes
        self.max_per_prompt = max_per_prompt
        self._lock = threading.Lock()
        self._entries: list[LoraEntry] = []
        self._by_name: dict[str, LoraEntry] = {}
        self._scanned = False  # the first use scans (a folder on a network mount), not the constructor

    def refresh(self) -> None:
        entries: list[LoraEntry] = []
        for path in scan_safetensors(self.root, "LoRA"):
            meta = read_metadata(path)
            entries.append(LoraEntry(name=path.stem, path=path, alias=meta.get("ss_output_name") or path.stem,
                                     metadata=meta))
        by_name: dict[str, LoraEntry] = {}
        for entry in entries:  # A1111: a name wins over another file's alias
            by_name.setdefault(entry.alias, entry)
        for entry in entries:
            by_name[entry.name] = entry
        with self._lock:
            self._entries, self._by_name, self._scanned = entries, by_name, True
        log.info("found %d LoRA(s)", len(entries))

    @property
    def entries(self) -> list[LoraEntry]:
        if not self._scanned:
            self.refresh()
        with self._lock:
            return list(self._entries)

    def listing(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/loras items."""
        return [{"name": e.name, "alias": e.alias, "path": str(e.path), "metadata": _listed_metadata(e.metadata)}
                for e in self.entries]

    def find(self, name: str, *, field: str = "prompt") -> LoraEntry:
        if not self._scanned:
            self.refresh()
        with self._lock:
            entry = self._by_name.get(name)
        if entry is None:
            raise ModelNotFound(f"{field}: LoRA '{name}' not found under models/Lora", field=field)
        return entry

    def shorthash(self, entry: LoraEntry) -> str:
        """A1111's 12-hex LoRA hash: metadata `sshs_model_hash` when present, else the addnet hash."""
        given = entry.metadata.get("sshs_model_hash")
        try:
            return (given or self.hashes.sha256(entry.path))[:12]
        except FileNotFoundError:
            raise ModelNotFound(f"LoRA '{entry.name}' is no longer on the mount; refresh the LoRA list",
                                field="prompt") from None

    def resolve(self, prompt: str, *, apply: bool = True, field: str = "prompt") -> tuple[str, list[LoraUse]]:
        """The prompt the encoder sees (every extra-network tag removed) and the LoRAs it asks for (none when
        `apply` is false: A1111's `disable_extra_networks`). A LoRA named twice is applied once with the
        multipliers added, which is what applying it twice amounts to. Everything is checked here, before any
        work: the number of LoRA tags (`max_per_prompt`, each tag counts), names, weights, and each file's hash
        (read once per file, then cached)."""
        text, tags = parse_prompt(prompt)
        if not apply:
            return text, []
        count = sum(1 for kind, _ in tags if kind in LORA_KINDS)
        if count > self.max_per_prompt:
            raise InvalidParameter(f"{field}: {count} LoRA tags; at most {self.max_per_prompt} per prompt",
                                   field=field)
        merged: dict[str, LoraUse] = {}
        for kind, args in tags:
            if kind not in LORA_KINDS:
                raise InvalidParameter(f"{field}: extra network <{kind}:...> is not offered (only <lora:...>)",
                                       field=field)
            if not args or not args[0]:
                raise InvalidParameter(f"{field}: <{kind}:...> names no LoRA", field=field)
            te, unet = _multipliers(args, field)
            entry = self.find(args[0], field=field)
            before = merged.get(str(entry.path))
            if before is not None:
                te, unet = te + before.te, unet + before.unet
            merged[str(entry.path)] = LoraUse(written=before.written if before else args[0], entry=entry, te=te,
                                              unet=unet, shorthash=before.shorthash if before else self.shorthash(entry))
        return text, list(merged.values())

    @staticmethod
    def hashes_infotext(uses: list[LoraUse]) -> str | None:
        """The infotext's `Lora hashes` value: `name: hash` per LoRA as written, `:` and `,` removed."""
        if not uses:
            return None
        return ", ".join(f"{u.written.replace(':', '').replace(',', '')}: {u.shorthash}" for u in uses)


def _listed_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """A1111 lists a LoRA's metadata with its JSON-valued entries (tag frequencies...) parsed."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if value[:1] in "{[":
            try:
                out[key] = json.loads(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out


class LoraAdapters:
    """Which LoRA adapters are loaded on which pipeline modules, and the switching between them per job."""

    def __init__(self, max_loaded: int = 8) -> None:
        self.max_loaded = max_loaded
        self.loads = 0  # adapters loaded from disk (tests and metrics read it)
        self.unloads = 0
        self._names = itertools.count(1)
        # UNet module -> {(path, size, mtime): adapter name}, least recently used first.
        self._loaded: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[str, int, int], str]] = (
            weakref.WeakKeyDictionary())

    def loaded(self, pipe: Any) -> list[str]:
        """Adapter names loaded on `pipe`'s modules."""
        return list(self._loaded.get(pipe.unet, {}).values())

    def apply(self, pipe: Any, uses: list[LoraUse]) -> None:
        """Make `pipe` run with exactly `uses` (loading any not yet loaded); none -> every adapter disabled."""
        loaded = self._loaded.setdefault(pipe.unet, OrderedDict())
        if not uses:
            if loaded:
                pipe.disable_lora()
            return
        names: list[str] = []
        for use in uses:
            key = _file_key(use)
            name = loaded.get(key)
            if name is None:
                self._make_room(pipe, loaded, keep={_file_key(u) for u in uses})
                name = f"lora{next(self._names)}"
                self._load(pipe, use, name)
                loaded[key] = name
            loaded.move_to_end(key)
            names.append(name)
        present = pipe.get_list_adapters()  # component -> adapter names it carries
        weights = [{component: (use.unet if component == "unet" else use.te)
                    for component, adapters in present.items() if name in adapters}
                   for use, name in zip(uses, names)]
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)

    def _make_room(self, pipe: Any, loaded: OrderedDict[tuple[str, int, int], str], keep: set) -> None:
        while len(loaded) >= self.max_loaded:
            victim = next((k for k in loaded if k not in keep), None)
            if victim is None:
                return
            pipe.delete_adapters(loaded.pop(victim))
            self.unloads += 1
            log.info("unloaded LoRA %s (at most %d stay loaded)", Path(victim[0]).name, self.max_loaded)

    def _load(self, pipe: Any, use: LoraUse, name: str) -> None:
        """Load one LoRA file as adapter `name`; a file diffusers cannot use, or one with no weights for this
        checkpoint's modules, is a 422 naming it and leaves nothing behind."""
        field = "prompt"
        try:
            pipe.load_lora_weights(str(use.entry.path), adapter_name=name)
        except FileNotFoundError:
            raise ModelNotFound(f"LoRA '{use.written}' is no longer on the mount; refresh the LoRA list",
                                field=field) from None
        except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
            self._discard(pipe, name)
            log.warning("LoRA %s did not load: %s", use.entry.path.name, exc)
            raise InvalidParameter(f"{field}: LoRA '{use.written}' cannot be applied to this checkpoint (not a "
                                   "LoRA for its architecture)", field=field) from None
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise InvalidParameter(f"{field}: LoRA '{use.written}' has no weights for this checkpoint's modules",
                                   field=field)
        self.loads += 1
        log.info("loaded LoRA %s as adapter %s", use.entry.path.name, name)

    @staticmethod
    def _discard(pipe: Any, name: str) -> None:
        try:
            pipe.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass


def _file_key(use: LoraUse) -> tuple[str, int, int]:
    """A LoRA file's identity: path, size and mtime (a replaced file is loaded again)."""
    try:
        st = use.entry.path.stat()
    except FileNotFoundError:
        return (str(use.entry.path), -1, -1)
    return (str(use.entry.path), st.st_size, st.st_mtime_ns)
