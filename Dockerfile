# radcache image. CPU by default; a CUDA image with --build-arg VARIANT=cuda.
#   docker build -t radcache .                          # slim CPU image
#   docker build -t radcache:cuda --build-arg VARIANT=cuda .
# Model weights are not baked in: mount a Hugging Face cache at /cache/huggingface
# (or pass --model /models/<checkpoint>). Set BAKE_MODEL=dinov2-base to bake one in.
ARG VARIANT=cpu

FROM python:3.11-slim AS base-cpu
ENV TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cpu"

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3-pip python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python
ENV TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cu128"

FROM base-${VARIANT} AS build
RUN python -m venv /opt/radcache
ENV PATH=/opt/radcache/bin:$PATH
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embeddings embeddings
COPY service service
COPY clients clients
RUN pip install --no-cache-dir .

FROM base-${VARIANT} AS runtime
ARG BAKE_MODEL=""
COPY --from=build /opt/radcache /opt/radcache
ENV PATH=/opt/radcache/bin:$PATH \
    HF_HOME=/cache/huggingface \
    RADCACHE_STORE=/data/store \
    RADCACHE_PSEUDONYM_KEY_FILE=/secrets/pseudonym.key
RUN useradd --create-home --uid 10001 radcache \
    && mkdir -p /cache/huggingface /data /secrets \
    && chown -R radcache /cache /data /secrets
USER radcache
RUN if [ -n "$BAKE_MODEL" ]; then \
      radcache embed --help >/dev/null && python -c "from radcache.embeddings import load_encoder; load_encoder('$BAKE_MODEL')"; \
    fi
VOLUME ["/cache/huggingface", "/data"]
ENTRYPOINT ["radcache"]
CMD ["--help"]
