# syntax=docker/dockerfile:1
# netcompress, CPU image: the API, CPU workers and migrations (`docker compose up` uses it for all three).
#   docker build -t netcompress:latest .
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
# PyTorch's CPU-only wheels keep the image slim: the default Linux wheel brings GBs of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NETCOMPRESS_HOME=/var/lib/netcompress

RUN useradd --system --create-home --home-dir /var/lib/netcompress --uid 10001 netcompress

WORKDIR /app
# torch first and pinned, in its own layer: it is the big one and changes least.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY api ./api
COPY client ./client
COPY compression ./compression
COPY migrations ./migrations
COPY netcompress ./netcompress
COPY store ./store
COPY worker ./worker
RUN pip install . && netcompress --help > /dev/null

USER netcompress
EXPOSE 8000
CMD ["netcompress", "api", "--host", "0.0.0.0", "--port", "8000"]
