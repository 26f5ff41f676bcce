#!/usr/bin/env python3
"""Chaos under load: the three tiers in network namespaces, bad links, replicas killed and restarted.

Needs root and iproute2 (ip netns, veth, bridge); not part of the pytest suite.

    sudo python3 scripts/chaos.py --duration 120            # tiny random models (fast)
    sudo python3 scripts/chaos.py --model smollm2-135m ...  # the real SmolLM2 as target

Layout: namespaces <p>-gw, <p>-draft and <p>-target, each joined by a veth link to a bridge in
<p>-br (10.213.0.0/24). Two target and two draft replicas run as processes in their tier's
namespace, the gateway and the load generator in the gateway's. Links get delay and loss:
`tc netem` where the kernel has it; otherwise (some VM kernels ship without sch_netem) loss
is kernel packet drop by nftables (`numgen random`) on every veth, and delay is added by a
small relay at the tier end of each link, so TCP still sees real loss and retransmits.

Phases: (1) a fault-free baseline: every prompt once, no impairment, no kill; (2) the same
prompts as many concurrent greedy streams for --duration seconds on impaired links while a
chaos loop SIGKILLs replicas and restarts them at the same address (always leaving one
target replica up), SIGSTOPs a target for longer than the round deadline, and takes the
whole draft tier down for a while. Every stream must then be either complete and
token-identical to the baseline, or failed with a proper gRPC status; lost streams
(no outcome, or OK without the final message), duplicated or missing tokens, and improper
statuses (INTERNAL, UNKNOWN) are reported and make the exit code 1.

Only loopback and the namespaces this script creates are touched; they are deleted on exit
(also on Ctrl-C). The summary is printed as JSON (and written to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.213.0"
PROMPTS = [
    "def fibonacci(n):", "The quick brown fox", "for i in range(10):", "import numpy as np",
    "class Tree:", "Speculative decoding drafts tokens", "return sorted(values", "x = np.zeros((3, 4))",
    "The lazy dog", "print(i * i)", "def __init__(self, left, right):", "verifies them.",
]
PROPER = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}  # a failure that says why


def sh(*cmd: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {r.stderr.strip()}")
    return r


# ---- network ----------------------------------------------------------------------------------


class Network:
    """Namespaces <prefix>-{br,gw,draft,target}; gw .1, draft .2, target .3 on one bridge."""

    TIERS = {"gw": 1, "draft": 2, "target": 3}

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ns = {t: f"{prefix}-{t}" for t in (*self.TIERS, "br")}
        self.netem = False
        self.created: list[str] = []

    def ip(self, tier: str) -> str:
        return f"{SUBNET}.{self.TIERS[tier]}"

    def dev(self, tier: str) -> str:
        return f"{self.prefix[:8]}{tier[0]}"  # interface names: at most 15 characters

    def up(self) -> None:
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
            self.created.append(name)
            sh("ip", "link", "set", "lo", "up", ns=name)
        br = self.ns["br"]
        sh("ip", "link", "add", "br0", "type", "bridge", ns=br)
        sh("ip", "link", "set", "br0", "up", ns=br)
        for tier, host in self.TIERS.items():
            dev, peer = self.dev(tier), self.dev(tier) + "b"
            sh("ip", "link", "add", dev, "netns", self.ns[tier], "type", "veth", "peer", "name", peer, "netns", br)
            sh("ip", "link", "set", peer, "master", "br0", ns=br)
            sh("ip", "link", "set", peer, "up", ns=br)
            sh("ip", "addr", "add", f"{SUBNET}.{host}/24", "dev", dev, ns=self.ns[tier])
            sh("ip", "link", "set", dev, "up", ns=self.ns[tier])
        r = sh("tc", "qdisc", "add", "dev", self.dev("gw"), "root", "netem", "delay", "1ms", check=False,
               ns=self.ns["gw"])
        self.netem = r.returncode == 0
        if self.netem:
            sh("tc", "qdisc", "del", "dev", self.dev("gw"), "root", ns=self.ns["gw"])

    def impair(self, delay_ms: float, jitter_ms: float, loss_pct: float) -> None:
        """Delay and loss on every link (netem), or loss only (nftables; the relays add delay)."""
        for tier in self.TIERS:
            ns, dev = self.ns[tier], self.dev(tier)
            if self.netem:
                sh("tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms",
                   "loss", f"{loss_pct}%", ns=ns)
            elif loss_pct > 0:
                sh("nft", "add", "table", "inet", "specsplit_chaos", ns=ns)
                sh("nft", "add", "chain", "inet", "specsplit_chaos", "out",
                   "{ type filter hook output priority 0; policy accept; }", ns=ns)
                sh("nft", "add", "rule", "inet", "specsplit_chaos", "out", "oifname", dev, "numgen", "random",
                   "mod", "10000", "<", str(int(loss_pct * 100)), "counter", "drop", ns=ns)

    def clear(self) -> None:
        for tier in self.TIERS:
            ns, dev = self.ns[tier], self.dev(tier)
            sh("tc", "qdisc", "del", "dev", dev, "root", check=False, ns=ns)
            sh("nft", "delete", "table", "inet", "specsplit_chaos", check=False, ns=ns)

    def dropped(self) -> int:
        """Packets nftables dropped so far (the loss actually applied)."""
        total = 0
        for tier in self.TIERS:
            out = sh("nft", "list", "table", "inet", "specsplit_chaos", check=False, ns=self.ns[tier]).stdout
            total += sum(int(m) for m in re.findall(r"packets (\d+)", out))
        return total

    def down(self) -> None:
        for name in reversed(self.created):
            sh("ip", "netns", "del", name, check=False)
        self.created.clear()


# ---- processes --------------------------------------------------------------------------------

STARTED: list[Proc] = []  # everything this script started, killed (by pid) on the way out


@dataclass
class Proc:
    name: str
    ns: str
    argv: list[str]
    log_dir: Path
    ready: str  # regex on the log that says it is serving
    popen: subprocess.Popen | None = None
    starts: int = 0
    log_path: Path | None = None

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(["ip", "netns", "exec", self.ns, *self.argv], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        STARTED.append(self)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path and re.search(self.ready, self.log_path.read_text(errors="replace")):
                return
            if self.popen is not None and self.popen.poll() is not None:
                break
            time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
        raise RuntimeError(f"{self.name} did not become ready:\n{tail}")

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.popen.send_signal(sig)  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            self.popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            self.popen.wait(10)  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            self.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            try:
                self.popen.wait(15)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Cluster:
    net: Network
    model: str
    spec: dict[str, Any]
    log_dir: Path
    kv_bytes: int
    round_timeout: float
    replicas: dict[str, Proc] = field(default_factory=dict)
    relays: list[Proc] = field(default_factory=list)
    gateway: Proc | None = None
    ports: dict[str, int] = field(default_factory=dict)  # replica -> port it listens on (link side)
    metrics: dict[str, int] = field(default_factory=dict)  # replica -> its /metrics port (in its namespace)

    def build(self, delay_ms: float, jitter_ms: float) -> None:
        cli = [sys.executable, "-m", "specsplit.cli"]
        relay_map: dict[str, list[str]] = {"draft": [], "target": []}
        for i, (tier, name) in enumerate([("target", "target-a"), ("target", "target-b"),
                                          ("draft", "draft-a"), ("draft", "draft-b")]):
            port, inner, mport = 41000 + i, 42000 + i, 43000 + i
            self.ports[name], self.metrics[name] = port, mport
            host = "127.0.0.1" if not self.net.netem else self.net.ip(tier)
            listen = inner if not self.net.netem else port
            argv = [*cli, tier, self.model, "--host", host, "--grpc-port", str(listen), "--metrics-port", str(mport),
                    "--kv-cache-memory-bytes", str(self.kv_bytes), "--log-level", "info",
                    "--shutdown-grace-seconds", "2"]
            if tier == "draft":
                argv += ["--speculative-config", json.dumps(self.spec)]
            self.replicas[name] = Proc(name, self.net.ns[tier], argv, self.log_dir, r"ready on port \d+")
            relay_map[tier].append(f"{self.net.ip(tier)}:{port}=127.0.0.1:{inner}")
        if not self.net.netem:  # the delay half of the impairment
            for tier, routes in relay_map.items():
                self.relays.append(Proc(f"relay-{tier}", self.net.ns[tier], [
                    sys.executable, str(Path(__file__).resolve()), "_relay", "--routes", ",".join(routes),
                    "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)], self.log_dir, r"relaying"))
        addr = {t: ",".join(f"{self.net.ip(t)}:{self.ports[n]}" for n in self.replicas if n.startswith(t))
                for t in ("target", "draft")}
        self.gateway = Proc("gateway", self.net.ns["gw"], [
            *cli, "gateway", self.model, "--speculative-config", json.dumps(self.spec), "--host", "127.0.0.1",
            "--port", "8000", "--grpc-port", "50051", "--target-addresses", addr["target"],
            "--draft-addresses", addr["draft"], "--round-timeout", str(self.round_timeout), "--kv-wait", "60",
            "--max-concurrent-requests", "512", "--log-level", "info"], self.log_dir, r"gateway ready")

    def start(self) -> None:
        for p in [*self.relays, *self.replicas.values()]:
            p.start()
        for p in [*self.relays, *self.replicas.values()]:
            p.wait_ready()
        self.gateway.start()  # type: ignore[union-attr]
        self.gateway.wait_ready()  # type: ignore[union-attr]

    def all(self) -> list[Proc]:
        return [*self.replicas.values(), *self.relays, *([self.gateway] if self.gateway else [])]

    def scrape(self, name: str) -> dict[str, float]:
        """A replica's /metrics, read from inside its namespace."""
        p = self.replicas[name]
        code = (f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{self.metrics[name]}/metrics',"
                "timeout=5).read().decode())")
        r = sh(sys.executable, "-c", code, ns=p.ns, check=False)
        return _parse_metrics(r.stdout)

    def scrape_gateway(self) -> dict[str, float]:
        code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000/metrics',timeout=5).read().decode())"
        return _parse_metrics(sh(sys.executable, "-c", code, ns=self.net.ns["gw"], check=False).stdout)


