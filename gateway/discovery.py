"""Replica discovery for the gateway: which draft or target replicas are ready right now.

Three modes behind one small interface (:class:`Discovery`):

- ``static``: a fixed ``host:port`` list (local runs, docker-compose, replicas outside Kubernetes).
- ``dns``: the A/AAAA records of a headless Service, re-resolved every ``refresh_s`` seconds.
  Kubernetes publishes only ready pods there, so this needs no RBAC, but a change is seen only
  at the next refresh.
- ``kubernetes``: list + watch the ``discovery.k8s.io/v1`` EndpointSlices of the Service with the
  ``kubernetes`` client; changes arrive within milliseconds. Needs get/list/watch on
  endpointslices (the Helm chart's Role grants exactly that).

Subscribers are called with the new sorted address list on every change, on the event loop that
called :meth:`Discovery.start`; the gateway uses that to send new sessions to new replicas at once
and to move the sessions of a replica that left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

Callback = Callable[[list[str]], None]
MODES = ("static", "dns", "kubernetes")
# Resolver errors that mean "this name has no records" (no ready pods), not "DNS is broken".
_NO_RECORDS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class Discovery(Protocol):
    """What the gateway needs from a discovery mode."""

    def addresses(self) -> list[str]:
        """Current ready replicas as ``host:port``, sorted."""
        ...

    async def start(self) -> None:
        """Begin resolving or watching; idempotent. Returns after the first lookup (or timeout)."""
        ...

    async def stop(self) -> None:
        """Stop all background work; idempotent."""
        ...

    def subscribe(self, callback: Callback) -> None:
        """Call ``callback(addresses)`` on every change of the address list."""
        ...


# --- pure helpers --------------------------------------------------------------------------


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets (``[::1]:50052``)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def normalize_addresses(items: Iterable[str], default_port: int | None = None) -> list[str]:
    """Strip, dedupe and sort ``host[:port]`` entries; a missing port becomes ``default_port``."""
    out: set[str] = set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        bare_ipv6 = host.count(":") > 0 and not host.endswith("]")
        if sep and not bare_ipv6:
            if not port.isdigit() or not 0 < int(port) < 65536 or not host:
                raise ValueError(f"replica address {item!r} is not host:port")
            out.add(f"{host}:{int(port)}")
        elif default_port is not None:
            out.add(format_address(item.strip("[]"), default_port))
        else:
            raise ValueError(f"replica address {item!r} has no port and no default port was given")
    return sorted(out)


def dns_name(service: str, namespace: str | None) -> str:
    """The name to resolve: ``service.namespace.svc`` in a namespace, else ``service`` as given."""
    if namespace and "." not in service:
        return f"{service}.{namespace}.svc"
    return service


def addresses_from_addrinfo(infos: Iterable[Sequence[Any]], port: int) -> list[str]:
    """Sorted unique ``host:port`` from ``getaddrinfo`` results."""
    return sorted({format_address(str(info[4][0]), port) for info in infos})


def service_label_selector(service: str) -> str:
    """Label selector of the EndpointSlices that belong to a Service."""
    return f"kubernetes.io/service-name={service}"


def endpoint_is_ready(endpoint: Mapping[str, Any]) -> bool:
    """Ready and not terminating; an unset ``ready`` means ready (EndpointConditions semantics)."""
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def slice_port(slice_obj: Mapping[str, Any], default_port: int, port_name: str = "grpc") -> int:
    """The slice's port named ``port_name``, its only unnamed port, or ``default_port``."""
    ports = slice_obj.get("ports") or []
    for p in ports:
        if p.get("name") == port_name and p.get("port"):
            return int(p["port"])
    if len(ports) == 1 and not ports[0].get("name") and ports[0].get("port"):
        return int(ports[0]["port"])
    return default_port


def endpoint_slice_addresses(
    slice_obj: Mapping[str, Any], default_port: int, port_name: str = "grpc"
) -> list[str]:
    """Sorted ``host:port`` of the ready endpoints of one EndpointSlice (a JSON dict)."""
    port = slice_port(slice_obj, default_port, port_name)
    out = set()
    for endpoint in slice_obj.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        # The addresses of one endpoint are fungible: the first one stands for the pod.
        if addresses and endpoint_is_ready(endpoint):
            out.add(format_address(addresses[0], port))
    return sorted(out)


def apply_slice_event(
    slices: dict[str, list[str]],
    event_type: str,
    slice_obj: Mapping[str, Any],
    default_port: int,
    port_name: str = "grpc",
) -> None:
    """Update ``slices`` (slice name -> ready addresses) with one watch event, in place."""
    name = (slice_obj.get("metadata") or {}).get("name", "")
    if event_type == "DELETED":
        slices.pop(name, None)
    elif event_type in ("ADDED", "MODIFIED"):
        slices[name] = endpoint_slice_addresses(slice_obj, default_port, port_name)


