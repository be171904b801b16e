"""The checkpoints on the mount, listed and named as A1111 lists and names them.

`ModelStore` scans `<data>/models/Stable-diffusion` (single-file `.safetensors` and diffusers folders, in
sub-folders too) and `<data>/models/VAE`. Clients name models; they never give paths: a name is only ever
matched against what the scan found, so nothing a client sends can point outside the models root. Nor can a
symbolic link placed in a folder: a model whose real path (links followed) leaves the folder it was found in is
not offered (logged), while the folder itself may be a link (a mount) and links within it are followed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import ModelNotFound, PickleCheckpointRefused
from pipelines.hashing import HashCache, legacy_model_hash

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})  # never loaded: pickle runs code


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint: `name` is the path relative to the checkpoints folder, with extension (A1111's name)."""

    name: str
    path: Path
    is_dir: bool

    @property
    def model_name(self) -> str:
        stem = self.name[: -len(".safetensors")] if self.name.endswith(".safetensors") else self.name
        return stem.replace("/", "_").replace("\\", "_")

    @property
    def stem(self) -> str:
        return Path(self.name).stem if not self.is_dir else Path(self.name).name

    @property
    def config(self) -> str | None:
        yaml = self.path.with_suffix(".yaml")
        return str(yaml) if not self.is_dir and yaml.is_file() else None


@dataclass(frozen=True)
class VaeEntry:
    name: str  # file name with extension, relative to models/VAE
    path: Path


class ModelStore:
    """Scanned checkpoints and VAEs plus their (lazily computed) hashes. Thread-safe."""

    def __init__(self, checkpoints_dir: Path, vae_dir: Path, hash_cache: HashCache) -> None:
        self.checkpoints_dir = checkpoints_dir
        self.vae_dir = vae_dir
        self.hashes = hash_cache
        self._lock = threading.Lock()
        self._checkpoints: list[CheckpointEntry] = []
        self._refused: dict[str, Path] = {}
        self._vaes: list[VaeEntry] = []
        self.refresh()

    # scanning -------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the folders (POST /refresh-checkpoints)."""
        checkpoints: list[CheckpointEntry] = []
        refused: dict[str, Path] = {}
        root = self.checkpoints_dir
        if root.is_dir():
            real_root = root.resolve()
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root).as_posix()
                if any(part.startswith(".") for part in path.relative_to(root).parts):
                    continue  # temp files of an atomic write, hidden folders
                if path.is_dir() and (path / "model_index.json").is_file():
                    is_dir = True
                elif path.is_file() and path.suffix == ".safetensors" and not _inside_diffusers_dir(path, root):
                    is_dir = False
                else:
                    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES and not _inside_diffusers_dir(path, root):
                        refused[rel] = path
                    continue
                if not leads_outside(path, real_root, "checkpoint"):
                    checkpoints.append(CheckpointEntry(rel, path, is_dir))
        for rel in refused:
            log.warning("checkpoint %s is a pickle file and is not offered; convert it to .safetensors", rel)
        vaes: list[VaeEntry] = []
        if self.vae_dir.is_dir():
            real_root = self.vae_dir.resolve()
            for path in sorted(self.vae_dir.rglob("*.safetensors")):
                if not leads_outside(path, real_root, "VAE"):
                    vaes.append(VaeEntry(path.relative_to(self.vae_dir).as_posix(), path))
        with self._lock:
            self._checkpoints, self._refused, self._vaes = checkpoints, refused, vaes
        log.info("found %d checkpoint(s), %d VAE(s)", len(checkpoints), len(vaes))

    @property
    def checkpoints(self) -> list[CheckpointEntry]:
        with self._lock:
            return list(self._checkpoints)

    @property
    def vaes(self) -> list[VaeEntry]:
        with self._lock:
            return list(self._vaes)

    # hashes ---------------------------------------------------------------------------------------------
    def sha256(self, entry: CheckpointEntry | VaeEntry) -> str | None:
        """Full sha256 of a single file (computed on first call); None for diffusers folders."""
        if isinstance(entry, CheckpointEntry) and entry.is_dir:
            return None
        try:
            return self.hashes.sha256(entry.path)
        except FileNotFoundError:  # removed from the mount since the last scan
            raise ModelNotFound(f"'{entry.name}' is no longer on the mount; refresh the model list") from None

    def known_sha256(self, entry: CheckpointEntry) -> str | None:
        """The sha256 if already computed; never reads the file (A1111 lists lazily)."""
        return None if entry.is_dir else self.hashes.peek(entry.path)

    def title(self, entry: CheckpointEntry, *, compute: bool = False) -> str:
        """`name [sha256[:10]]`, or `name` while the hash is unknown."""
        return format_title(entry.name, self.sha256(entry) if compute else self.known_sha256(entry))

    def listing(self) -> list[dict]:
        """GET /sdapi/v1/sd-models items."""
        items = []
        for entry in self.checkpoints:
            sha = self.known_sha256(entry)
            items.append(
                {
                    "title": format_title(entry.name, sha),
                    "model_name": entry.model_name,
                    "hash": sha[:10] if sha else None,
                    "sha256": sha,
                    "filename": str(entry.path),
                    "config": entry.config,
                }
            )
        return items

    # name resolution ------------------------------------------------------------------------------------
    def find_checkpoint(self, name: str, *, field: str = "sd_model_checkpoint") -> CheckpointEntry:
        """Resolve any name form A1111 accepts: title, name, model_name, stem, `name [hash]`, `stem [hash]`,
        short (10) or full sha256, legacy 8-hex hash. Unknown -> ModelNotFound; a pickle file -> PickleCheckpointRefused."""
        wanted = (name or "").strip()
        entries = self.checkpoints
        bare, _, bracket = wanted.partition(" [")
        short = bracket[:-1] if bracket.endswith("]") else None
        for entry in entries:
            if wanted in (entry.name, entry.model_name, entry.stem):
                return entry
            if short is not None and bare in (entry.name, entry.stem, entry.model_name):
                sha = self.known_sha256(entry) or self.sha256(entry)
                if sha and sha.startswith(short.lower()):
                    return entry
        if _looks_like_hash(wanted):
            low = wanted.lower()
            for entry in entries:  # computed hashes first, then compute lazily
                sha = self.known_sha256(entry)
                if sha and (sha == low or (len(low) == 10 and sha.startswith(low))):
                    return entry
            for entry in entries:
                if entry.is_dir:
                    continue
                if len(low) == 8 and legacy_model_hash(entry.path) == low:
                    return entry
                sha = self.sha256(entry)
                if sha and (sha == low or (len(low) == 10 and sha.startswith(low))):
                    return entry
        if wanted in self._refused or any(wanted == Path(n).stem for n in self._refused):
            raise PickleCheckpointRefused(
                f"checkpoint '{wanted}' is a pickle file (.ckpt/.pt); only .safetensors checkpoints are loaded",
                field=field,
            )
        raise ModelNotFound(f"checkpoint '{wanted}' not found under models/Stable-diffusion", field=field)

    def find_vae(self, name: str, *, field: str = "sd_vae") -> VaeEntry | None:
        """None for "Automatic"/"None"/empty (the checkpoint's own VAE); else the VAE file by name or stem."""
        wanted = (name or "").strip()
        if wanted in ("", "Automatic", "None", "auto", "automatic"):
            return None
        for entry in self.vaes:
            if wanted in (entry.name, Path(entry.name).stem, Path(entry.name).name):
                return entry
        raise ModelNotFound(f"VAE '{wanted}' not found under models/VAE", field=field)