def _parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(val)
    return out


# ---- relay (delay on links when netem is missing) ---------------------------------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, jitter_s: float) -> None:
    """Forward bytes in order, each chunk delivered delay ± jitter after it arrived."""
    queue: asyncio.Queue = asyncio.Queue()
    last = 0.0

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            last = max(last, time.monotonic() + delay_s + random.uniform(-jitter_s, jitter_s))
            queue.put_nowait((last, data))
        queue.put_nowait((0.0, None))
        await task
        with contextlib.suppress(Exception):
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def _relay_main(routes: list[tuple[str, int, str, int]], delay_ms: float, jitter_ms: float) -> None:
    async def handler(lr: asyncio.StreamReader, lw: asyncio.StreamWriter, host: str, port: int) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:  # the replica is down: the client sees the connection close, as with a dead host
            lw.close()
            return
        await asyncio.gather(_pump(lr, uw, delay_ms / 1e3, jitter_ms / 1e3), _pump(ur, lw, delay_ms / 1e3, jitter_ms / 1e3))

    servers = []
    for lhost, lport, uhost, uport in routes:
        servers.append(await asyncio.start_server(
            lambda r, w, h=uhost, p=uport: handler(r, w, h, p), lhost, lport, reuse_address=True))
    print("relaying", routes, flush=True)
    await asyncio.Event().wait()


