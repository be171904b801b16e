"""A request's saved images: the A1111 / PAI-EAS outputs layout, storage keys and the URLs they get.

A request saves when it sets `save_images: true` or the PAI-EAS key `alwayson_scripts.save_dir` (which implies
saving). Keys, relative to the outputs root (`<data>/outputs`, or the OSS prefix that stands for it):

    {txt2img,img2img}-images/YYYY-MM-DD/<HHMMSS>-<id>-<seed>.png    (under `<save_dir>/` with a save_dir, as PAI-EAS)
    {txt2img,img2img}-grids/YYYY-MM-DD/grid-<HHMMSS>-<id>.png       (when A1111 would save a grid; likewise)

`<id>` is short and random, one per request; an image whose seed repeats within the request (variation seeds)
gets its index appended. `save_dir` is checked before anything is generated (`check_request`): a path relative
to the outputs root, or an absolute path inside it; `..`, control characters, other absolute paths and
symlinks that lead out are a 422 naming `alwayson_scripts.save_dir`. A write the storage refuses is a 503
`storage_unavailable`, raised before the request is charged.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from handler.contract import a1111
from handler.contract.schemas import GenerationRequest
from handler.errors import InvalidRequest, StorageUnavailable
from handler.storage.backends import LocalStorage, Storage

log = logging.getLogger(__name__)

SAVE_DIR_FIELD = "alwayson_scripts.save_dir"
MAX_SAVE_DIR_CHARS = 1024


@dataclass
class Saved:
    """What one request wrote: the images' URLs (in image order), the grid's if one was made, and the ControlNet
    detected maps' (PAI-EAS `image_mask_url`)."""

    images: list[str] = field(default_factory=list)
    grid: str | None = None
    maps: list[str] = field(default_factory=list)


def _refuse(reason: str) -> InvalidRequest:
    return InvalidRequest(f"{SAVE_DIR_FIELD}: {reason}", field=SAVE_DIR_FIELD)


