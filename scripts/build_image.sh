#!/usr/bin/env bash
# Build the CPU container image for real without a Docker engine, start it, check that it answers.
#
#   scripts/build_image.sh          # build specsplit:cpu, then the smoke test
#   scripts/build_image.sh build    # only build
#   scripts/build_image.sh smoke    # only the smoke test of an existing image
#
# Needs (Debian): apt-get install podman buildah mmdebstrap uidmap; run as root.
# 1. mmdebstrap makes a Debian bookworm base (python3 in a venv at /opt/venv, so `python` and pip
#    work as in python:3.11-slim), imported into podman as localhost/specsplit-base:bookworm.
# 2. podman builds the project's Dockerfile on it: vfs storage and chroot isolation, so no daemon,
#    no overlayfs and no nested namespaces are needed. torch is the pinned CPU wheel
#    (SPECSPLIT_TORCH_WHEEL, a local file mounted into the build; else torch==2.13.0 from the
#    PyTorch CPU index), everything else comes from PyPI.
# 3. The smoke test starts target, draft (n-gram) and gateway containers as docker-compose's CPU
#    profile does (host network, the model cache mounted read-only), waits for the compose
#    healthchecks to pass, and gets an answer through the gateway with the `openai` client.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${SPECSPLIT_IMAGE:-specsplit:cpu}
BASE_IMAGE=${SPECSPLIT_BASE_IMAGE:-localhost/specsplit-base:bookworm}
MODEL=${SPECSPLIT_SMOKE_MODEL:-smollm2-135m}
CACHE=${SPECSPLIT_CACHE:-$HOME/.cache/specsplit}
PY=${PYTHON:-python3}
TORCH_WHEEL=${SPECSPLIT_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)}
WORK=${SPECSPLIT_BUILD_DIR:-/tmp/specsplit-image}
# CAs pip trusts during the build: the host's (a TLS-intercepting proxy's CA is in it, not in Debian's)
BUILD_CA=${SPECSPLIT_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
podman() { command podman --storage-driver vfs "$@"; }
say() { echo "[build_image] $*" >&2; }

build_base() {
  mkdir -p "$WORK"
  if podman image exists "$BASE_IMAGE"; then say "base $BASE_IMAGE exists"; return; fi
  if [ -s "$WORK/base.tar" ]; then say "re-importing $WORK/base.tar"; import_base; return; fi
  say "mmdebstrap: Debian bookworm + python3 venv -> $WORK/base.tar"
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
    bookworm "$WORK/base.tar"
  import_base
}

import_base() {
  podman import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' "$WORK/base.tar" "$BASE_IMAGE"
}

build_image() {
  build_base
  local args=(--build-arg "BASE=$BASE_IMAGE" --build-arg FLASH_ATTN=0)
  if [ -s "$BUILD_CA" ]; then args+=(--volume "$BUILD_CA:/etc/ssl/certs/ca-certificates.crt:ro"); fi
  if [ -n "$TORCH_WHEEL" ]; then
    say "torch from $TORCH_WHEEL"
    args+=(--volume "$(dirname "$TORCH_WHEEL"):/wheels:ro" --build-arg "TORCH_SPEC=/wheels/$(basename "$TORCH_WHEEL")")
  else
    args+=(--build-arg "TORCH_SPEC=torch==2.13.0" --build-arg "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")
  fi
  say "podman build -t $IMAGE (vfs, chroot isolation)"
  podman build --isolation chroot --network host "${args[@]}" -t "$IMAGE" .
}

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Containers run with podman (crun); where the sandbox forbids what crun needs (here: it has no
# CAP_SYS_RESOURCE, and crun fails with "setrlimit `RLIMIT_NOFILE`: Operation not permitted",
# then RLIMIT_NPROC, whatever --ulimit says), with buildah's chroot isolation, as the image was
# built: the same image, filesystem and entrypoint, without the OCI runtime.
RUNTIME=${SPECSPLIT_RUNTIME:-auto}
PIDS=()
NAMES=(specsplit-smoke-target specsplit-smoke-draft specsplit-smoke-gateway)
buildah() { command buildah --storage-driver vfs "$@"; }

pick_runtime() {
  if [ "$RUNTIME" = auto ]; then
    if err=$(podman run --rm --network host "$IMAGE" --version 2>&1); then RUNTIME=podman
    else say "podman run fails here: ${err##*$'\n'}"; say "running the containers with buildah (chroot isolation)"
      RUNTIME=buildah; fi
  fi
}

start() {  # NAME ARGS...: the image's entrypoint, `specsplit ARGS`, in a container
  local name=$1; shift
  podman rm -f "$name" >/dev/null 2>&1 || true  # left over from an earlier run
  buildah rm "$name" >/dev/null 2>&1 || true
  if [ "$RUNTIME" = podman ]; then
    podman run -d --network host -v "$CACHE:/models:ro" -e OMP_NUM_THREADS=1 --name "$name" "$IMAGE" "$@" >/dev/null
  else
    buildah from --name "$name" "$IMAGE" >/dev/null
    # buildah shadows the image's VOLUME /models with its own volume: mount the cache elsewhere
    buildah config --env OMP_NUM_THREADS=1 --env SPECSPLIT_CACHE=/cache "$name"
    buildah run --isolation chroot --network host -v "$CACHE:/cache:ro" "$name" -- specsplit "$@" \
      >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
  fi
}

in_container() {  # NAME CMD...: run CMD inside the container (the compose healthcheck)
  local name=$1; shift
  if [ "$RUNTIME" = podman ]; then podman exec "$name" "$@"
  else buildah run --isolation chroot --network host "$name" -- "$@"; fi
}

stop_all() {
  if [ "$RUNTIME" = podman ]; then podman rm -f -t 5 "${NAMES[@]}" >/dev/null 2>&1 || true; return; fi
  for pid in "${PIDS[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; done  # the servers under each run
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for n in "${NAMES[@]}"; do buildah rm "$n" >/dev/null 2>&1 || true; done
}

smoke() {
  mkdir -p "$WORK"
  say "model cache: $PY -m specsplit.cli models pull $MODEL"
  SPECSPLIT_CACHE=$CACHE $PY -m specsplit.cli models pull "$MODEL" >/dev/null
  pick_runtime
  local tport dport hport gport spec='{"method": "ngram", "num_speculative_tokens": 5}'
  tport=$(free_port); dport=$(free_port); hport=$(free_port); gport=$(free_port)
  trap stop_all EXIT
  start "${NAMES[0]}" target "$MODEL" --grpc-port "$tport" --metrics-port 0
  start "${NAMES[1]}" draft "$MODEL" --grpc-port "$dport" --metrics-port 0 --speculative-config "$spec"
  wait_healthy "${NAMES[0]}" "$tport"
  wait_healthy "${NAMES[1]}" "$dport"
  start "${NAMES[2]}" gateway "$MODEL" --port "$hport" --grpc-port "$gport" --speculative-config "$spec" \
    --target-addresses "127.0.0.1:$tport" --draft-addresses "127.0.0.1:$dport"
  wait_healthy "${NAMES[2]}" "$gport"
  say "openai client -> http://127.0.0.1:$hport/v1 (model $MODEL)"
  $PY - "$hport" "$MODEL" <<'EOF'
import sys
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none", timeout=300)
assert [m.id for m in client.models.list().data] == [sys.argv[2]]
out = client.chat.completions.create(model=sys.argv[2], max_tokens=32, temperature=0,
                                     messages=[{"role": "user", "content": "Write a Python function to add two numbers."}])
print(out.choices[0].message.content)
print(f"[build_image] answered: {out.usage.completion_tokens} tokens, finish_reason={out.choices[0].finish_reason}",
      file=sys.stderr)
EOF
  say "smoke test passed: $IMAGE serves through its containers ($RUNTIME)"
}

wait_healthy() {  # the docker-compose healthcheck, run inside the container
  local name=$1 port=$2 deadline=$((SECONDS + ${SPECSPLIT_SMOKE_TIMEOUT:-900}))
  say "waiting for $name to pass its healthcheck (port $port)"
  until in_container "$name" python -m specsplit.serving.healthcheck "127.0.0.1:$port" 2>/dev/null; do
    if [ $SECONDS -gt $deadline ]; then
      if [ "$RUNTIME" = podman ]; then podman logs "$name" 2>&1 | tail -30 >&2; else tail -30 "$WORK/$name.log" >&2; fi
      say "$name did not become healthy"; return 1
    fi
    sleep 3
  done
  say "$name healthy"
}

case "${1:-all}" in
  build) build_image ;;
  smoke) smoke ;;
  all) build_image; smoke ;;
  *) echo "usage: $0 [build|smoke|all]" >&2; exit 2 ;;
esac
