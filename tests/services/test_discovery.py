"""Replica discovery (gateway/discovery.py): static lists, DNS, and the Kubernetes API.

DNS tests resolve names through this machine's own resolver (``localhost``, IP literals).
Kubernetes tests run the real ``kubernetes`` client against :class:`FakeEndpointSliceApi`, a
local aiohttp stand-in that speaks only the EndpointSlice list + watch API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.discovery import (
    DnsDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    addresses_from_addrinfo,
    apply_slice_event,
    backoff_delay,
    dns_name,
    endpoint_slice_addresses,
    make_discovery,
    merge_slices,
    normalize_addresses,
    service_label_selector,
)

NS = "llm"
TARGET = "rel-specsplit-target"
DRAFT = "rel-specsplit-draft"


# --- a stand-in for the Kubernetes API server ---------------------------------------------------


class FakeEndpointSliceApi:
    """A stand-in for a Kubernetes API server, NOT an API server: it serves only
    ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`` (list, and watch as a chunked
    stream of JSON lines with ADDED / MODIFIED / DELETED / BOOKMARK events), filtered by the
    ``kubernetes.io/service-name`` label selector, with resourceVersions, ``410 Gone`` for a
    resourceVersion older than the last compaction, ``timeoutSeconds``, and injected failures.
    """

    def __init__(self) -> None:
        self.rv = 1000
        self.slices: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (rv, event type, object)
        self.compacted_rv = 0  # watches from a resourceVersion below this get 410 Gone
        self.fail_next = 0  # answer this many requests with 500
        self.requests: list[tuple[str, dict[str, str]]] = []  # ("list" | "watch", query)
        self._tick = asyncio.Event()
        self._drop = 0  # bumped to end every open watch stream
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # State changes, as the EndpointSlice controller would make them.

    def put(
        self,
        name: str,
        service: str,
        endpoints: list[tuple[str, bool | None] | tuple[str, bool | None, bool]],
        *,
        port: int = 50052,
        port_name: str | None = "grpc",
        namespace: str = NS,
    ) -> dict[str, Any]:
        """Create or replace a slice; endpoints are (ip, ready[, terminating])."""
        key = (namespace, name)
        event = "MODIFIED" if key in self.slices else "ADDED"
        self.rv += 1
        obj = endpoint_slice(name, service, namespace, self.rv, endpoints, port, port_name)
        self.slices[key] = obj
        self._record(event, obj)
        return obj

    def delete(self, name: str, namespace: str = NS) -> None:
        obj = self.slices.pop((namespace, name))
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        self._record("DELETED", obj)

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: older resourceVersions expire."""
        self.compacted_rv = self.rv
        self.history.clear()

    def drop_watches(self) -> None:
        """End every open watch stream (as an API server restart or a load balancer would)."""
        self._drop += 1
        self._wake()

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.requests if k == kind)

    def _record(self, event: str, obj: dict[str, Any]) -> None:
        self.history.append((self.rv, event, obj))
        self._wake()

    def _wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    # HTTP.

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        watching = query.get("watch", "").lower() in ("true", "1")
        self.requests.append(("watch" if watching else "list", query))
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response(status_body(500, "InternalError", "injected"), status=500)
        namespace = request.match_info["ns"]
        selector = query.get("labelSelector", "")
        if watching:
            return await self._watch(request, namespace, selector, query)
        items = [
            o
            for (ns, _), o in sorted(self.slices.items())
            if ns == namespace and matches(o, selector)
        ]
        return web.json_response(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, namespace: str, selector: str, query: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event: str, obj: dict[str, Any]) -> None:
            await response.write((json.dumps({"type": event, "object": obj}) + "\n").encode())

        try:
            await self._stream(send, namespace, selector, query)
            await response.write_eof()
        except ConnectionResetError:  # the client went away (discovery stopped)
            pass
        return response

    async def _stream(
        self,
        send: Callable[[str, dict[str, Any]], Awaitable[None]],
        namespace: str,
        selector: str,
        query: dict[str, str],
    ) -> None:
        since = int(query.get("resourceVersion") or 0)
        if since and since < self.compacted_rv:
            await send("ERROR", status_body(410, "Expired", f"too old resource version: {since}"))
            return
        if not since:  # no resourceVersion: the current state first, as synthetic ADDED events
            for (ns, _), obj in sorted(self.slices.items()):
                if ns == namespace and matches(obj, selector):
                    await send("ADDED", obj)
            since = self.rv
        if query.get("allowWatchBookmarks", "").lower() == "true":
            await send("BOOKMARK", bookmark(since))
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 3600)
        drop = self._drop
        while self._drop == drop and time.monotonic() < deadline:
            tick = self._tick
            for rv, event, obj in list(self.history):
                if (
                    rv > since
                    and obj["metadata"]["namespace"] == namespace
                    and matches(obj, selector)
                ):
                    await send(event, obj)
                since = max(since, rv)
            try:
                await asyncio.wait_for(tick.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break


def endpoint_slice(
    name: str,
    service: str,
    namespace: str,
    rv: int,
    endpoints: list[Any],
    port: int,
    port_name: str | None,
) -> dict[str, Any]:
    """A complete discovery.k8s.io/v1 EndpointSlice as the API server returns it."""
    eps = []
    for ep in endpoints:
        ip, ready = ep[0], ep[1]
        terminating = ep[2] if len(ep) > 2 else False
        conditions: dict[str, bool] = {"serving": bool(ready) or ready is None}
        if ready is not None:
            conditions["ready"] = ready
        if terminating:
            conditions["terminating"] = True
        eps.append(
            {
                "addresses": [ip],
                "conditions": conditions,
                "targetRef": {
                    "kind": "Pod",
                    "name": f"{service}-{ip.replace('.', '-')}",
                    "namespace": namespace,
                },
            }
        )
    ports: dict[str, Any] = {"port": port, "protocol": "TCP"}
    if port_name is not None:
        ports["name"] = port_name
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": str(rv),
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv6" if ":" in (endpoints[0][0] if endpoints else "") else "IPv4",
        "endpoints": eps,
        "ports": [ports],
    }


