"""Errors raised by the pipelines package.

`pipelines` knows nothing of HTTP: each error carries a stable machine-readable `code` and, where it
concerns one request field, that field's name. `handler.errors` maps these classes to HTTP statuses.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class. `code` is stable and safe to show to clients; the message never holds a prompt."""

    code = "pipeline_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidParameter(PipelineError):
    """A request value that cannot be honoured (maps to 422, naming `field`)."""

    code = "invalid_parameter"


class UnknownSampler(InvalidParameter):
    """No sampler matches after alias and scheduler-suffix resolution."""

    code = "unknown_sampler"


class ModelNotFound(PipelineError):
    """No checkpoint, VAE or LoRA of that name under the models root (maps to 404)."""

    code = "model_not_found"


class CheckpointError(PipelineError):
    """A checkpoint file that exists but cannot be used: wrong format, unknown architecture, incomplete."""

    code = "invalid_checkpoint"


class PickleCheckpointRefused(CheckpointError):
    """`.ckpt` / `.pt` / `.bin` pickle files are never loaded: they can run code."""

    code = "pickle_refused"


class UnsupportedArchitecture(CheckpointError):
    """The checkpoint's keys match neither SD 1.x nor SDXL."""

    code = "unsupported_architecture"


class IncompleteCheckpoint(CheckpointError):
    """A tensor the architecture needs is missing (it would stay on `meta` and produce NaN images)."""

    code = "incomplete_checkpoint"