# ---- load generator (runs in the gateway's namespace) -------------------------------------------


async def _load_main(address: str, jobs: list[dict[str, Any]], concurrency: int, duration: float, deadline: float,
                     out: Path) -> None:
    import grpc

    from specsplit.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    started = time.monotonic()
    stop_at = started + duration if duration > 0 else None
    results: list[dict[str, Any]] = []
    counter = iter(range(1 << 30))

    async with grpc.aio.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(i: int, job: dict[str, Any]) -> dict[str, Any]:
            rec: dict[str, Any] = {"i": i, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "tokens": [],
                                   "final": False, "status": None, "t": round(time.monotonic() - started, 2)}
            t0 = time.monotonic()
            req = gateway_pb2.GenerateRequest(text=job["prompt"], params=common_pb2.SamplingParams(
                max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True))
            try:
                async for m in stub.Generate(req, timeout=deadline):
                    if not rec["tokens"] and m.token_ids:
                        rec["ttft"] = time.monotonic() - t0
                    rec["tokens"] += list(m.token_ids)
                    if m.HasField("usage"):
                        rec["final"] = True
                        rec["completion_tokens"] = m.usage.completion_tokens
                        rec["draft_fallback"] = m.stats.draft_fallback
                        rec["drafted"] = m.stats.drafted_tokens
                rec["status"] = "OK"
            except grpc.aio.AioRpcError as e:
                rec["status"], rec["details"] = e.code().name, (e.details() or "")[:300]
            rec["seconds"] = time.monotonic() - t0
            return rec

        async def worker(w: int) -> None:
            k = w
            while True:
                if stop_at is None:
                    if k >= len(jobs):
                        return
                    job = jobs[k]
                    k += concurrency
                elif time.monotonic() >= stop_at:
                    return
                else:
                    job = random.choice(jobs)
                i = next(counter)
                try:  # a client-side watchdog beyond the gRPC deadline: a stream that never ends is lost
                    rec = await asyncio.wait_for(one(i, job), deadline + 30)
                except asyncio.TimeoutError:
                    rec = {"i": i, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "tokens": [],
                           "final": False, "status": "NO_OUTCOME"}
                results.append(rec)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    out.write_text("\n".join(json.dumps(r) for r in results))


