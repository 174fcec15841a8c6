# One Dockerfile, three images; docker-compose.yml picks the target of each service:
#   slim   producers, alerting, the dashboard, `topics create`: no torch (~0.5 GB instead of ~6)
#   edge   edge workers: torch for the CPU only
#   cloud  cloud workers: torch with CUDA, for GPU hosts
# Every image runs as the unprivileged user `fallwatch` (uid 10001) with `fallwatch` as its entry point.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- the fallwatch wheel, built once; no source tree or build tools reach the images ---
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY core core
COPY producers producers
COPY edge_workers edge_workers
COPY cloud_workers cloud_workers
COPY alerting alerting
COPY dmd_offline dmd_offline
COPY fallwatch fallwatch
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- what every image shares: the user, its writable directories, quiet Python ---
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FALLWATCH_STATE_DIR=/var/lib/fallwatch \
    HF_HOME=/var/lib/fallwatch/huggingface
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin fallwatch \
    && mkdir -p /var/lib/fallwatch/huggingface /models \
    && chown -R fallwatch:fallwatch /var/lib/fallwatch /models
WORKDIR /var/lib/fallwatch

FROM runtime AS slim
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/fallwatch-*.whl
USER 10001
ENTRYPOINT ["fallwatch"]

FROM runtime AS edge
# torch's CPU-only build: the CUDA libraries would be ~4 GB nobody on an edge box uses. The versions are
# pyproject.toml's lower bounds and the wheel built above (DL3013 cannot see through the wheel's name).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --index-url https://download.pytorch.org/whl/cpu 'torch>=2.4' 'torchvision>=0.19' \
    && wheel="$(ls /wheels/fallwatch-*.whl)" \
    && pip install "${wheel}[models]"
USER 10001
ENTRYPOINT ["fallwatch"]

FROM runtime AS cloud
# OpenGL and GLib for MediaPipe (the reference cloud model's BlazePose); the 7B model needs neither
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
# MediaPipe without its declared dependencies (a second, GUI OpenCV and jax): see the Makefile
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    wheel="$(ls /wheels/fallwatch-*.whl)" \
    && pip install "${wheel}[models]" \
    && pip install --no-deps 'mediapipe==0.10.14'
USER 10001
ENTRYPOINT ["fallwatch"]
