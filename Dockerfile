# specsplit image: one image, three roles (`specsplit target|draft|gateway`).
#
# GPU (default): CUDA build of torch from the PyTorch base image, plus flash-attn compiled
# against it (falls back to PyTorch SDPA at run time if the build is skipped or fails).
#   docker build -t specsplit:gpu .
# CPU: a slim Python base; pass the torch wheel source you prefer for a CPU-only torch.
#   docker build -t specsplit:cpu --build-arg BASE=python:3.11-slim --build-arg FLASH_ATTN=0 \
#     --build-arg TORCH_SPEC="torch==2.13.0" .
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE}

ARG FLASH_ATTN=1
ARG TORCH_SPEC=""
ARG PIP_EXTRA_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SPECSPLIT_CACHE=/models \
    HF_HUB_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY specsplit ./specsplit
COPY draft_service ./draft_service
COPY target_service ./target_service
COPY gateway ./gateway
COPY protos ./protos

# torch first and pinned (the base image's CUDA build, or TORCH_SPEC), then the project.
RUN if [ -n "$TORCH_SPEC" ]; then pip install "$TORCH_SPEC"; fi \
 && pip install . \
 && if [ "$FLASH_ATTN" = "1" ]; then \
      MAX_JOBS=4 pip install "flash-attn>=2.6" --no-build-isolation \
        || echo "flash-attn could not be built: specsplit will use PyTorch SDPA"; \
    fi

RUN useradd --uid 1000 --create-home specsplit && mkdir -p /models && chown specsplit /models
USER 1000
VOLUME ["/models"]
EXPOSE 8000 50051 50052 50053 9100
ENTRYPOINT ["specsplit"]
CMD ["--help"]