# ---- chaos --------------------------------------------------------------------------------------


class Monkey:
    """Kills and restarts replicas while the load runs; logs every action."""

    def __init__(self, cluster: Cluster, interval: float, seed: int, gentle: bool = False) -> None:
        self.c = cluster
        self.gentle = gentle  # soak: one rolling restart per interval (SIGTERM and SIGKILL in turn)
        self.interval = interval
        self.rng = random.Random(seed)
        self.events: list[dict[str, Any]] = []
        self.kills = 0
        self.restarts = 0
        self.stops = 0
        self.draft_outages = 0
        self.t0 = time.monotonic()

    def log(self, what: str, name: str, **extra: Any) -> None:
        self.events.append({"t": round(time.monotonic() - self.t0, 1), "event": what, "replica": name, **extra})
        print(f"[chaos {time.monotonic() - self.t0:6.1f}s] {what} {name} {extra or ''}", flush=True)

    def kill(self, name: str) -> None:
        """SIGKILL, noting how many sessions this incarnation served: after a restart, proof
        that the gateway found the replica again at its address."""
        served = self.c.scrape(name).get("specsplit_sessions_opened_total")
        self.c.replicas[name].kill()
        self.kills += 1
        self.log("SIGKILL", name, incarnation=self.c.replicas[name].starts, sessions_served=served)

    def _restart(self, name: str) -> None:
        p = self.c.replicas[name]
        p.start()
        p.wait_ready()
        self.restarts += 1
        self.log("back", name)

    def run(self, until: float) -> None:
        episode = 0
        while time.monotonic() < until - self.interval:
            time.sleep(self.interval * self.rng.uniform(0.5, 1.5))
            episode += 1
            kind = "draft-outage" if episode % 5 == 3 else ("hang" if episode % 5 == 4 else "kill")
            if self.gentle:
                n = sorted(self.c.replicas)[episode % len(self.c.replicas)]
                graceful = (episode + episode // 4) % 2 == 0  # each replica gets both kinds
                if graceful:
                    self.c.replicas[n].stop()  # SIGTERM: NOT_SERVING, drain, exit
                    self.log("SIGTERM", n)
                else:
                    self.kill(n)
                self._restart(n)
            elif kind == "draft-outage":  # the whole draft tier: plain decoding meanwhile
                for n in ("draft-a", "draft-b"):
                    self.kill(n)
                self.draft_outages += 1
                time.sleep(self.rng.uniform(2, 5))
                for n in ("draft-a", "draft-b"):
                    self._restart(n)
            elif kind == "hang":  # alive but silent for longer than a round may take
                n = self.rng.choice(["target-a", "target-b"])
                self.c.replicas[n].signal(signal.SIGSTOP)
                self.stops += 1
                self.log("SIGSTOP", n)
                time.sleep(self.c.round_timeout * 1.5)
                self.c.replicas[n].signal(signal.SIGCONT)
                self.log("SIGCONT", n)
            else:  # one replica of either tier; the other replica of that tier stays up
                n = self.rng.choice(sorted(self.c.replicas))
                self.kill(n)
                time.sleep(self.rng.uniform(0.5, 3))
                self._restart(n)


class Sampler:
    """Resident memory of every process of the cluster, every `every_s` seconds (from /proc)."""

    def __init__(self, cluster: Cluster, every_s: float = 10.0) -> None:
        self.c = cluster
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    @staticmethod
    def rss_mib(pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 1)}
            for p in self.c.all():
                if p.alive:
                    row[p.name] = self.rss_mib(p.popen.pid)  # type: ignore[union-attr]
            self.samples.append(row)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict[str, Any]:
        """Per process: RSS after the first sample, at the end, and the peak (MiB)."""
        out: dict[str, Any] = {}
        names = {k for row in self.samples for k in row if k != "t"}
        for n in sorted(names):
            vals = [(row["t"], row[n]) for row in self.samples if row.get(n) is not None]
            if vals:
                out[n] = {"first": round(vals[0][1], 1), "last": round(vals[-1][1], 1),
                          "max": round(max(v for _, v in vals), 1)}
        return out