def matches(obj: dict[str, Any], selector: str) -> bool:
    labels = obj["metadata"].get("labels", {})
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def bookmark(rv: int) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": str(rv)},
    }


def kube_client(url: str) -> Any:
    from kubernetes import client

    return client.ApiClient(client.Configuration(host=url))


async def changes_until(
    queue: asyncio.Queue[list[str]], expected: list[str], timeout: float = 5.0
) -> list[list[str]]:
    """Every change published until the address list equals ``expected``."""
    seen: list[list[str]] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] != expected:
        seen.append(await asyncio.wait_for(queue.get(), max(0.01, deadline - time.monotonic())))
    return seen


def with_api(
    body: Callable[
        [FakeEndpointSliceApi, KubernetesDiscovery, asyncio.Queue[list[str]]], Awaitable[None]
    ],
    *,
    setup: Callable[[FakeEndpointSliceApi], None] | None = None,
    **kwargs: Any,
) -> None:
    """Run ``body`` with a started stand-in API, a started discovery of TARGET, and its changes."""
    pytest.importorskip("kubernetes")

    async def main() -> None:
        api = FakeEndpointSliceApi()
        url = await api.start()
        if setup is not None:
            setup(api)
        kwargs.setdefault("backoff_base_s", 0.01)
        kwargs.setdefault("backoff_cap_s", 0.05)
        disc = KubernetesDiscovery(TARGET, NS, 1234, kube_client(url), **kwargs)
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        disc.subscribe(queue.put_nowait)
        try:
            await disc.start()
            await body(api, disc, queue)
        finally:
            await disc.stop()
            await api.close()

    asyncio.run(main())


# --- pure helpers ------------------------------------------------------------------------------


def test_normalize_addresses_sorts_dedupes_and_fills_default_port() -> None:
    got = normalize_addresses(
        [" b:2 ", "a", "a:50052", "", "[::1]:7", "::1", "b:2"], default_port=50052
    )
    assert got == ["[::1]:50052", "[::1]:7", "a:50052", "b:2"]


