"""`specsplit up`: the three tiers as local processes, for a quick start without containers."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 5}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_serving(address: str, procs: list[subprocess.Popen], timeout_s: float = 900.0) -> None:
    """Poll grpc.health.v1 until SERVING; fail fast if a process died (model load errors)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{' '.join(p.args[3:5])} exited with code {p.returncode}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{address} did not become SERVING within {timeout_s:.0f}s")


def run_up(a: argparse.Namespace) -> int:
    spec = a.speculative_config or json.dumps(DEFAULT_SPEC)
    host = a.host
    tport, dport = free_port(host), free_port(host)
    base = [sys.executable, "-m", "specsplit.cli"]
    common = ["--dtype", a.dtype, "--log-level", a.log_level]
    if a.max_model_len:
        common += ["--max-model-len", str(a.max_model_len)]
    # resolve (pull/convert) models once here, with a progress bar, before three processes race for it
    from specsplit.factory import model_folder

    model = str(model_folder(a.model))
    spec_dict = json.loads(spec)
    if spec_dict.get("method") in ("eagle", "eagle3"):
        spec_dict = _check_eagle(spec_dict, model)
        spec = json.dumps(spec_dict)
    elif spec_dict.get("model"):
        spec_dict["model"] = str(model_folder(spec_dict["model"]))
        spec = json.dumps(spec_dict)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen([*base, "target", model, "--host", host, "--grpc-port", str(tport), "--metrics-port", "0",
                          *common], env=env),
        subprocess.Popen([*base, "draft", model, "--speculative-config", spec, "--host", host, "--grpc-port",
                          str(dport), "--metrics-port", "0", *common], env=env),
    ]
    try:
        print(f"starting target on {host}:{tport} and draft ({spec_dict['method']}) on {host}:{dport} ...",
              file=sys.stderr)
        wait_serving(f"{host}:{tport}", procs)
        wait_serving(f"{host}:{dport}", procs)
        gw = [*base, "gateway", model, "--speculative-config", spec, "--host", host, "--port", str(a.port),
              "--grpc-port", str(a.grpc_port), "--target-addresses", f"{host}:{tport}",
              "--draft-addresses", f"{host}:{dport}", "--log-level", a.log_level]
        if a.max_model_len:
            gw += ["--max-model-len", str(a.max_model_len)]
        procs.append(subprocess.Popen(gw, env=env))
        wait_serving(f"{host}:{a.grpc_port}", procs)
        print(f"specsplit is up:\n  OpenAI HTTP  http://{host}:{a.port}/v1  (model {a.model!r})\n"
              f"  gRPC         {host}:{a.grpc_port}   (specsplit generate --address {host}:{a.grpc_port} 'prompt')\n"
              f"  metrics      http://{host}:{a.port}/metrics", file=sys.stderr)
        if a.prompt:
            return _demo(f"{host}:{a.grpc_port}", a.prompt, a.max_tokens)
        print("Ctrl-C stops all three.", file=sys.stderr)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(procs)


def _check_eagle(spec: dict, model: str) -> dict:
    """An EAGLE head is a local folder (not a catalogue name): check it fits the target before
    three processes start, so a bad config is one clear error, not a tier dying at start."""
    from pathlib import Path

    from specsplit.config import SpeculativeConfig
    from specsplit.factory import eagle_target_layers

    spec = {**spec, "model": str(Path(spec.get("model") or "").expanduser().resolve())} if spec.get("model") else spec
    try:
        eagle_target_layers(SpeculativeConfig.from_any(spec), model)  # type: ignore[arg-type]
    except ValueError as e:
        raise SystemExit(f"specsplit up: {e}") from None
    return spec


def _demo(address: str, prompt: str, max_tokens: int) -> int:
    from specsplit.client import Client
    from specsplit.sampling.params import SamplingParams

    print(f"\n>>> {prompt}\n", file=sys.stderr)
    t0 = time.perf_counter()
    final = None
    with Client(address) as c:
        for ev in c.stream_chat([{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens,
                                                                                        temperature=0.0)):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            if ev.finished:
                final = ev
    dt = time.perf_counter() - t0
    print("\n", file=sys.stderr)
    if final is not None:
        print(f"{final.summary()} in {dt:.1f}s = {final.completion_tokens / dt:.1f} tokens/s", file=sys.stderr)
    return 0


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM (graceful: NOT_SERVING, drain) then SIGKILL stragglers."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