def merge_slices(slices: Mapping[str, Iterable[str]]) -> list[str]:
    """All replicas of a Service: the sorted union over its slices (a pod may sit in two)."""
    return sorted({address for addresses in slices.values() for address in addresses})


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return (rng or random).uniform(0.0, ceiling)


def describe_error(exc: BaseException) -> str:
    """One line for a log: ``HTTP 403 Forbidden`` for API errors, else the exception itself."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


# --- the three modes -------------------------------------------------------------------------


class _Publisher:
    """Holds the current address list and tells subscribers about changes."""

    def __init__(self) -> None:
        self._addresses: list[str] = []
        self._subscribers: list[Callback] = []

    def addresses(self) -> list[str]:
        return list(self._addresses)

    def subscribe(self, callback: Callback) -> None:
        self._subscribers.append(callback)

    def _publish(self, addresses: list[str]) -> None:
        if addresses == self._addresses:
            return
        log.info("%s: replicas %s -> %s", type(self).__name__, self._addresses, addresses)
        self._addresses = list(addresses)
        for callback in list(self._subscribers):
            try:
                callback(list(addresses))
            except Exception:  # one broken subscriber must not stop discovery
                log.exception("discovery subscriber %r failed", callback)


class StaticDiscovery(_Publisher):
    """A fixed list of replicas."""

    def __init__(self, addresses: Iterable[str], default_port: int | None = None) -> None:
        super().__init__()
        self._addresses = normalize_addresses(addresses, default_port)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class DnsDiscovery(_Publisher):
    """Replicas from the A/AAAA records of a (headless Service) name, re-resolved periodically."""

    def __init__(
        self,
        name: str,
        port: int,
        refresh_s: float = 5.0,
        resolver: Callable[[str, int], Any] | None = None,
    ) -> None:
        super().__init__()
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s}")
        self.name, self.port, self.refresh_s = name, port, refresh_s
        self._resolver = resolver  # async (host, port) -> getaddrinfo results; tests swap it
        self._task: asyncio.Task[None] | None = None

    async def _resolve(self) -> list[Any]:
        if self._resolver is not None:
            return list(await self._resolver(self.name, self.port))
        loop = asyncio.get_running_loop()
        return await loop.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)

    async def refresh(self) -> None:
        """Resolve once and publish; a transient DNS error keeps the last known replicas."""
        try:
            infos = await self._resolve()
        except socket.gaierror as exc:
            if exc.errno in _NO_RECORDS:
                self._publish([])  # a headless Service with no ready pods has no records
            else:
                log.warning(
                    "DNS lookup of %s failed (%s); keeping %s", self.name, exc, self._addresses
                )
            return
        self._publish(addresses_from_addrinfo(infos, self.port))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def start(self) -> None:
        if self._task is not None:
            return
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class KubernetesDiscovery(_Publisher):
    """Ready endpoints of a Service from its EndpointSlices: list, then watch, in a thread.

    The blocking ``kubernetes`` client runs in one daemon thread; results are handed to the event
    loop with ``call_soon_threadsafe``. A watch that ends is resumed from the last resourceVersion;
    410 Gone (history compacted) or any error leads to a fresh list after a jittered backoff.
    While the API server is unreachable the last known replicas stay in place.
    """

    def __init__(
        self,
        service: str,
        namespace: str,
        port: int,
        api_client: Any = None,
        *,
        port_name: str = "grpc",
        watch_timeout_s: int = 300,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        sync_timeout_s: float = 10.0,
    ) -> None:
        super().__init__()
        self.service, self.namespace = service, namespace
        self.port, self.port_name = port, port_name
        self.watch_timeout_s = watch_timeout_s
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.sync_timeout_s = sync_timeout_s
        self._api_client = api_client
        self._slices: dict[str, list[str]] = {}  # touched only by the watch thread
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None  # the open watch stream, for stop()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._synced: asyncio.Event | None = None

    async def start(self) -> None:
        if self._thread is not None:
            return
        if self._api_client is None:
            self._api_client = await asyncio.to_thread(default_api_client)
        self._loop = asyncio.get_running_loop()
        self._synced = asyncio.Event()
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"discovery-{self.service}", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wait_for(self._synced.wait(), self.sync_timeout_s)
        except asyncio.TimeoutError:
            log.warning(
                "no EndpointSlice list for %s/%s yet; retrying", self.namespace, self.service
            )

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        response = self._response
        if response is not None:
            interrupt_response(response)
        await asyncio.to_thread(thread.join, 5.0)

    # The rest runs in the watch thread.

    def _hand_over(self) -> None:
        """Publish the merged slices on the event loop."""
        merged = merge_slices(self._slices)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(self._publish_synced, merged)

    def _publish_synced(self, addresses: list[str]) -> None:
        self._publish(addresses)
        if self._synced is not None:
            self._synced.set()

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        resource_version: str | None = None
        attempt = 0
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                began = time.monotonic()
                resource_version = self._watch_from(resource_version)
                # A watch that the server (or a proxy) ends at once must not spin.
                quick = time.monotonic() - began < 1.0
                attempt = self._pause(attempt, None) if quick else 0
            except ApiException as exc:
                resource_version = None
                if exc.status == 410 and attempt == 0:  # Gone: our resourceVersion is too old
                    log.info("EndpointSlice watch for %s expired; listing again", self.service)
                    attempt = 1  # list afresh now, but back off if that expires at once too
                    continue
                attempt = self._pause(attempt, exc)
            except Exception as exc:  # network errors, bad responses: back off and list again
                resource_version = None
                attempt = self._pause(attempt, exc)

    def _pause(self, attempt: int, exc: BaseException | None) -> int:
        """Sleep a jittered backoff (woken early by stop); return the next attempt number."""
        delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s)
        if exc is not None and not self._stopping.is_set():
            log.warning(
                "EndpointSlice discovery of %s: %s; retry in %.2fs",
                self.service,
                describe_error(exc),
                delay,
            )
        self._stopping.wait(delay)
        return attempt + 1

    def _list(self) -> str:
        """List the slices, replace the state, publish; return the list's resourceVersion."""
        from kubernetes import client

        api = client.DiscoveryV1Api(self._api_client)
        result = api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=service_label_selector(self.service),
            _request_timeout=30,
        )
        body = self._api_client.sanitize_for_serialization(result)
        self._slices = {}
        for item in body.get("items") or []:
            apply_slice_event(self._slices, "ADDED", item, self.port, self.port_name)
        self._hand_over()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_from(self, resource_version: str) -> str:
        """Watch from ``resource_version`` until the server ends the watch; return the last one."""
        from kubernetes import client, watch

        api = client.DiscoveryV1Api(self._api_client)

        def call(*args: Any, **kwargs: Any):  # no return annotation, on purpose (see below)
            # Keeps the streaming response so that stop() can interrupt a blocked read. With no
            # return type to find, Watch hands over plain dicts (no model deserialization).
            self._response = response = api.list_namespaced_endpoint_slice(*args, **kwargs)
            if self._stopping.is_set():
                interrupt_response(response)
            return response

        w = watch.Watch()
        try:
            for event in w.stream(
                call,
                self.namespace,
                label_selector=service_label_selector(self.service),
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout_s,
                _request_timeout=(10, self.watch_timeout_s + 30),
            ):
                if self._stopping.is_set():
                    break
                raw = event.get("raw_object") or event.get("object") or {}
                version = (raw.get("metadata") or {}).get("resourceVersion")
                if event.get("type") != "BOOKMARK":
                    apply_slice_event(self._slices, event["type"], raw, self.port, self.port_name)
                    self._hand_over()
                resource_version = str(version or resource_version)
        finally:
            w.stop()
            self._response = None
        return resource_version