def check_save_dir(save_dir: str | None, storage: Storage, outputs_root: Path) -> str | None:
    """The folder key `save_dir` names (relative to the outputs root; "" is the root itself), or None when
    the request names none. InvalidRequest (422) when it could write outside the outputs root."""
    if not save_dir:
        return None
    if len(save_dir) > MAX_SAVE_DIR_CHARS:
        raise _refuse(f"longer than {MAX_SAVE_DIR_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in save_dir):
        raise _refuse("must not contain NUL or other control characters")
    path = PurePosixPath(save_dir)
    if ".." in path.parts:
        raise _refuse("must not contain '..'")
    if any(len(part.encode()) > 255 for part in path.parts):
        raise _refuse("a folder name is longer than 255 bytes")
    if path.is_absolute():
        rel = _inside(path, outputs_root)
        if rel is None:
            raise _refuse("an absolute path must be inside the outputs folder; or give a path relative to it")
        path = rel
    key = "/".join(path.parts)
    if isinstance(storage, LocalStorage):  # a symlink on the way may lead out: resolve it on the real folder
        try:
            target = (storage.root / key).resolve()
            if target != storage.root and storage.root not in target.parents:
                raise _refuse("leads outside the outputs folder")
            existing = next(p for p in (target, *target.parents) if p.exists())  # the root exists
        except OSError:
            raise _refuse("is not a usable folder name") from None
        if not existing.is_dir():
            raise _refuse("names a file, not a folder")
    return key


def _inside(path: PurePosixPath, root: Path) -> PurePosixPath | None:
    """`path` relative to `root` (as configured, or with its symlinks resolved), else None."""
    for base in dict.fromkeys((PurePosixPath(root), PurePosixPath(root.resolve()))):
        try:
            return path.relative_to(base)
        except ValueError:
            continue
    return None


def check_request(req: GenerationRequest, storage: Storage, outputs_root: Path) -> None:
    """Refuse (422) a request whose `alwayson_scripts.save_dir` is unusable, before any device work."""
    check_save_dir(a1111.eas_values(req.alwayson_scripts).get("save_dir"), storage, outputs_root)


def grid_shape(count: int, options: Mapping[str, Any] | None = None, batch_size: int = 1) -> tuple[int, int]:
    """(rows, cols) of A1111's `image_grid` for `count` >= 1 images under the options in force: `n_rows` > 0
    rows, 0 as many rows as `batch_size`, -1 (the default) round(sqrt(n)) rows, or with `grid_prevent_empty_spots`
    the largest divisor of n up to floor(sqrt(n)); never more rows than images; cols = ceil(n / rows)."""
    options = options or {}
    n_rows = int(options.get("n_rows", -1))
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    elif options.get("grid_prevent_empty_spots", False):
        rows = math.isqrt(count)
        while count % rows:
            rows -= 1
    else:
        rows = round(math.sqrt(count))
    rows = max(1, min(rows, count))
    return rows, math.ceil(count / rows)


def image_grid(images: Sequence[Image.Image], options: Mapping[str, Any] | None = None,
               batch_size: int = 1) -> Image.Image:
    """A1111's grid (its shape: `grid_shape`): cells as large as the largest image, images centred in them, row by
    row, on white."""
    rows, cols = grid_shape(len(images), options, batch_size)
    w, h = (max(sizes) for sizes in zip(*(im.size for im in images)))
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (i % cols * w + (w - im.width) // 2, i // cols * h + (h - im.height) // 2))
    return grid


def grid_allowed(count: int, options: Mapping[str, Any]) -> bool:
    """Whether A1111 makes a grid of `count` images at all: not of none, nor of one with `grid_only_if_multiple`
    on (the default). Whether it is then saved (`grid_save`) or returned (`return_grid`) is the caller's."""
    return count > 1 or (count == 1 and not options.get("grid_only_if_multiple", True))


def wants_grid(count: int, options: Mapping[str, Any]) -> bool:
    """A1111 saves a grid when it makes one (`grid_allowed`) and the `grid_save` option is on. A request's own
    `do_not_save_grid` does not count: A1111's API overwrites it with `not save_images`."""
    return grid_allowed(count, options) and bool(options.get("grid_save", True))


def save_outputs(storage: Storage, outputs_root: Path, mode: str, *, pngs: Sequence[bytes], seeds: Sequence[int],
                 save_dir: str | None, grid: bytes | None = None, maps: Sequence[bytes] = ()) -> Saved:
    """Write a request's PNGs (its grid's PNG when given, its ControlNet detected maps next to the images as
    `<time>-<id>-controlnet-<i>.png`) and return their URLs. StorageUnavailable (503) when the storage refuses
    a write."""
    folder = check_save_dir(save_dir, storage, outputs_root)
    now = dt.datetime.now()  # local time, as A1111 names its folders and files
    day, stamp, rid = now.strftime("%Y-%m-%d"), now.strftime("%H%M%S"), uuid.uuid4().hex[:8]
    # PAI-EAS keeps A1111's layout inside a save_dir: <save_dir>/txt2img-images/<day>/..., <save_dir>/txt2img-grids/...
    prefix = f"{folder}/" if folder else ""  # save_dir "" / "." is the outputs root itself
    base = f"{prefix}{mode}-images/{day}"
    saved, seen, written = Saved(), set(), []
    try:
        for i, (seed, data) in enumerate(zip(seeds, pngs)):
            suffix = f"-{i}" if seed in seen else ""
            seen.add(seed)
            written.append(f"{base}/{stamp}-{rid}-{seed}{suffix}.png")
            saved.images.append(storage.put(written[-1], data))
        if grid is not None:
            written.append(f"{prefix}{mode}-grids/{day}/grid-{stamp}-{rid}.png")
            saved.grid = storage.put(written[-1], grid)
        for i, data in enumerate(maps):
            written.append(f"{base}/{stamp}-{rid}-controlnet-{i}.png")
            saved.maps.append(storage.put(written[-1], data))
    except ValueError:  # a symlink swapped in after the check: the key would leave the root
        _remove(storage, written)
        if folder is None:
            raise
        raise _refuse("leads outside the outputs folder") from None
    except OSError as exc:
        log.error("saving images failed: %s", exc)
        _remove(storage, written)  # a failed request leaves none of its images behind
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StorageUnavailable(f"the images could not be saved ({reason}); the request is not charged") from None
    return saved


def _remove(storage: Storage, keys: Sequence[str]) -> None:
    """Best effort: delete what a failed save wrote (the failing key too: it may be partly there)."""
    for key in keys:
        try:
            storage.delete(key)
        except (ValueError, OSError) as exc:
            log.warning("could not remove %s after a failed save: %s", key, exc)
