"""Model store, loading, warm cache, samplers, prompt infotext and generation. Knows nothing of HTTP.

Importing this package turns hub access off before diffusers or huggingface_hub can be imported:
`HF_HUB_OFFLINE` is read once, at huggingface_hub's first import (DESIGN.md), so it must be set here, first.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