def scan_safetensors(root: Path, what: str) -> list[Path]:
    """The `.safetensors` files under `root` (sub-folders too, sorted), skipping hidden files and folders (temp
    files of atomic writes and downloads) and links that lead out of `root`; pickle files are logged as refused
    (`what` names the kind)."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    real_root = root.resolve()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            log.warning("%s %s is a pickle file and is not offered; convert it to .safetensors", what, rel)
        elif path.suffix == ".safetensors" and not leads_outside(path, real_root, what):
            found.append(path)
    return found


def leads_outside(path: Path, real_root: Path, what: str) -> bool:
    """True (and logged) when `path`, its symbolic links followed, is not under `real_root` (a resolved
    folder): a link in a models folder must not hand out a file from elsewhere on the machine."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a link loop
        real = None
    if real is not None and real_root in real.parents:
        return False
    log.warning("%s %s is a symbolic link to outside %s and is not offered", what, path.name, real_root)
    return True


def format_title(name: str, sha256: str | None) -> str:
    """A1111's checkpoint title: `name [sha256[:10]]`, or `name` while the hash is unknown."""
    return f"{name} [{sha256[:10]}]" if sha256 else name


def _looks_like_hash(text: str) -> bool:
    return len(text) in (8, 10, 64) and all(c in "0123456789abcdefABCDEF" for c in text)


def _inside_diffusers_dir(path: Path, root: Path) -> bool:
    """True when `path` lies inside a diffusers folder below `root` (its weights are not checkpoints)."""
    for parent in path.parents:
        if parent == root:
            return False
        if (parent / "model_index.json").is_file():
            return True
    return False
