"""A small client for the REST API of an MLflow tracking server: the registry's transport to `mlflow+http(s)://`.

Why not `mlflow.MlflowClient`: the registry needs control that client does not give. Its HTTP layer retries a
POST after a lost response (which can create a model version twice), backs off for minutes before saying a
server is down, costs about a second to import in every publisher and CLI call, and puts the server's stack
of exceptions in front of the user. Here every call has a short timeout; only reads are retried; and every
failure becomes one `RegistryError` that names the server, what was being done and what to do about it.

Credentials come from the same variables MLflow's own client reads: MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (HTTP basic auth, e.g. MLflow's `basic-auth` app) or MLFLOW_TRACKING_TOKEN (a bearer
token); TLS follows MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH and
MLFLOW_TRACKING_CLIENT_CERT_PATH. A credential never appears in a message or a log line: errors name the
variables, never their values.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

from ground.errors import NotFoundError, RegistryError

log = logging.getLogger(__name__)

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
TRANSFER_TIMEOUT_S = 600.0
READ_RETRIES = 3  # reads only: a retried write could be applied twice
CHUNK = 1 << 20


class ServerUnavailableError(RegistryError):
    """The server did not answer, or answered with a 5xx: nothing was changed that the caller can see."""


class AuthError(RegistryError):
    """The server refused the credentials (401) or the permission (403)."""


class ApiError(RegistryError):
    """The server answered a 4xx with an MLflow error code (e.g. RESOURCE_ALREADY_EXISTS)."""

    def __init__(self, message: str, code: str, status: int):
        super().__init__(message)
        self.code = code
        self.status = status


def _credentials() -> tuple[tuple[str, str] | None, str | None]:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return ((user, password) if user and password else None), token or None


class MlflowServer:
    """One MLflow tracking server (`base_url` is http(s)://HOST:PORT[/PATH]); thread-safe per thread-local use."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self._session = None
        self._pid = None

    def __repr__(self) -> str:
        return f"MlflowServer({self.base_url!r})"

    # ------------------------------------------------------------------------------------------- session
    @property
    def session(self):
        """A keep-alive session (one per process: a forked child must not share the parent's sockets)."""
        if self._session is None or self._pid != os.getpid():
            import requests

            s = requests.Session()
            basic, token = _credentials()
            if basic:
                s.auth = basic
            elif token:
                s.headers["Authorization"] = f"Bearer {token}"
            if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
                s.verify = False
            elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
                s.verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
            if os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
                s.cert = os.environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"]
            self._session, self._pid = s, os.getpid()
        return self._session

    # ------------------------------------------------------------------------------------------- errors
    def _auth_error(self, status: int, what: str) -> AuthError:
        basic, token = _credentials()
        if status == 401:
            if basic or token:
                used = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" if basic else "MLFLOW_TRACKING_TOKEN"
                return AuthError(f"MLflow server {self.base_url} rejected the credentials from {used} while {what} "
                                 "(401 Unauthorized). Check those variables.")
            return AuthError(f"MLflow server {self.base_url} requires credentials ({what}: 401 Unauthorized). Set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) and "
                             "run the command again.")
        who = "the user in MLFLOW_TRACKING_USERNAME" if basic else "this token" if token else "anonymous users"
        return AuthError(f"MLflow server {self.base_url} does not allow {who} {what} (403 Forbidden). Ask the "
                         "server's admin for EDIT permission on the registered model (and its experiment), or set "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD to a user that has it.")

    def _check(self, resp, what: str):
        if resp.status_code < 300:
            return resp
        if resp.status_code in (401, 403):
            raise self._auth_error(resp.status_code, what)
        try:
            body = resp.json()
            code, message = body.get("error_code", ""), body.get("message", "")
        except ValueError:
            code, message = "", resp.text[:300]
        if resp.status_code >= 500:
            raise ServerUnavailableError(f"MLflow server {self.base_url} failed while {what} (HTTP {resp.status_code}"
                                         f"{': ' + message[:300] if message else ''}). Nothing half-done is visible; "
                                         "retry, and check the server's log if it persists.")
        if code == "RESOURCE_DOES_NOT_EXIST" or resp.status_code == 404:
            raise NotFoundError(f"MLflow server {self.base_url}: {message or 'not found'} (while {what}).")
        raise ApiError(f"MLflow server {self.base_url} refused {what}: {code or resp.status_code}: {message}", code,
                       resp.status_code)

    def _send(self, method: str, url: str, what: str, retries: int, timeout: float, **kwargs):
        import requests

        for attempt in range(retries + 1):
            try:
                resp = self.session.request(method, url, timeout=(CONNECT_TIMEOUT_S, timeout), **kwargs)
            except requests.exceptions.SSLError as exc:
                raise RegistryError(f"TLS to MLflow server {self.base_url} failed while {what} "
                                    f"({exc.__class__.__name__}). Set MLFLOW_TRACKING_SERVER_CERT_PATH to the "
                                    "server's CA bundle (or MLFLOW_TRACKING_INSECURE_TLS=true to skip checking).") from None
            except requests.exceptions.RequestException as exc:
                if attempt < retries:
                    time.sleep(0.2 * 2 ** attempt)
                    continue
                raise ServerUnavailableError(
                    f"MLflow server {self.base_url} is unreachable while {what} ({exc.__class__.__name__}). Check "
                    "that `mlflow server` runs there and this machine reaches it (--registry mlflow+http://HOST:PORT)."
                ) from None
            if resp.status_code >= 500 and attempt < retries:
                time.sleep(0.2 * 2 ** attempt)
                continue
            return self._check(resp, what)

    # ------------------------------------------------------------------------------------------- JSON API
    def get(self, endpoint: str, what: str, **params) -> dict:
        return self._send("GET", f"{self.base_url}{API}/{endpoint}", what, READ_RETRIES, READ_TIMEOUT_S,
                          params=params).json()

    def post(self, endpoint: str, what: str, body: dict, method: str = "POST", idempotent: bool = False) -> dict:
        """A write: sent once unless `idempotent` (applying it twice is harmless), because a retried write could
        be applied twice; callers that can check what happened retry themselves."""
        resp = self._send(method, f"{self.base_url}{API}/{endpoint}", what, READ_RETRIES if idempotent else 0,
                          READ_TIMEOUT_S, json=body)
        return resp.json() if resp.content else {}

    def delete(self, endpoint: str, what: str, body: dict) -> dict:
        return self.post(endpoint, what, body, method="DELETE", idempotent=True)

    def search(self, endpoint: str, key: str, what: str, **params) -> list[dict]:
        """Every page of a search endpoint (`key` names the list in each page)."""
        out, token = [], None
        while True:
            page = self.get(endpoint, what, **params, **({"page_token": token} if token else {}))
            out += page.get(key, [])
            token = page.get("next_page_token")
            if not token:
                return out

    # ------------------------------------------------------------------------------------------- artifacts
    def _artifact_url(self, path: str) -> str:
        return f"{self.base_url}{ARTIFACTS}/{quote(path)}"

    def upload(self, src: Path, path: str) -> None:
        with open(src, "rb") as f:
            for attempt in range(READ_RETRIES + 1):  # a PUT replaces the file: safe to repeat
                try:
                    f.seek(0)
                    self._send("PUT", self._artifact_url(path), f"uploading {src.name}", 0, TRANSFER_TIMEOUT_S, data=f)
                    return
                except ServerUnavailableError:
                    if attempt == READ_RETRIES:
                        raise
                    time.sleep(0.2 * 2 ** attempt)

    def download(self, path: str, dst: Path) -> str:
        """Stream one artifact to `dst`; returns the sha256 of what was written."""
        h = hashlib.sha256()
        resp = self._send("GET", self._artifact_url(path), f"downloading {path}", READ_RETRIES, TRANSFER_TIMEOUT_S,
                          stream=True)
        import requests

        try:
            with resp, open(dst, "wb") as f:
                for chunk in resp.iter_content(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
        except requests.exceptions.RequestException as exc:  # the server went away in the middle of the body
            Path(dst).unlink(missing_ok=True)
            raise ServerUnavailableError(
                f"MLflow server {self.base_url} stopped answering while downloading {path} "
                f"({exc.__class__.__name__}). Nothing partial was kept; retry when the server is back.") from None
        return h.hexdigest()

    def list_artifacts(self, path: str) -> list[dict]:
        resp = self._send("GET", f"{self.base_url}{ARTIFACTS}", f"listing {path}", READ_RETRIES, READ_TIMEOUT_S,
                          params={"path": path})
        return resp.json().get("files", [])

    def delete_artifacts(self, path: str) -> None:
        self._send("DELETE", self._artifact_url(path), f"deleting artifacts {path}", 0, READ_TIMEOUT_S)
