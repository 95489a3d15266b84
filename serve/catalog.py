"""The server's view of the registry: which adapter version a request's `model` means, and may it be served.

Shared by the vLLM resolver plugin and the ASGI middleware inside the server process (`get_catalog()` returns
one instance per process, configured from the environment that `serve.server.start_server` sets).

Why a short-lived cache: a pinned reference (`NAME@7`) names an immutable version, so its answer never changes;
`NAME` (latest) and `NAME@prod` move, so their answers are reused for at most `ttl_s` seconds. That bounds how
long an alias move takes to reach requests, while a burst of requests costs one registry lookup per second.
The last answer for a moving reference is kept after it expires: while the registry cannot answer, requests
are served with it (serve/lookups.py, which also runs every lookup off the server's event loop with a deadline).

Registry errors keep their meaning whatever the store: a version whose stored files or manifest were changed
after publishing is a CorruptVersionError (422) also when an MLflow server holds it, a server that does not
answer is a RegistryUnavailableError (503), and a version number past what any registry numbers is a 404.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ground.errors import NotFoundError, RegistryError

log = logging.getLogger(__name__)

PINNED_CACHE_SIZE = 4096
# MLflow numbers versions in a 32-bit integer column (MySQL, PostgreSQL): past it the server answers HTTP 500.
# No store numbers that far (versions count up from 1), so such a reference is simply one that does not exist.
LARGEST_VERSION = 2**31 - 1
LONGEST_REF = 256  # NAME (128) @ ALIAS (64), with room to spare: longer ones are refused before parsing


class RegistryUnavailableError(RegistryError):
    """The registry did not answer (stopped, unreachable, failing, or slower than the lookup deadline)."""


class BaseMismatchError(RegistryError):
    """The adapter was trained on another base model than the one this server serves."""


class RankTooLargeError(RegistryError):
    """The adapter's rank exceeds the server's max_lora_rank (fixed when the server started)."""


@dataclass(frozen=True)
class Resolved:
    """One servable adapter version: `ref` is the canonical `NAME@V` that vLLM sees as the LoRA name."""

    ref: str
    name: str
    version: int
    path: str
    base_fingerprint: str | None
    rank: int = 0


class AdapterCatalog:
    def __init__(self, registry, base_fingerprint: str | None, base_name: str, ttl_s: float = 1.0,
                 max_lora_rank: int | None = None, clock=time.monotonic, verified=None):
        self.registry = registry
        self.verified = verified  # serve.verified.VerifiedCache, or None (paths straight from the registry)
        self.clock = clock
        self.max_lora_rank = max_lora_rank
        self.base_fingerprint = base_fingerprint
        self.base_name = base_name
        self.ttl_s = ttl_s
        # NAME / NAME@alias -> (when it was looked up, answer); kept after ttl_s to serve while the registry is down
        self._moving: dict[str, tuple[float, Resolved]] = {}
        self._pinned: OrderedDict[str, Resolved] = OrderedDict()  # NAME@V -> answer (immutable)
        # NAME -> (when it was looked up, its traffic route or None): moves like an alias, kept the same way
        self._routes: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ resolution
    @property
    def registry_uri(self) -> str:
        return self.registry.uri

    def lookup(self, ref: str) -> Resolved:
        """`NAME`, `NAME@7`, `NAME@prod` -> the version it means now. Raises RegistryError (invalid name),
        NotFoundError (lists what exists), BaseMismatchError (names both fingerprints), CorruptVersionError or
        RegistryUnavailableError."""
        from registry import parse_ref

        if isinstance(ref, str) and len(ref) > LONGEST_REF:  # also keeps a 5,000-digit version from int()
            raise RegistryError(f"Invalid adapter reference {ref[:80]!r}... ({len(ref)} characters): names have at "
                                "most 128 characters, aliases 64; write NAME, NAME@VERSION or NAME@ALIAS.")
        name, version, alias = parse_ref(ref)  # validates: a name never reaches the filesystem unchecked
        pinned = version is not None
        key = f"{name}@{version}" if pinned else ref
        now = self.clock()
        with self._lock:
            if pinned and key in self._pinned:
                self._pinned.move_to_end(key)
                return self._pinned[key]
            if not pinned and key in self._moving and now - self._moving[key][0] < self.ttl_s:
                return self._moving[key][1]
        if pinned and version > LARGEST_VERSION:
            raise self._past_range(name, version)
        try:
            found = self.registry.resolve(ref)
            path = str(found.path)  # a remote registry downloads the version here and checks it against its manifest
        except RegistryError as exc:
            raise _serving_error(exc, f"{name}@{version}" if pinned else ref) from None
        resolved = Resolved(ref=f"{found.name}@{found.version}", name=found.name, version=int(found.version),
                            path=path, base_fingerprint=found.base_fingerprint, rank=found.rank)
        self.check_servable(resolved)
        with self._lock:
            if not pinned:
                self._moving[key] = (now, resolved)
            self._pinned[resolved.ref] = resolved
            while len(self._pinned) > PINNED_CACHE_SIZE:
                self._pinned.popitem(last=False)
        return resolved

    def resolve_for_request(self, ref: str) -> Resolved:
        """What a request for `ref` gets: `lookup`, then the per-request check of the version (see check_current)."""
        resolved = self.lookup(ref)
        try:
            self.check_current(resolved)
        except RegistryError as exc:
            raise _serving_error(exc, resolved.ref) from None
        return resolved

    def route(self, name: str):
        """The traffic route of adapter `name` (registry.routes.Route), or None when it has none; looked up at most
        `ttl_s` ago, like an alias, so a route change reaches requests within about `ttl_s`. A name the registry
        does not have has no route: the request's own lookup then answers the 404 that lists what exists."""
        now = self.clock()
        with self._lock:
            if name in self._routes and now - self._routes[name][0] < self.ttl_s:
                return self._routes[name][1]
        try:
            route = self.registry.get_route(name)
        except NotFoundError:
            route = None
        except RegistryError as exc:  # a store that failed or a route it cannot read: the last route still serves
            raise RegistryUnavailableError(f"Cannot read the traffic route of `{name}`: {exc}") from None
        with self._lock:
            self._routes[name] = (now, route)
        return route

    def last_known_route(self, name: str) -> tuple[object, float] | None:
        """(the last route answer for `name`, None included, and its age in seconds); None when never looked up."""
        with self._lock:
            if name in self._routes:
                looked_up, route = self._routes[name]
                return route, self.clock() - looked_up
        return None

    def last_known(self, ref: str) -> tuple[Resolved, float] | None:
        """(the last answer for `ref`, its age in seconds), however old; None when this server never resolved it.
        Served while the registry does not answer: a pinned version never changes, and its files were verified."""
        from registry import parse_ref

        try:
            name, version, _ = parse_ref(ref)
        except (RegistryError, ValueError):
            return None
        with self._lock:
            if version is not None:
                found = self._pinned.get(f"{name}@{version}")
                return (found, 0.0) if found is not None else None
            if ref in self._moving:
                looked_up, found = self._moving[ref]
                return found, self.clock() - looked_up
        return None

    def _past_range(self, name: str, version: int) -> NotFoundError:
        """The local store's 404 for a version that does not exist, without asking MLflow for it (HTTP 500)."""
        from registry.refs import format_versions

        try:
            versions = self.registry.store.version_numbers(name)
            if not versions:
                self.registry.resolve(name)  # raises NotFoundError naming the adapters that exist
        except RegistryError as exc:
            raise _serving_error(exc, name) from None
        return NotFoundError(f"`{name}@{version}` does not exist; versions of `{name}`: {format_versions(versions)} "
                             f"(no registry numbers versions past {LARGEST_VERSION}).")

    def check_servable(self, resolved: Resolved) -> None:
        if self.max_lora_rank and resolved.rank > self.max_lora_rank:
            raise RankTooLargeError(
                f"Adapter {resolved.ref} has LoRA rank {resolved.rank}, above this server's max_lora_rank "
                f"{self.max_lora_rank} (fixed at start from the registry's largest rank). Restart `pipeline serve` "
                "to pick up the new maximum, or pass --max-lora-rank."
            )
        if self.base_fingerprint and resolved.base_fingerprint and resolved.base_fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"Adapter {resolved.ref} was trained on base model {resolved.base_fingerprint[:16]}..., but this "
                f"server serves `{self.base_name}` (base {self.base_fingerprint[:16]}...). Serve it with its own "
                "base model (pipeline serve --base ...), or publish an adapter trained on this base."
            )

    # ------------------------------------------------------------------------------------ verified weights
    def engine_path(self, resolved: Resolved) -> str:
        """Where the engine loads `resolved` from: its verified read-only copy (see serve/verified.py)."""
        return self.verified.path_for(resolved.ref, resolved.path) if self.verified else resolved.path

    def check_current(self, resolved: Resolved) -> None:
        """Per request: refuse a version deleted (NotFoundError) or changed (CorruptVersionError) since it loaded."""
        if self.verified is not None:
            self.verified.check_current(resolved.ref, self.registry.store.version_dir(resolved.name, resolved.version))

    def is_base(self, model: str) -> bool:
        return model == self.base_name

    # ------------------------------------------------------------------------------------ listing
    def servable(self) -> list[dict]:
        """Model cards for every reference this server can serve: each version `NAME@V`, plus `NAME` (latest)
        and `NAME@ALIAS` when the version they point at is servable (trained on this base, rank that fits)."""
        cards = []
        for name in self.registry.list_adapters():
            try:
                versions = self.registry.list_versions(name)
            except NotFoundError:  # deleted since list_adapters
                continue
            fitting = {av.version: av for av in versions if self._fits(av)}
            refs = [(f"{name}@{v}", v) for v in sorted(fitting)]
            if versions and max(av.version for av in versions) in fitting:
                refs.append((name, max(fitting)))
            refs += [(f"{name}@{alias}", v) for alias, v in sorted(self.registry.aliases(name).items()) if v in fitting]
            for ref, v in refs:
                created = fitting[v].metadata.get("created_unix") or 0
                cards.append({"id": ref, "object": "model", "created": int(created), "owned_by": "lora-pipeline",
                              "root": f"{name}@{v}", "parent": self.base_name})
        return cards

    def _fits(self, version) -> bool:
        fp = version.base_fingerprint
        if self.base_fingerprint and fp and fp != self.base_fingerprint:
            return False
        return not (self.max_lora_rank and version.rank > self.max_lora_rank)


