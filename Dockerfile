# sdfunc: the function as a container image, for FC 3.0 (custom container, port 9000) and Knative.
#
#   GPU (default): docker build -t sdfunc:gpu .
#   CPU variant:   docker build -t sdfunc:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                               --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# No weights are in the image: checkpoints come from the data root (the NAS / OSS mount, SDFUNC_DATA_DIR).
# The project is installed by scripts/venv.sh, the same script the README's first command (scripts/serve.sh)
# runs, and the container starts `sdfunc serve`, which is what scripts/serve.sh and the end-to-end tests run:
# gunicorn with handler/gunicorn_conf.py. tests/unit/test_deploy.py checks both, so the three cannot drift.

# CUDA 12 base (the driver comes from the host): torch==2.13.0 from PyPI is the CUDA build and brings its own
# CUDA runtime, cuBLAS and cuDNN libraries, so a `runtime`/`cudnn` base would only add a second copy.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Extra pip index for torch: empty for the GPU image; the CPU variant points it at PyTorch's CPU wheels so
# that the pinned torch==2.13.0 resolves to 2.13.0+cpu instead of the multi-GB CUDA build.
ARG TORCH_INDEX=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SDFUNC_DATA_DIR=/data \
    PATH=/app/.venv/bin:$PATH

# Python with venv (the CUDA base has none; the python:*-slim base has it already).
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin sdfunc \
    && mkdir -p /app /data && chown sdfunc:sdfunc /app /data
WORKDIR /app

COPY --chown=sdfunc:sdfunc pyproject.toml README.md gunicorn.conf.py ./
COPY --chown=sdfunc:sdfunc scripts/ scripts/
COPY --chown=sdfunc:sdfunc handler/ handler/
COPY --chown=sdfunc:sdfunc pipelines/ pipelines/
COPY --chown=sdfunc:sdfunc warmup/ warmup/
COPY --chown=sdfunc:sdfunc bench/ bench/

USER sdfunc
# The README's install step, unchanged (scripts/venv.sh: ./.venv, `pip install -e .`).
RUN if [ -n "${TORCH_INDEX}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX}"; fi \
    && EXTRAS="" bash -euo pipefail -c '. scripts/venv.sh' \
    && .venv/bin/sdfunc --help > /dev/null

EXPOSE 9000
VOLUME ["/data"]
# Ready = /healthz 200 (a warm-up may run first: the start period covers a cold SDXL load).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/healthz', timeout=4)"]
CMD ["sdfunc", "serve"]