# ---- analysis -----------------------------------------------------------------------------------


def analyse(results: list[dict[str, Any]], baseline: dict[str, list[int]]) -> dict[str, Any]:
    s: dict[str, Any] = {"sent": len(results), "completed": 0, "failed_proper": {}, "failed_improper": {},
                         "lost": 0, "mismatched": 0, "tokens_duplicated": 0, "tokens_missing": 0,
                         "tokens_wrong": 0, "failed_with_wrong_prefix": 0, "draft_fallback_requests": 0,
                         "tokens_received": 0}
    lat = []
    for r in results:
        ref = baseline[f"{r['prompt']}|{r['max_tokens']}"]
        got = r["tokens"]
        s["tokens_received"] += len(got)
        if r["status"] == "OK" and r["final"]:
            if got == ref and r.get("completion_tokens") == len(ref):
                s["completed"] += 1
                lat.append(r["seconds"])
                s["draft_fallback_requests"] += bool(r.get("draft_fallback"))
            else:
                s["mismatched"] += 1
            for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ref, b=got, autojunk=False).get_opcodes():
                if op == "insert":
                    s["tokens_duplicated"] += j2 - j1
                elif op == "delete":
                    s["tokens_missing"] += i2 - i1
                elif op == "replace":
                    s["tokens_wrong"] += max(i2 - i1, j2 - j1)
        elif r["status"] in PROPER:
            s["failed_proper"][r["status"]] = s["failed_proper"].get(r["status"], 0) + 1
            if got != ref[: len(got)]:  # what it did stream before failing must still be right
                s["failed_with_wrong_prefix"] += 1
        elif r["status"] == "OK" or r["status"] == "NO_OUTCOME":
            s["lost"] += 1
        else:
            s["failed_improper"][r["status"]] = s["failed_improper"].get(r["status"], 0) + 1
    lat.sort()
    if lat:
        s["latency_s"] = {"p50": round(lat[len(lat) // 2], 3), "p99": round(lat[min(len(lat) - 1, int(len(lat) * .99))], 3),
                          "max": round(lat[-1], 3)}
    s["ok"] = (s["lost"] == 0 and s["mismatched"] == 0 and not s["failed_improper"] and s["tokens_duplicated"] == 0
               and s["tokens_missing"] == 0 and s["tokens_wrong"] == 0 and s["failed_with_wrong_prefix"] == 0)
    return s


def run_load(cluster: Cluster, jobs: list[dict[str, Any]], concurrency: int, duration: float, deadline: float,
             work: Path, tag: str) -> list[dict[str, Any]]:
    jobs_path, out = work / f"{tag}-jobs.json", work / f"{tag}-results.jsonl"
    jobs_path.write_text(json.dumps(jobs))
    p = Proc(f"load-{tag}", cluster.net.ns["gw"], [
        sys.executable, str(Path(__file__).resolve()), "_load", "--address", "127.0.0.1:50051", "--jobs", str(jobs_path),
        "--concurrency", str(concurrency), "--duration", str(duration), "--deadline", str(deadline),
        "--out", str(out)], cluster.log_dir, r"$^")
    p.start()
    return _wait_load(p, out, duration + deadline + 120)


def _wait_load(p: Proc, out: Path, timeout: float) -> list[dict[str, Any]]:
    try:
        p.popen.wait(timeout)  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        p.kill()
        raise RuntimeError("the load generator itself hung") from None
    if p.popen.returncode != 0:  # type: ignore[union-attr]
        raise RuntimeError(f"load generator failed:\n{p.log_path.read_text()[-3000:]}")  # type: ignore[union-attr]
    return [json.loads(line) for line in out.read_text().splitlines() if line]


def prepare_models(kind: str, work: Path) -> tuple[str, dict[str, Any]]:
    """(target model, speculative config) for `tiny` (random, fast) or a catalogue name."""
    if kind == "tiny":
        from specsplit.testing import make_tiny_model

        target = make_tiny_model(work / "target", seed=0)
        draft = make_tiny_model(work / "draft", seed=1, base=target, noise=0.05)
        return str(target), {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4,
                             "adaptive": False}
    from specsplit.factory import model_folder

    return str(model_folder(kind)), {"method": "ngram", "num_speculative_tokens": 4}


def parser(description: str, duration: float, interval: float, concurrency: int) -> argparse.ArgumentParser:
    """The options chaos.py and soak.py share (with their own defaults)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="tiny", help="tiny (random models built here) or a `specsplit models` name")
    ap.add_argument("--duration", type=float, default=duration, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=concurrency, help="concurrent streams")
    ap.add_argument("--max-tokens", type=int, nargs=2, default=(24, 96), help="range of max_tokens per prompt")
    ap.add_argument("--delay-ms", type=float, default=5.0, help="added one-way delay per link")
    ap.add_argument("--jitter-ms", type=float, default=2.0)
    ap.add_argument("--loss-pct", type=float, default=1.0, help="packet loss per link direction")
    ap.add_argument("--kill-interval", type=float, default=interval, help="mean seconds between fault episodes")
    ap.add_argument("--round-timeout", type=float, default=4.0, help="the gateway's per-round deadline")
    ap.add_argument("--kv-bytes", type=int, default=1 << 19,
                    help="KV budget per replica (small: sessions get preempted and resumed under load)")
    ap.add_argument("--deadline", type=float, default=180.0, help="client deadline per request")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the JSON summary (and the fault log) here too")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return ap


def run(a: argparse.Namespace, gentle: bool = False, rss_every_s: float = 10.0
        ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Build the namespaces and the cluster, run the baseline and the load under faults, tear down.

    Returns (summary, fault events, per-request records). `gentle`: rolling restarts only (soak).
    """
    random.seed(a.seed)
    work = Path(tempfile.mkdtemp(prefix="specsplit-chaos-"))
    (work / "logs").mkdir()
    net = Network(f"ssc{os.getpid() % 100000}")
    cluster: Cluster | None = None

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        model, spec = prepare_models(a.model, work)
        net.up()
        cluster = Cluster(net, model, spec, work / "logs", a.kv_bytes, a.round_timeout)
        cluster.build(a.delay_ms, a.jitter_ms)
        t0 = time.monotonic()
        cluster.start()
        print(f"cluster up in {time.monotonic() - t0:.0f}s (netem: {net.netem}); work folder {work}", flush=True)
        rng = random.Random(a.seed)
        jobs = [{"prompt": p, "max_tokens": rng.randint(*a.max_tokens)} for p in PROMPTS]
        # 1. fault-free baseline: no impairment, no kill
        base = run_load(cluster, jobs, min(a.concurrency, len(jobs)), 0, a.deadline, work, "baseline")
        bad = [r for r in base if r["status"] != "OK" or not r["final"]]
        if bad:
            raise RuntimeError(f"the fault-free baseline failed: {bad[:2]}")
        baseline = {f"{r['prompt']}|{r['max_tokens']}": r["tokens"] for r in base}
        # 2. load under faults
        net.impair(a.delay_ms, a.jitter_ms, a.loss_pct)
        monkey = Monkey(cluster, a.kill_interval, a.seed, gentle)
        sampler = Sampler(cluster, rss_every_s)
        sampler.start()
        jobs_path, out = work / "load-jobs.json", work / "load-results.jsonl"
        jobs_path.write_text(json.dumps(jobs))
        load = Proc("load", net.ns["gw"], [
            sys.executable, str(Path(__file__).resolve()), "_load", "--address", "127.0.0.1:50051",
            "--jobs", str(jobs_path), "--concurrency", str(a.concurrency), "--duration", str(a.duration),
            "--deadline", str(a.deadline), "--out", str(out)], work / "logs", r"$^")
        t_load = time.monotonic()
        load.start()
        monkey.t0 = t_load
        monkey.run(t_load + a.duration)
        results = _wait_load(load, out, a.duration + a.deadline + 120)
        elapsed = time.monotonic() - t_load
        sampler.stop()
        dropped = net.dropped()
        net.clear()
        for p in cluster.replicas.values():  # every replica serving again at the end
            if not p.alive:
                p.start()
                p.wait_ready()
        time.sleep(3)  # closing is asynchronous
        tiers = {n: cluster.scrape(n) for n in cluster.replicas}
        gw = cluster.scrape_gateway()
        summary = analyse(results, baseline)
        summary.update({
            "model": a.model, "duration_s": round(elapsed, 1), "concurrency": a.concurrency,
            "links": {"delay_ms": a.delay_ms, "jitter_ms": a.jitter_ms, "loss_pct": a.loss_pct,
                      "method": "tc netem" if net.netem else "nftables drop + delay relay",
                      "packets_dropped": dropped},
            "faults": {"sigkill": monkey.kills, "restarts": monkey.restarts, "sigstop": monkey.stops,
                       "draft_tier_outages": monkey.draft_outages},
            "tokens_per_s": round(summary["tokens_received"] / elapsed, 1),
            "gateway": {k: gw.get(f"specsplit_{k}_total", 0.0) for k in ("failovers", "preemptions")},
            "tiers_idle_after": all(m.get("specsplit_active_sessions", -1) == 0
                                    and m.get("specsplit_kv_cache_usage_ratio", -1) == 0 for m in tiers.values()),
            "replica_sessions_since_restart": {n: m.get("specsplit_sessions_opened_total", 0.0)
                                               for n, m in tiers.items()},
            "rss_mib": sampler.summary(),
        })
        summary["ok"] = summary["ok"] and summary["tiers_idle_after"]
        return summary, monkey.events, results
    finally:
        for p in STARTED:
            with contextlib.suppress(Exception):
                p.kill()
        net.down()
        if not a.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)


def main() -> int:
    a = parser(__doc__.split("\n\n")[0], duration=120.0, interval=8.0, concurrency=16).parse_args()
    if os.geteuid() != 0:
        print("chaos.py needs root (ip netns, veth, tc/nft)", file=sys.stderr)
        return 2
    try:
        summary, events, _ = run(a)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2), flush=True)
    if a.out:
        a.out.write_text(json.dumps({"summary": summary, "events": events}, indent=2))
    return 0 if summary["ok"] else 1


def sub_main() -> int:
    """The helpers this script runs inside a namespace: `_relay` and `_load`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["_relay", "_load"])
    ap.add_argument("--routes", default="")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--address")
    ap.add_argument("--jobs", type=Path)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=0.0)
    ap.add_argument("--deadline", type=float, default=120.0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.mode == "_relay":
        routes = []
        for r in a.routes.split(","):
            left, right = r.split("=")
            lh, lp = left.rsplit(":", 1)
            uh, up = right.rsplit(":", 1)
            routes.append((lh, int(lp), uh, int(up)))
        asyncio.run(_relay_main(routes, a.delay_ms, a.jitter_ms))
        return 0
    asyncio.run(_load_main(a.address, json.loads(a.jobs.read_text()), a.concurrency, a.duration, a.deadline, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(sub_main() if len(sys.argv) > 1 and sys.argv[1].startswith("_") else main())
