"""Model store, loading, warm cache, samplers, prompt infotext and generation. Knows nothing of HTTP.

Importing this package turns hub access off (`pipelines.offline`) before diffusers or huggingface_hub can be
imported, which is why every entry point imports `pipelines` first.
"""

from pipelines.offline import set_offline_env

set_offline_env()
