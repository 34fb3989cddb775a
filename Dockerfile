# radcache image: `radcache serve`, `radcache worker` and the one-shot `radcache embed`.
# Two variants, chosen by build argument:
#   docker build -t radcache:cpu .                            # slim CPU image (faiss-cpu)
#   docker build -t radcache:cuda --build-arg VARIANT=cuda .  # CUDA image (faiss-gpu-cu12)
# Model weights are not baked in: they are downloaded into the Hugging Face cache volume
# (/cache/huggingface) on first use, or read from a mounted checkpoint directory
# (--model /models/<checkpoint>). `--build-arg BAKE_MODEL=dinov2-base` bakes one in.
# docs/DEPLOY.md describes the compose stack built from this file.
ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- bases: a Python interpreter and where torch comes from ---------------------------
FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX="https://download.pytorch.org/whl/cpu" \
    FAISS_GPU=""

FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_CUDA=cu128
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3 /usr/local/bin/python
# faiss-gpu-cu12 replaces faiss-cpu (the server extra's pin): both provide the `faiss`
# module. radcache's faiss calls use the CPU API, so index searches run on CPU either way;
# the GPU build lets the k-means training of large IVF indexes run on the GPU.
ENV TORCH_INDEX="https://download.pytorch.org/whl/${TORCH_CUDA}" \
    FAISS_GPU="faiss-gpu-cu12"

# ---- build: a virtual environment with radcache[server,s3] ---------------------------
FROM base-${VARIANT} AS build
ARG TORCH_VERSION=2.13.0
# s3: stores on S3-compatible object storage (RADCACHE_STORE=s3://bucket/prefix).
ARG EXTRAS=server,s3
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/radcache/bin:$PATH
RUN python -m venv /opt/radcache
RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embeddings embeddings
COPY service service
COPY clients clients
RUN pip install ".[${EXTRAS}]" \
    && if [ -n "$FAISS_GPU" ]; then pip uninstall -y faiss-cpu && pip install "$FAISS_GPU"; fi
# The Alembic migrations are package data of radcache.service: fail the build without them.
RUN python -c "import importlib.resources as r; \
m = r.files('radcache.service.migrations'); \
assert m.joinpath('env.py').is_file(), 'migrations/env.py missing'; \
assert any(p.name.endswith('.py') and p.name[0].isdigit() for p in m.joinpath('versions').iterdir()), 'no migration versions'"

# ---- runtime: the environment, a non-root user, volumes, healthcheck ------------------
FROM base-${VARIANT} AS runtime
ARG BAKE_MODEL=""
COPY --from=build /opt/radcache /opt/radcache
ENV PATH=/opt/radcache/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    RADCACHE_HOST=0.0.0.0 \
    RADCACHE_PORT=8000 \
    RADCACHE_STORE=/data/store \
    RADCACHE_UPLOAD_DIR=/data/uploads \
    RADCACHE_DB=sqlite:////data/jobs/radcache.db \
    RADCACHE_PSEUDONYM_KEY_FILE=/secrets/pseudonym.key
# /secrets stays root-owned: the pseudonym key must be given (a mounted file, a compose
# secret or RADCACHE_PSEUDONYM_KEY), never made inside a container that may be thrown away.
RUN useradd --create-home --uid 10001 --user-group radcache \
    && mkdir -p /cache/huggingface /data/store /data/uploads /data/jobs /secrets \
    && chown -R radcache:radcache /cache /data
USER radcache
WORKDIR /home/radcache
# Only with --build-arg BAKE_MODEL=<registry name>: download it into the image's cache.
RUN if [ -n "$BAKE_MODEL" ]; then \
      python -c "import os; from radcache.embeddings import load_encoder; load_encoder(os.environ['BAKE_MODEL'], device='cpu')"; \
    fi
# The SQLite job database of a single container (/data/jobs) is no volume: compose uses
# PostgreSQL; mount one there when running `radcache serve` alone.
VOLUME ["/cache/huggingface", "/data/store", "/data/uploads"]
EXPOSE 8000
# /readyz: model loaded, queue answering, store writable. Workers serve no HTTP: compose
# disables this check for them. The start period covers a first download of the weights.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/readyz' % os.environ.get('RADCACHE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=3).status == 200 else 1)"]
ENTRYPOINT ["radcache"]
CMD ["serve"]
