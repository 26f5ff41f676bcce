"""`python -m specsplit.serving.healthcheck HOST:PORT`: exit 0 iff grpc.health.v1 says SERVING.

Used by docker-compose healthchecks (Kubernetes probes speak gRPC health natively).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout_s: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    raise SystemExit(0 if check(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051") else 1)
