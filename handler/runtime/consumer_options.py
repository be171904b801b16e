"""Each consumer's A1111 options (`GET/POST /sdapi/v1/options`) and the checkpoint they designate.

Options are per consumer, never process-global: A1111's defaults (handler.contract.options) overlaid with what
the caller set. Setting is all or nothing: every key is checked (422, 404 for an unknown model) before any is
stored.
"""

from __future__ import annotations

from typing import Any

from handler.contract.options import DEFAULT_OPTIONS, OptionsStore, check_option_value, option_value
from handler.errors import InvalidRequest, NotReady
from handler.settings import Settings
from pipelines.errors import ModelNotFound
from pipelines.store import CheckpointEntry, ModelStore, format_title


class ConsumerOptions:
    """The options of each consumer, kept in `options_store`, and the checkpoint each one runs on."""

    def __init__(self, settings: Settings, store: ModelStore, options_store: OptionsStore) -> None:
        self.settings = settings
        self.store = store
        self.options_store = options_store

    def options(self, consumer: str) -> dict[str, Any]:
        """A1111's defaults overlaid with what the caller set."""
        return {**DEFAULT_OPTIONS, **self.options_store.get(consumer)}

    def default_checkpoint(self, consumer: str | None) -> CheckpointEntry:
        """The caller's `sd_model_checkpoint` option (none for consumer None), else the configured default,
        else the first found."""
        mine = self.options_store.get(consumer).get("sd_model_checkpoint") if consumer is not None else None
        return self.checkpoint_or_default(mine)

    def checkpoint_or_default(self, chosen: str | None) -> CheckpointEntry:
        """The checkpoint `chosen` names (404 when unknown), else the configured default, else the first found
        (503 when there is none)."""
        chosen = chosen or self.settings.default_checkpoint
        if chosen:
            return self.store.find_checkpoint(chosen)
        entries = self.store.checkpoints
        if not entries:
            raise NotReady("no checkpoint under models/Stable-diffusion; add one or run `sdfunc demo-models`")
        return entries[0]

    def get(self, consumer: str) -> dict[str, Any]:
        """Every option with the caller's value; `sd_model_checkpoint` is the current checkpoint's title."""
        options = self.options(consumer)
        try:
            entry = self.checkpoint_or_default(options["sd_model_checkpoint"])
        except (NotReady, ModelNotFound):
            return options
        sha = self.store.sha256(entry)
        options["sd_model_checkpoint"] = format_title(entry.name, sha)
        options["sd_checkpoint_hash"] = sha
        return options

    def set(self, consumer: str, values: dict[str, Any]) -> None:
        """Validate every key first (422 / 404), then store all of them: all or nothing."""
        clean: dict[str, Any] = {}
        for key, value in values.items():
            reason = check_option_value(key, value)
            if reason:
                raise InvalidRequest(f"{key}: {reason}", field=key)
            if key == "sd_model_checkpoint":
                value = self.store.title(self.store.find_checkpoint(value), compute=True)
            elif key == "sd_vae":
                self.store.find_vae(value)
            elif key == "sd_checkpoint_hash":
                continue  # derived from sd_model_checkpoint
            clean[key] = option_value(key, value)
        self.options_store.update(consumer, clean)
