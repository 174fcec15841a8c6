# One image for every fallwatch service; docker-compose.yml picks the command.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY schemas schemas
COPY producers producers
COPY edge_workers edge_workers
COPY cloud_workers cloud_workers
COPY alerting alerting
COPY dmd_offline dmd_offline
COPY fallwatch fallwatch
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps 'mediapipe==0.10.14'
ENTRYPOINT ["fallwatch"]
