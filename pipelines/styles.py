"""A1111 prompt styles: named prompt and negative-prompt fragments from `<data>/styles.csv`.

The file is A1111's (`modules/styles.py`): a CSV with a header naming `name`, `prompt`, `negative_prompt`
(other columns, such as `description`, are ignored). A style's text holding `{prompt}` has the request's
prompt put there; otherwise it is appended after `", "` (empty parts left out). Styles apply in the order the
request lists them, to the prompt and the negative prompt alike. The file is re-read when it changes, so
editing it on the mount needs no restart.
"""

from __future__ import annotations

import csv
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import InvalidParameter

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def merge(style_text: str, prompt: str) -> str:
    """A1111's `merge_prompts`: `{prompt}` replaced, else the two joined with ", " (empty ones left out)."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


class StyleStore:
    """The styles of one styles.csv (absent file: no styles). Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._styles: dict[str, Style] = {}

    def styles(self) -> list[Style]:
        """Every style, in file order."""
        with self._lock:
            self._reload()
            return list(self._styles.values())

    def apply(self, prompt: str, negative_prompt: str, names: list[str] | None,
              field: str = "styles") -> tuple[str, str]:
        """(prompt, negative prompt) with the named styles applied in order. An unknown name is a 422
        naming `styles.<i>` (A1111 skips it silently, which hides a client's typo)."""
        if not names:
            return prompt, negative_prompt
        with self._lock:
            self._reload()
            found = []
            for i, name in enumerate(names):
                style = self._styles.get(name)
                if style is None:
                    known = ", ".join(self._styles) or f"none: {self.path.name} is absent or empty"
                    raise InvalidParameter(f"{field}.{i}: no style named {name!r} (styles: {known})",
                                           field=f"{field}.{i}")
                found.append(style)
        for style in found:
            prompt = merge(style.prompt, prompt)
            negative_prompt = merge(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except OSError:
            self._stamp, self._styles = None, {}
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if stat.st_size > MAX_FILE_BYTES:
            log.warning("%s is larger than %d bytes; no styles loaded", self.path, MAX_FILE_BYTES)
            self._styles = {}
            return
        styles: dict[str, Style] = {}
        try:
            with self.path.open(encoding="utf-8-sig", newline="") as handle:
                for row in csv.DictReader(handle, skipinitialspace=True):
                    name = (row.get("name") or "").strip()
                    if name:
                        styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            log.warning("%s could not be read (%s); no styles loaded", self.path, exc)
        self._styles = styles
