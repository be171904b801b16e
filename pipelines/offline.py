"""Turn Hugging Face hub access off for the whole process; `pipelines/__init__.py` calls `set_offline_env`.

huggingface_hub reads `HF_HUB_OFFLINE` once, when it is first imported (diffusers and transformers take it from
there), so a value set later does nothing. Without it diffusers' `from_single_file` goes to the hub whenever it
has no local config, even with `local_files_only=True`; with it set, every load uses only the configs shipped in
`pipelines/configs`, and a missing one is an error instead of a download. Because the call happens when the
`pipelines` package is first imported, each entry point (the `sdfunc` CLI, the gunicorn config, `python -m bench`,
the tests' conftest) imports `pipelines` before anything that can import huggingface_hub.
"""

from __future__ import annotations

import os

# Set only where the environment does not already have a value (an operator's own setting wins).
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DIFFUSERS_VERBOSITY": "error",  # diffusers' and transformers' own loggers: errors only
    "TRANSFORMERS_VERBOSITY": "error",
}


def set_offline_env() -> None:
    """Put `OFFLINE_ENV` into `os.environ` (keeping values already there). Idempotent."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
