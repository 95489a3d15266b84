"""Reading a request's headers from its ASGI scope (shared by the middleware and the capture)."""

from __future__ import annotations


def header(scope, name: bytes) -> str | None:
    """The first value of header `name` (lower-case bytes, as ASGI names them), stripped; None when absent.
    ASGI hands header values over as bytes, decoded here as latin-1 (HTTP's own header encoding)."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None
