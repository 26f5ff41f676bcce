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
GRACE_S = 10.0  # each process's drain time on stop (--shutdown-grace-seconds)
STOP_WAIT_S = 20.0  # then stragglers are killed
PARENT_ENV = "SPECSPLIT_PARENT_PID"  # children of `up` stop when this process dies (cli.die_with_parent)


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


def check_up_flags(a: argparse.Namespace) -> None:
    """The flags `up` hands to its tiers, checked before anything starts or downloads: a bad value
    is one clear error here, not a tier dying at start (an env variable bypasses argparse's choices)."""
    from specsplit.cli import ROUND_MODES
    from specsplit.speculation.branches import check_branch_alternatives, check_max_branches

    check_max_branches(a.max_branches)
    check_branch_alternatives(a.branch_alternatives)
    if a.round not in ROUND_MODES:
        raise ValueError(f"--round must be one of {', '.join(ROUND_MODES)}, got {a.round!r}")


def tier_commands(a: argparse.Namespace, model: str, spec: str, names: list[str], tport: int,
                  dport: int) -> tuple[list[str], list[str], list[str]]:
    """The command lines of the target, draft and gateway processes: each tier gets the `up`
    flags that are its own (draft: --branch-alternatives; gateway: rounds, pipeline, tree)."""
    host = a.host
    base = [sys.executable, "-m", "specsplit.cli"]
    common = ["--host", host, "--log-level", a.log_level, "--shutdown-grace-seconds", str(GRACE_S)]
    if a.max_model_len:
        common += ["--max-model-len", str(a.max_model_len)]
    tier = [*common, "--metrics-port", "0", "--dtype", a.dtype]
    target = [*base, "target", model, "--grpc-port", str(tport), *tier]
    draft = [*base, "draft", model, "--speculative-config", spec, "--grpc-port", str(dport), *tier]
    if a.branch_alternatives is not None:  # else the draft tier's per-device default
        draft += ["--branch-alternatives", str(a.branch_alternatives)]
    gateway = [*base, "gateway", model, "--speculative-config", spec, "--port", str(a.port), "--grpc-port",
               str(a.grpc_port), "--target-addresses", f"{host}:{tport}", "--draft-addresses", f"{host}:{dport}",
               *common, "--max-branches", str(a.max_branches), "--round", a.round,
               *(["--no-pipeline"] if a.no_pipeline else []), "--served-model-name", *names]
    return target, draft, gateway


def run_up(a: argparse.Namespace) -> int:
    """Start target and draft, then the gateway; serve (or answer --prompt); stop all three on
    Ctrl-C, SIGTERM or SIGHUP, and with them whatever had been started."""
    check_up_flags(a)  # a bad flag: one clear error before anything starts
    spec = a.speculative_config or json.dumps(DEFAULT_SPEC)
    names = list(a.served_model_name or [a.model])  # clients use the name the user typed, not the cache path
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
    # SIGTERM (kill, docker, systemd, Kubernetes) and SIGHUP stop everything as Ctrl-C does
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    procs: list[subprocess.Popen] = []
    try:
        return _start_and_serve(a, model, spec, names, procs)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in previous:  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _start_and_serve(a: argparse.Namespace, model: str, spec: str, names: list[str],
                     procs: list[subprocess.Popen]) -> int:
    """Start the three processes into `procs` (the caller stops them) and serve."""
    host = a.host
    tport, dport = free_port(host), free_port(host)
    target, draft, gateway = tier_commands(a, model, spec, names, tport, dport)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    # all three at once: the gateway dials a tier only when the first request comes (after both
    # tiers report SERVING below), so its start-up overlaps theirs
    procs.append(subprocess.Popen(target, env=env))
    procs.append(subprocess.Popen(draft, env=env))
    procs.append(subprocess.Popen(gateway, env=env))
    print(f"starting target on {host}:{tport}, draft ({json.loads(spec)['method']}) on {host}:{dport} and the "
          f"gateway ...", file=sys.stderr)
    wait_serving(f"{host}:{tport}", procs)
    wait_serving(f"{host}:{dport}", procs)
    wait_serving(f"{host}:{a.grpc_port}", procs)
    print(f"specsplit is up:\n  OpenAI HTTP  http://{host}:{a.port}/v1  (model {', '.join(map(repr, names))})\n"
          f"  gRPC         {host}:{a.grpc_port}   (specsplit generate --address {host}:{a.grpc_port} 'prompt')\n"
          f"  metrics      http://{host}:{a.port}/metrics", file=sys.stderr)
    if a.prompt:
        return _demo(f"{host}:{a.grpc_port}", a.prompt, a.max_tokens)
    print("Ctrl-C (or SIGTERM) stops all three.", file=sys.stderr)
    while all(p.poll() is None for p in procs):
        time.sleep(0.5)
    return 1


def _check_eagle(spec: dict, model: str) -> dict:
    """An EAGLE head is a local folder or a hub id (not a catalogue name): fetch it once and check
    it fits the target before three processes start, so a bad config is one clear error, not a
    tier dying at start; the tiers get its folder."""
    from specsplit.config import SpeculativeConfig
    from specsplit.factory import eagle_target_layers
    from specsplit.models.heads import resolve_head

    try:
        spec = {**spec, "model": str(resolve_head(spec["model"]))} if spec.get("model") else spec
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
    """SIGTERM (graceful: NOT_SERVING, drain) then SIGKILL stragglers; the gateway first, so its
    requests end before the tiers they run on go away."""
    deadline = time.monotonic() + STOP_WAIT_S
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
