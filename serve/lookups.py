"""Registry lookups for requests, off the event loop, with a deadline, and stale answers while the registry is down.

The catalog (serve/catalog.py) is blocking code: with an MLflow registry a lookup is HTTP with a 60 s read
timeout, retried. Called on the server's event loop, one hung lookup froze every request, `/health` included
(97 s with the MLflow server stopped). Here every lookup runs in a small thread pool and the request waits for it
at most `timeout_s` (a few seconds, far below a client's timeout); then it gets 503 naming the registry, while
the hung thread finishes on its own. Concurrent requests for the same reference share one lookup, so a hung
registry holds at most one thread per distinct reference.

Stale-while-error: what this server already resolved keeps being served while the registry cannot answer. A
pinned `NAME@V` it resolved before (its files are verified and read-only in the run folder, see serve/verified.py)
and the last answer for `NAME` / `NAME@alias` are used, with their age in the log. After a failure, requests that
have such an answer do not wait on the registry at all for `timeout_s`; a lookup in the background (shared like
any other) brings the registry back into use as soon as it answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ground.errors import RegistryError
from registry.mlflow_http import ServerUnavailableError
from serve.catalog import RegistryUnavailableError, Resolved

log = logging.getLogger(__name__)

LOOKUP_THREADS = 8
MODELS_KEY = " models"  # the /v1/models listing's key among the in-flight lookups (no reference has a space)
ROUTE_KEY = " route "  # + NAME: a route lookup's key among the in-flight lookups


class RequestLookups:
    """`await pin(model)` and `await servable()` for the middleware; never blocks the event loop."""

    def __init__(self, catalog, timeout_s: float, clock=time.monotonic):
        self.catalog = catalog
        self.timeout_s = timeout_s
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="registry-lookup")
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._failed_at: float | None = None  # when the registry last failed to answer; None once it answers again
        self._listing: tuple[float, list[dict]] | None = None  # (when, cards) of the last /v1/models listing

    # ------------------------------------------------------------------------------------------ requests
    async def pin(self, model: str) -> Resolved:
        """The version `model` means now (see AdapterCatalog.resolve_for_request); RegistryError as the catalog
        raises it, RegistryUnavailableError (503) when the registry does not answer and nothing is known."""
        known = self.catalog.last_known(model)
        if known is not None and self._registry_down():
            self._start(model, self.catalog.resolve_for_request, model)  # in the background: notices the recovery
            return self._stale(model, known, "the registry failed to answer recently")
        try:
            return await self._wait(model, self.catalog.resolve_for_request, model)
        except RegistryUnavailableError as exc:
            if known is None:
                raise
            return self._stale(model, known, str(exc))

    async def route(self, name: str):
        """The traffic route of adapter `name` (registry.routes.Route or None, see AdapterCatalog.route), looked up
        like `pin`: shared, off the event loop, with a deadline, and the last answer while the registry is down."""
        known = self.catalog.last_known_route(name)
        if known is not None and self._registry_down():
            self._start(ROUTE_KEY + name, self.catalog.route, name)
            return self._stale_route(name, known, "the registry failed to answer recently")
        try:
            return await self._wait(ROUTE_KEY + name, self.catalog.route, name)
        except RegistryUnavailableError as exc:
            if known is None:
                raise
            return self._stale_route(name, known, str(exc))

    async def servable(self) -> list[dict]:
        """Cards for /v1/models; the last listing while the registry does not answer."""
        try:
            cards = await self._wait(MODELS_KEY, self.catalog.servable)
        except RegistryUnavailableError as exc:
            if self._listing is None:
                raise
            when, cards = self._listing
            log.warning("registry unavailable (%s); listing /v1/models as it was %.0f s ago", exc, self.clock() - when)
            return cards
        self._listing = (self.clock(), cards)
        return cards

    # ------------------------------------------------------------------------------------------ machinery
    def _registry_down(self) -> bool:
        failed_at = self._failed_at
        return failed_at is not None and self.clock() - failed_at < self.timeout_s

    def _stale(self, model: str, known: tuple[Resolved, float], why: str) -> Resolved:
        resolved, age_s = known
        log.warning("serving %s as %s from %.0f s ago: %s", model, resolved.ref, age_s, why[:300])
        return resolved

    def _stale_route(self, name: str, known: tuple, why: str):
        route, age_s = known
        log.warning("following the route of %s as it was %.0f s ago (%s): %s", name, age_s,
                    "none" if route is None else f"revision {route.revision}", why[:300])
        return route

    def _start(self, key: str, fn, *args) -> Future:
        """One lookup per key at a time: a request for a key already being looked up joins that lookup."""
        with self._lock:
            future = self._inflight.get(key)
            new = future is None
            if new:
                future = self._pool.submit(self._run, fn, *args)
                self._inflight[key] = future
        if new:  # outside the lock: a lookup that is already done runs the callback here and now
            future.add_done_callback(lambda done: self._forget(key, done))
        return future

    def _forget(self, key: str, future: Future) -> None:
        with self._lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def _run(self, fn, *args):
        try:
            result = fn(*args)
        except RegistryUnavailableError:
            self._failed_at = self.clock()
            raise
        except ServerUnavailableError as exc:  # from the listing, which the catalog does not map
            self._failed_at = self.clock()
            raise RegistryUnavailableError(str(exc)) from None
        except RegistryError:
            self._failed_at = None  # an answer (404, 422) all the same
            raise
        self._failed_at = None
        return result

    async def _wait(self, key: str, fn, *args):
        waited = asyncio.wrap_future(self._start(key, fn, *args))
        waited.add_done_callback(_retrieve)  # answered after its request gave up: no "never retrieved" noise
        try:  # shield: a request that gives up must not cancel the lookup other requests share
            return await asyncio.wait_for(asyncio.shield(waited), self.timeout_s)
        except asyncio.TimeoutError:
            self._failed_at = self.clock()
            raise RegistryUnavailableError(
                f"The adapter registry {self.catalog.registry_uri} did not answer within {self.timeout_s:g} s "
                "(`pipeline serve --lookup-timeout`); retry later. Adapters this server already resolved are "
                "still served.") from None


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()
