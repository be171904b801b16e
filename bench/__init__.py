"""`python -m bench <scenario>`: see bench/scale/cli.py and bench/README.md."""

import pipelines  # noqa: F401  # first: turns hub access off (pipelines.offline) before huggingface_hub is imported