@pytest.mark.parametrize("bad", ["host:port", "host:0", ":50052", "host:70000"])
def test_normalize_addresses_rejects_malformed_entries(bad: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        normalize_addresses([bad], default_port=1)


def test_normalize_addresses_without_port_or_default_is_an_error() -> None:
    with pytest.raises(ValueError, match="no port"):
        normalize_addresses(["draft-0"])


def test_dns_name_qualifies_a_service_in_its_namespace() -> None:
    assert dns_name(TARGET, NS) == f"{TARGET}.{NS}.svc"
    assert dns_name("target.other.svc.cluster.local", NS) == "target.other.svc.cluster.local"
    assert dns_name("localhost", None) == "localhost"


def test_addresses_from_addrinfo_brackets_ipv6() -> None:
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 9)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", 9, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 9)),
    ]
    assert addresses_from_addrinfo(infos, 50052) == ["10.0.0.2:50052", "[fd00::1]:50052"]


def test_endpoint_slice_addresses_keep_only_ready_endpoints() -> None:
    obj = endpoint_slice(
        "s",
        TARGET,
        NS,
        1,
        [("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None), ("10.0.0.4", False, True)],
        50052,
        "grpc",
    )
    # ready=None is "unknown", which the EndpointConditions API says to treat as ready.
    assert endpoint_slice_addresses(obj, 1) == ["10.0.0.1:50052", "10.0.0.3:50052"]


def test_endpoint_slice_port_is_the_grpc_port_else_the_only_port_else_the_default() -> None:
    named = endpoint_slice("s", TARGET, NS, 1, [("10.0.0.1", True)], 7000, "grpc")
    unnamed = endpoint_slice("s", TARGET, NS, 1, [("10.0.0.1", True)], 7001, None)
    other = endpoint_slice("s", TARGET, NS, 1, [("10.0.0.1", True)], 9100, "metrics")
    assert endpoint_slice_addresses(named, 1) == ["10.0.0.1:7000"]
    assert endpoint_slice_addresses(unnamed, 1) == ["10.0.0.1:7001"]
    assert endpoint_slice_addresses(other, 50052) == ["10.0.0.1:50052"]
    assert endpoint_slice_addresses({"metadata": {"name": "empty"}, "endpoints": None}, 1) == []


def test_apply_slice_event_and_merge_follow_the_watch() -> None:
    slices: dict[str, list[str]] = {}
    a = endpoint_slice("a", TARGET, NS, 1, [("10.0.0.1", True)], 50052, "grpc")
    b = endpoint_slice("b", TARGET, NS, 2, [("10.0.0.1", True), ("10.0.0.2", True)], 50052, "grpc")
    apply_slice_event(slices, "ADDED", a, 1)
    apply_slice_event(slices, "ADDED", b, 1)
    assert merge_slices(slices) == ["10.0.0.1:50052", "10.0.0.2:50052"]  # a pod in two slices once
    apply_slice_event(
        slices,
        "MODIFIED",
        endpoint_slice("b", TARGET, NS, 3, [("10.0.0.2", False)], 50052, "grpc"),
        1,
    )
    apply_slice_event(slices, "BOOKMARK", bookmark(4), 1)
    assert merge_slices(slices) == ["10.0.0.1:50052"]
    apply_slice_event(slices, "DELETED", a, 1)
    assert merge_slices(slices) == []


def test_backoff_delay_grows_and_is_capped() -> None:
    rng = random.Random(0)
    for attempt in range(40):
        delay = backoff_delay(attempt, 0.5, 30.0, rng)
        assert 0.0 <= delay <= min(30.0, 0.5 * 2**attempt)


def test_label_selector_names_the_service() -> None:
    assert service_label_selector(TARGET) == f"kubernetes.io/service-name={TARGET}"


# --- make_discovery ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("consul", {"service": TARGET, "namespace": NS}, "unknown discovery mode 'consul'"),
        ("dns", {"service": None, "namespace": NS}, "dns discovery needs the name"),
        ("kubernetes", {"service": "", "namespace": NS}, "kubernetes discovery needs the name"),
        ("kubernetes", {"service": TARGET, "namespace": None}, "needs the namespace"),
        ("static", {"service": None, "namespace": None}, "static discovery needs a non-empty list"),
    ],
)
def test_make_discovery_rejects_bad_settings(
    mode: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_discovery(mode, static=None, port=50052, **kwargs)


def test_make_discovery_builds_each_mode() -> None:
    assert isinstance(
        make_discovery("static", static=["a:1"], service=None, namespace=None, port=2),
        StaticDiscovery,
    )
    dns = make_discovery("dns", static=None, service=TARGET, namespace=NS, port=50052, refresh_s=1)
    assert isinstance(dns, DnsDiscovery) and dns.name == f"{TARGET}.{NS}.svc" and dns.refresh_s == 1
    kube = make_discovery(
        "kubernetes", static=None, service=TARGET, namespace=NS, port=50052, kube_client=object()
    )
    assert isinstance(kube, KubernetesDiscovery) and kube.service == TARGET


# --- static -----------------------------------------------------------------------------------


def test_static_discovery_serves_its_list() -> None:
    async def main() -> None:
        disc = make_discovery(
            "static", static=["t1:50052", "t0"], service=None, namespace=None, port=50052
        )
        seen: list[list[str]] = []
        disc.subscribe(seen.append)
        await disc.start()
        await disc.start()
        assert disc.addresses() == ["t0:50052", "t1:50052"]
        await disc.stop()
        assert seen == []  # a static list never changes

    asyncio.run(main())


# --- DNS ------------------------------------------------------------------------------------------


def test_dns_resolves_a_name_of_this_machine() -> None:
    async def main() -> None:
        disc = make_discovery("dns", static=None, service="localhost", namespace=None, port=50053)
        await disc.start()
        try:
            assert "127.0.0.1:50053" in disc.addresses() or "[::1]:50053" in disc.addresses()
        finally:
            await disc.stop()

    asyncio.run(main())


def test_dns_re_resolution_publishes_replicas_that_come_and_go() -> None:
    """The Service name maps to locally resolvable names that change as pods come and go."""
    records = {"svc": ["localhost"]}

    async def resolver(host: str, port: int) -> list[Any]:
        loop = asyncio.get_running_loop()
        names = records[host]
        if not names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        results = await asyncio.gather(
            *(loop.getaddrinfo(n, port, type=socket.SOCK_STREAM) for n in names)
        )
        return [info for infos in results for info in infos if info[0] == socket.AF_INET]

    async def main() -> None:
        disc = DnsDiscovery("svc", 50052, refresh_s=0.02, resolver=resolver)
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        disc.subscribe(queue.put_nowait)
        await disc.start()
        assert disc.addresses() == ["127.0.0.1:50052"]
        records["svc"] = ["localhost", "127.0.0.2", "127.0.0.3"]
        await changes_until(queue, ["127.0.0.1:50052", "127.0.0.2:50052", "127.0.0.3:50052"])
        records["svc"] = ["127.0.0.3"]
        await changes_until(queue, ["127.0.0.3:50052"])
        records["svc"] = []  # no ready pod: the headless Service has no records
        await changes_until(queue, [])
        await disc.stop()
        await disc.stop()

    asyncio.run(main())


def test_dns_transient_failure_keeps_the_last_replicas() -> None:
    failing = {"on": False}

    async def resolver(host: str, port: int) -> list[Any]:
        if failing["on"]:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return await asyncio.get_running_loop().getaddrinfo("127.0.0.1", port)

    async def main() -> None:
        disc = DnsDiscovery("svc", 9, refresh_s=10, resolver=resolver)
        await disc.start()
        failing["on"] = True
        await disc.refresh()
        assert disc.addresses() == ["127.0.0.1:9"]
        await disc.stop()

    asyncio.run(main())


def test_a_failing_subscriber_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        disc = DnsDiscovery("localhost", 1, refresh_s=10)
        seen: list[list[str]] = []

        def broken(addresses: list[str]) -> None:
            raise RuntimeError("boom")

        disc.subscribe(broken)
        disc.subscribe(seen.append)
        await disc.start()
        await disc.stop()
        assert seen and seen[0] == disc.addresses()

    with caplog.at_level(logging.ERROR, logger="gateway.discovery"):
        asyncio.run(main())
    assert "subscriber" in caplog.text


# --- Kubernetes API -------------------------------------------------------------------------------


def two_target_slices(api: FakeEndpointSliceApi) -> None:
    api.put("target-abc", TARGET, [("10.1.0.1", True), ("10.1.0.2", False)])
    api.put("target-def", TARGET, [("10.1.0.3", True), ("10.1.0.4", True, True)])
    api.put("draft-xyz", DRAFT, [("10.2.0.1", True)], port=50053)


def test_kubernetes_start_lists_the_ready_endpoints_of_the_service() -> None:
    async def body(api: FakeEndpointSliceApi, disc: KubernetesDiscovery, queue: Any) -> None:
        # Ready only, the slice's grpc port (not the default 1234), other Services left out.
        assert disc.addresses() == ["10.1.0.1:50052", "10.1.0.3:50052"]
        kind, query = api.requests[0]
        assert kind == "list" and query["labelSelector"] == f"kubernetes.io/service-name={TARGET}"

    with_api(body, setup=two_target_slices)


def test_kubernetes_watch_reports_added_not_ready_and_removed_replicas() -> None:
    async def body(api: FakeEndpointSliceApi, disc: KubernetesDiscovery, queue: Any) -> None:
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052"])
        api.put("target-ghi", TARGET, [("10.1.0.5", True)])  # a new replica: ADDED
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052", "10.1.0.5:50052"])
        api.put("target-abc", TARGET, [("10.1.0.1", False), ("10.1.0.2", True)])  # MODIFIED
        await changes_until(queue, ["10.1.0.2:50052", "10.1.0.3:50052", "10.1.0.5:50052"])
        api.put("target-def", TARGET, [("10.1.0.3", False, True)])  # draining: terminating
        await changes_until(queue, ["10.1.0.2:50052", "10.1.0.5:50052"])
        api.delete("target-ghi")  # DELETED
        await changes_until(queue, ["10.1.0.2:50052"])
        api.put("draft-xyz", DRAFT, [("10.2.0.9", True)], port=50053)  # another Service: no change
        await asyncio.sleep(0.1)
        assert queue.empty() and disc.addresses() == ["10.1.0.2:50052"]
        assert api.count("list") == 1
        watch = next(q for k, q in api.requests if k == "watch")
        assert watch["allowWatchBookmarks"].lower() == "true" and int(watch["timeoutSeconds"]) > 0

    with_api(body, setup=two_target_slices)


def test_kubernetes_watch_resumes_from_the_last_resource_version() -> None:
    async def body(api: FakeEndpointSliceApi, disc: KubernetesDiscovery, queue: Any) -> None:
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052"])
        api.put("target-ghi", TARGET, [("10.1.0.5", True)])
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052", "10.1.0.5:50052"])
        seen_rv = api.rv
        api.drop_watches()  # the stream ends; a change lands before the client is back
        api.delete("target-ghi")
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052"])
        watches = [q for k, q in api.requests if k == "watch"]
        assert len(watches) >= 2 and watches[-1]["resourceVersion"] == str(seen_rv)
        assert api.count("list") == 1  # resumed, not re-listed

    with_api(body, setup=two_target_slices)


def test_kubernetes_lists_again_after_410_gone() -> None:
    async def body(api: FakeEndpointSliceApi, disc: KubernetesDiscovery, queue: Any) -> None:
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052"])
        last_rv = api.rv
        api.drop_watches()  # while the client reconnects, history moves on and is compacted
        api.put("target-abc", TARGET, [("10.1.0.7", True)])
        api.delete("target-def")
        api.compact()
        await changes_until(queue, ["10.1.0.7:50052"])
        # The watch from the old resourceVersion got ERROR 410, so the client listed afresh.
        assert any(
            k == "watch" and q.get("resourceVersion") == str(last_rv) for k, q in api.requests
        )
        await asyncio.sleep(0.1)
        assert api.count("list") == 2  # and the fresh watch holds

    with_api(body, setup=two_target_slices)


def test_kubernetes_backs_off_through_api_errors_and_then_syncs() -> None:
    def setup(api: FakeEndpointSliceApi) -> None:
        two_target_slices(api)
        api.fail_next = 3

    async def body(api: FakeEndpointSliceApi, disc: KubernetesDiscovery, queue: Any) -> None:
        assert disc.addresses() == ["10.1.0.1:50052", "10.1.0.3:50052"]  # start() waited for it
        assert api.count("list") == 4

    with_api(body, setup=setup)


def test_kubernetes_keeps_the_last_replicas_while_the_api_is_down() -> None:
    async def body(api: FakeEndpointSliceApi, disc: KubernetesDiscovery, queue: Any) -> None:
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052"])
        api.fail_next = 10**6
        api.drop_watches()
        await asyncio.sleep(0.3)
        assert api.count("watch") + api.count("list") >= 4  # it kept trying
        assert disc.addresses() == ["10.1.0.1:50052", "10.1.0.3:50052"] and queue.empty()
        api.put("target-ghi", TARGET, [("10.1.0.5", True)])
        api.fail_next = 0
        await changes_until(queue, ["10.1.0.1:50052", "10.1.0.3:50052", "10.1.0.5:50052"])

    with_api(body, setup=two_target_slices)


def test_kubernetes_start_is_idempotent_and_stop_is_prompt() -> None:
    pytest.importorskip("kubernetes")

    async def main() -> None:
        api = FakeEndpointSliceApi()
        url = await api.start()
        two_target_slices(api)
        disc = make_discovery(
            "kubernetes",
            static=None,
            service=TARGET,
            namespace=NS,
            port=1,
            kube_client=kube_client(url),
        )
        await disc.start()
        await disc.start()
        assert disc.addresses() == ["10.1.0.1:50052", "10.1.0.3:50052"]
        assert api.count("list") == 1
        began = time.monotonic()
        await disc.stop()  # the watch is blocked reading a quiet stream
        assert time.monotonic() - began < 2.0
        await disc.stop()
        await api.close()

    asyncio.run(main())


def test_kubernetes_empty_service_has_no_replicas_until_one_is_ready() -> None:
    async def body(api: FakeEndpointSliceApi, disc: KubernetesDiscovery, queue: Any) -> None:
        assert disc.addresses() == []
        api.put("target-new", TARGET, [("10.1.0.9", False)])  # scheduled, still loading the model
        await asyncio.sleep(0.05)
        assert disc.addresses() == []
        api.put("target-new", TARGET, [("10.1.0.9", True)])  # warmed up: readiness probe passes
        await changes_until(queue, ["10.1.0.9:50052"])

    with_api(body)


def test_stand_in_objects_are_valid_endpoint_slices() -> None:
    """The stand-in's objects pass the real Kubernetes schema, so the tests speak the real API."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    obj = endpoint_slice(
        "s",
        TARGET,
        NS,
        1,
        [("10.0.0.1", True), ("10.0.0.2", None), ("10.0.0.3", False, True)],
        50052,
        "grpc",
    )
    kubernetes_validate.validate(obj, "1.33", strict=True)
    kubernetes_validate.validate(
        endpoint_slice("s6", TARGET, NS, 1, [("fd00::1", True)], 50052, None), "1.33", strict=True
    )


def test_api_errors_are_logged_on_one_line() -> None:
    from kubernetes.client.exceptions import ApiException

    from gateway.discovery import describe_error

    assert describe_error(ApiException(status=403, reason="Forbidden")) == "HTTP 403 Forbidden"
    assert describe_error(ConnectionRefusedError("refused")) == "ConnectionRefusedError: refused"
