"""Who may call which route of the server: deny by default.

vLLM's own API-key check guards only paths under /v1, /v2, /inference and /cohere; everything else it mounts
(SageMaker's /invocations and /adapters, /tokenize, /detokenize, /metrics, /version, /pooling, ...) answered
anyone. Here the rule is turned around: with an API key set, every request needs it except the short PUBLIC
list, and a route a future vLLM adds is closed until someone opens it here. The list is matched against the
routes the app really mounts at start-up (walked from `app.routes`), so a public path that vLLM stopped
mounting is not left open either; the walk is written to `routes.json` in the server's run folder.

Routes that load or unload adapters from a path, or select one by a header, are CLOSED even with the key: the
registry is the only source of weights (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, SageMaker's
`/adapters` and `/invocations`, whose `X-Amzn-SageMaker-Adapter-Identifier` header picks an adapter behind the
pinning of moving references).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

# Liveness probes only: they answer 200 (or 503) with an empty body and name nothing. /ping is SageMaker's name
# for /health. /metrics, /version, /v1/models and the docs pages are NOT public: metric labels name loaded
# adapters, and the version string helps nobody but an attacker.
PUBLIC_PATHS = ("/health", "/ping")
CLOSED_RE = re.compile(r"/v1/(load|unload)_lora_adapter|/adapters(/.*)?|/invocations")
CLOSED_MESSAGE = ("{path} is disabled by `pipeline serve`: adapters come only from the registry. Publish with "
                  "`pipeline registry publish` and request `NAME`, `NAME@VERSION` or `NAME@ALIAS` on /v1.")


def mounted_routes(app) -> list[dict]:
    """Every route the app mounts: [{"path", "methods", "kind"}], mounts walked recursively."""
    out: list[dict] = []

    def walk(routes, prefix: str) -> None:
        for route in routes:
            path = prefix + getattr(route, "path", "")
            sub = getattr(route, "routes", None)
            if sub is not None and route.__class__.__name__ == "Mount":
                walk(sub, path)
                if not sub:  # a mounted app (static files): one opaque route
                    out.append({"path": path, "methods": ["GET"], "kind": "mount"})
                continue
            methods = sorted(getattr(route, "methods", None) or [])
            kind = "websocket" if route.__class__.__name__ == "WebSocketRoute" else "http"
            out.append({"path": path, "methods": methods or (["GET"] if kind == "websocket" else []), "kind": kind})

    walk(getattr(app, "routes", []), "")
    return out


def is_closed(path: str) -> bool:
    return CLOSED_RE.fullmatch(path) is not None


class AccessPolicy:
    """Decides, before any byte of the body is read, whether a request may reach the app."""

    def __init__(self, api_key: str | None):
        self._key_hash = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.public: set[str] = set(PUBLIC_PATHS)  # narrowed to what is mounted by bind()
        self.bound = False

    @property
    def key_required(self) -> bool:
        return self._key_hash is not None

    def bind(self, app, run_dir: str | None = None) -> None:
        """Match the public list against the mounted routes; log and record the access of every route."""
        routes = mounted_routes(app)
        paths = {r["path"] for r in routes}
        self.public = {p for p in PUBLIC_PATHS if p in paths}
        for r in routes:
            r["access"] = ("closed" if is_closed(r["path"]) else "public" if r["path"] in self.public
                           else "key" if self.key_required else "open")
        self.bound = True
        log.info("routes: %d mounted; public without the key: %s; closed: %s", len(routes), sorted(self.public),
                 sorted({r["path"] for r in routes if r["access"] == "closed"}))
        if run_dir:
            try:
                (Path(run_dir) / "routes.json").write_text(json.dumps(routes, indent=1) + "\n")
            except OSError as exc:
                log.warning("could not record the route table in %s: %s", run_dir, exc)

    def key_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        if self._key_hash is None:
            return True
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return secrets.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._key_hash)
        return False

    def is_public(self, scope) -> bool:
        """A public probe: passed to the app untouched (no body read, no registry lookup: it answers nothing)."""
        return self._public(scope, _path(scope))

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, message) when the request must be refused; None when it may go on."""
        path = _path(scope)
        if not self.key_ok(scope.get("headers", [])) and not self._public(scope, path):
            # checked first: an anonymous caller learns nothing, not even which routes are closed
            return 401, "Unauthorized: send `Authorization: Bearer <API key>`."
        if is_closed(path):
            return 404, CLOSED_MESSAGE.format(path=path[:80])
        return None

    def _public(self, scope, path: str) -> bool:
        if path in self.public:
            return True
        # a CORS preflight is answered by vLLM's CORS middleware without reaching any route; browsers send it
        # without credentials, so it must pass
        if scope.get("method") == "OPTIONS":
            names = {k.lower() for k, _ in scope.get("headers", [])}
            return b"origin" in names and b"access-control-request-method" in names
        return False


def _path(scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", "") or "") or "/"
