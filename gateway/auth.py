"""Optional API keys for the gateway's public APIs, with per-key limits. Used by both the gRPC
and the OpenAI HTTP API, so a key means the same on both.

Keys come from a file (e.g. a Kubernetes Secret mounted as a volume), one per line::

    # comments and blank lines are ignored
    sk-0123456789abcdef                      # a bare key, named key-<first 8 hex of its sha256>
    alice:sk-fedcba9876543210                # name:key (names show up in logs and errors)
    batch:sk-... max_concurrent=2 tokens_per_minute=20000   # this key's own limits

Keys may not contain whitespace or start with "#" (which starts a comment), and a key that
contains ':' needs a name in front. The file is re-read whenever it changes on disk (Kubernetes updates a mounted Secret in place), so removing
a line revokes that key within one request. A file that cannot be read or parsed leaves the
last good set in force (and logs an error); an empty file admits nobody.

Keys are compared in constant time: the SHA-256 of the presented key is compared with
`hmac.compare_digest` against every stored digest, with no early exit. Neither keys nor their
digests are ever logged; errors name the key's name at most.

Limits per key (0 = none): concurrent requests, and tokens per minute (prompt + completion
tokens, over a sliding 60 s window). A request over a limit is refused before it starts with
RESOURCE_EXHAUSTED / HTTP 429 and a retry hint. Tokens are charged as they are generated, so
a request admitted just under the limit may take the key past it; the next one then waits.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from specsplit.serving.completion_loop import Delta
from specsplit.serving.errors import RateLimited, Unauthenticated

log = logging.getLogger(__name__)

T = TypeVar("T")
WINDOW_S = 60  # tokens per *minute*
_OPTIONS = {"max_concurrent", "tokens_per_minute"}


@dataclass(frozen=True)
class KeyLimits:
    max_concurrent: int = 0  # requests running at once; 0 = unlimited
    tokens_per_minute: int = 0  # prompt + completion tokens per 60 s; 0 = unlimited


@dataclass(frozen=True)
class ApiKey:
    """One accepted key; `digest` is SHA-256 of the key (the key itself is not kept)."""

    name: str
    digest: bytes = field(repr=False)
    limits: KeyLimits


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, defaults: KeyLimits) -> list[ApiKey]:
    """Parse a key file; ValueError names the line, never the key."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        cut = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))  # '#' after a space
        if cut == 0:
            continue
        first, *opts = words[:cut]
        name, sep, key = first.partition(":")
        if not sep:
            name, key = "", first
        if not key:
            raise ValueError(f"API key file line {n}: empty key")
        name = name or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        if name in names:
            raise ValueError(f"API key file line {n}: duplicate name {name!r}")
        names.add(name)
        limits = {"max_concurrent": defaults.max_concurrent, "tokens_per_minute": defaults.tokens_per_minute}
        for opt in opts:
            k, eq, v = opt.partition("=")
            if k not in _OPTIONS or not eq or not v.isdigit():
                raise ValueError(f"API key file line {n} ({name}): expected max_concurrent=N or "
                                 f"tokens_per_minute=N, got {opt!r}")
            limits[k] = int(v)
        keys.append(ApiKey(name, _digest(key), KeyLimits(**limits)))
    return keys


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorization_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The `authorization` entry of gRPC invocation metadata (keys are lower case on the wire)."""
    for k, v in metadata or ():
        if k.lower() == "authorization":
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


class _Usage:
    """One key's running requests and its tokens per second over the last minute."""

    def __init__(self) -> None:
        self.running = 0
        self.buckets: deque[list[int]] = deque()  # [second, tokens], oldest first

    def used(self, now_s: int) -> int:
        while self.buckets and self.buckets[0][0] <= now_s - WINDOW_S:
            self.buckets.popleft()
        return sum(t for _, t in self.buckets)

    def charge(self, now_s: int, tokens: int) -> None:
        if self.buckets and self.buckets[-1][0] == now_s:
            self.buckets[-1][1] += tokens
        else:
            self.buckets.append([now_s, tokens])

    def seconds_until_below(self, limit: int, now: float) -> float:
        """When enough of the window has expired for the usage to drop below `limit`."""
        used = sum(t for _, t in self.buckets)
        for sec, tokens in self.buckets:
            used -= tokens
            if used < limit:
                return sec + WINDOW_S - now
        return WINDOW_S