def _serving_error(exc: RegistryError, ref: str) -> RegistryError:
    """A registry error as the server answers it, the same for every store: 404 stays, a server that failed is
    503, and a version whose stored files or manifest no longer match what was published is 422 (a remote store
    raises plain RegistryErrors for these; the local store's are checked in serve/verified.py)."""
    from registry.integrity import NotARegularFileError
    from registry.mlflow_http import ServerUnavailableError
    from serve.verified import CorruptVersionError

    if isinstance(exc, ServerUnavailableError):
        return RegistryUnavailableError(str(exc))
    if type(exc) is RegistryError or isinstance(exc, NotARegularFileError):
        message = str(exc)
        if "verify" not in message:
            message += f" Check it with `pipeline registry verify {ref}`."
        return CorruptVersionError(message)
    return exc  # NotFoundError, the catalog's and serve.verified's own, AuthError / ApiError as they were


_catalog: AdapterCatalog | None = None
_catalog_lock = threading.Lock()


def get_catalog() -> AdapterCatalog | None:
    """The process's catalog, built from PIPELINE_SERVE_* variables; None when not inside `pipeline serve`."""
    global _catalog
    from serve.server import (ENV_ALIAS_TTL, ENV_BASE_DIR, ENV_BASE_FINGERPRINT, ENV_BASE_NAME, ENV_MAX_LORA_RANK,
                              ENV_REGISTRY, ENV_RUN_DIR, ENV_VERIFY)

    if not os.environ.get(ENV_REGISTRY):
        return None
    with _catalog_lock:
        if _catalog is None:
            _log_to_server_output()
            from registry import open_registry
            from serve.verified import VerifiedCache

            run_dir = os.environ.get(ENV_RUN_DIR)
            verified = VerifiedCache(os.path.join(run_dir, "verified"), base_dir=os.environ.get(ENV_BASE_DIR) or None,
                                     enabled=os.environ.get(ENV_VERIFY, "1") != "0") if run_dir else None
            _catalog = AdapterCatalog(
                open_registry(os.environ[ENV_REGISTRY]),
                base_fingerprint=os.environ.get(ENV_BASE_FINGERPRINT) or None,
                base_name=os.environ.get(ENV_BASE_NAME, ""),
                ttl_s=float(os.environ.get(ENV_ALIAS_TTL, "1.0")),
                max_lora_rank=int(os.environ.get(ENV_MAX_LORA_RANK) or 0) or None,
                verified=verified,
            )
            log.info("lora-pipeline catalog: registry %s, base %s", os.environ[ENV_REGISTRY], _catalog.base_name)
        return _catalog


def _log_to_server_output() -> None:
    """Inside the server process nobody configures our loggers (vLLM sets up only `vllm.*`): send serve.* INFO
    lines (verification times, the route table, resolutions) to the server's output, i.e. its log file."""
    import sys

    logger = logging.getLogger("serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("(pipeline serve) %(levelname)s %(asctime)s [%(name)s] %(message)s",
                                               "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