def interrupt_response(response: Any) -> None:
    """Unblock a thread reading a streaming urllib3 response (best effort, never raises)."""
    with contextlib.suppress(Exception):
        shutdown = getattr(response, "shutdown", None)  # urllib3 >= 2.3
        if callable(shutdown):
            shutdown()
            return
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


def default_api_client() -> Any:
    """An ApiClient from the in-cluster service account, else from the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def make_discovery(
    mode: str,
    *,
    static: list[str] | None,
    service: str | None,
    namespace: str | None,
    port: int,
    refresh_s: float = 5.0,
    kube_client: Any = None,
) -> Discovery:
    """Build the discovery for one tier; ``port`` is the tier's gRPC port (the default port)."""
    if mode == "static":
        if not static:
            raise ValueError("static discovery needs a non-empty list of host:port addresses")
        return StaticDiscovery(static, default_port=port)
    if mode not in MODES:
        raise ValueError(f"unknown discovery mode {mode!r}; expected one of {', '.join(MODES)}")
    if not service:
        raise ValueError(f"{mode} discovery needs the name of the tier's (headless) Service")
    if mode == "dns":
        return DnsDiscovery(dns_name(service, namespace), port, refresh_s)
    if not namespace:
        raise ValueError("kubernetes discovery needs the namespace of the Service")
    return KubernetesDiscovery(service, namespace, port, kube_client)