class Lease:
    """One admitted request of one key: counts as running until released; charges tokens."""

    def __init__(self, keys: ApiKeys, key: ApiKey) -> None:
        self._keys, self.key, self._released = keys, key, False

    def charge(self, tokens: int) -> None:
        if tokens > 0:
            self._keys._usage_of(self.key.name).charge(int(self._keys._clock()), tokens)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._keys._usage_of(self.key.name).running -= 1


class ApiKeys:
    """The key set from `path` (re-read when it changes) and every key's usage."""

    def __init__(self, path: str, defaults: KeyLimits = KeyLimits(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.defaults = defaults
        self._clock = clock
        self._keys: list[ApiKey] = []
        self._stamp: tuple[int, ...] | None = None
        self._usage: dict[str, _Usage] = {}
        if not self._reload(startup=True):
            raise ValueError(f"cannot load the API key file {path!r}")

    @property
    def names(self) -> list[str]:
        self._maybe_reload()
        return [k.name for k in self._keys]

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stamp is not None:
                log.error("API key file %s is gone (%s): keeping the %d keys loaded before",
                          self.path, e.strerror, len(self._keys))
                self._stamp = None
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) != self._stamp:
            self._reload()

    def _reload(self, startup: bool = False) -> bool:
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            keys = parse_keys(text, self.defaults)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if startup:
                raise ValueError(f"API key file {self.path!r}: {msg}") from None
            log.error("API key file %s not reloaded (%s): keeping the %d keys loaded before",
                      self.path, msg, len(self._keys))
            return False
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        before = {k.name for k in self._keys}
        self._keys = keys
        now = {k.name for k in keys}
        if startup:
            log.info("API keys required: %d key(s) from %s", len(keys), self.path)
        else:
            log.info("API key file %s reloaded: %d key(s); added %s, removed %s", self.path, len(keys),
                     sorted(now - before) or "none", sorted(before - now) or "none")
        if not keys:
            log.warning("API key file %s has no keys: every request will be refused", self.path)
        return True

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an `Authorization` value carries, or Unauthenticated (which never echoes it)."""
        self._maybe_reload()
        token = bearer(authorization)
        if token is None:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <key>'")
        digest = _digest(token)
        found = None
        for k in self._keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, k.digest):
                found = k
        if found is None:
            raise Unauthenticated("invalid API key")
        return found

    def _usage_of(self, name: str) -> _Usage:
        u = self._usage.get(name)
        if u is None:
            u = self._usage[name] = _Usage()
        return u

    def admit(self, key: ApiKey) -> Lease:
        """Count one more request of `key`, or RateLimited with the seconds to wait."""
        u = self._usage_of(key.name)
        lim = key.limits
        if lim.max_concurrent and u.running >= lim.max_concurrent:
            raise RateLimited(f"API key {key.name!r} has {u.running} requests running, its limit; "
                              "retry after one finishes", 1.0)
        if lim.tokens_per_minute:
            now = self._clock()
            used = u.used(int(now))
            if used >= lim.tokens_per_minute:
                wait = max(1.0, u.seconds_until_below(lim.tokens_per_minute, now))
                raise RateLimited(f"API key {key.name!r} used {used} of its {lim.tokens_per_minute} tokens per "
                                  f"minute; retry after {math.ceil(wait)} s", wait)
        u.running += 1
        return Lease(self, key)

    async def metered(self, key: ApiKey, prompt_tokens: int, events: AsyncGenerator[T, None]) -> AsyncIterator[T]:
        """`events` (a completion stream) admitted under `key`'s limits and charged to it.

        Admission happens at the first `__anext__`, which both APIs await before answering, so a
        refusal is a proper 429 / RESOURCE_EXHAUSTED; the lease is released however it ends.
        """
        lease = self.admit(key)
        try:
            lease.charge(prompt_tokens)
            async for ev in events:
                if isinstance(ev, Delta):
                    lease.charge(len(ev.token_ids))
                yield ev
        finally:
            lease.release()
            await events.aclose()  # cancels the completions at once when the client went away
