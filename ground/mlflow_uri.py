"""Where MLflow runs are tracked, shared by the pipeline runner and the training stage, and how a URI is shown.

A URI may carry secrets in its user-info (`http://user:PASSWORD@host`) or its query (`?token=...`). Every
message, file and MLflow param that shows a URI shows `redact_uri(uri)` instead, and the config refuses a URI
that carries either (`secret_parts`), pointing at the variables below, which MLflow's client and our registry
client read and which never end up in a run's files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PARENT_TAG = "mlflow.parentRunId"
CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
HIDDEN = "***"
# `scheme:` of two or more characters (one letter is a Windows drive, i.e. a path); RFC 3986's scheme alphabet.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")


def _split(uri: str) -> tuple[str, str, str, str]:
    """(scheme-and-slashes, user-info incl. '@', the rest up to '?'/'#', query-and-fragment) of a URI-like
    string, by plain string rules: no parser is trusted here, because the strings to hide secrets in are
    exactly the malformed ones (no host, a misspelt scheme, an unbalanced '[')."""
    scheme = _SCHEME.match(uri)
    if scheme is None:  # a plain path: it has no user-info or query to hide
        return "", "", uri, ""
    head, rest = uri[:scheme.end()], uri[scheme.end():]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    body, tail = rest[:cut], rest[cut:]
    if not body.startswith("//"):  # no authority, so no user-info (`models:/NAME@prod` is a reference)
        return head, "", body, tail
    # The last '@' before the query ends the user-info: a password may hold '/' or ':' unescaped, and hiding a
    # little too much of a path that holds an '@' is the cheaper mistake.
    head, body = head + "//", body[2:]
    at = body.rfind("@")
    return head, body[:at + 1], body[at + 1:], tail


def secret_parts(uri: str) -> list[str]:
    """What in `uri` may hold a secret: "user-info" (`user:password@`) and/or "query" (`?...` or `#...`)."""
    _, userinfo, _, tail = _split(str(uri))
    return [part for part, present in (("user-info", userinfo), ("query", tail)) if present]


# A URI inside free text: a scheme, '://', then anything up to whitespace or a quote that closes it.
_URI_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]+://[^\s`'"<>]+""")


def redact_text(text: str) -> str:
    """`text` with every URI in it shown as `redact_uri` shows it: the last line for messages that embed text
    from elsewhere (an exception of a library, a value the user typed in the wrong place)."""
    return _URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), str(text))


def redact_uri(uri) -> str:
    """`uri` as it may be shown: user-info and query (and fragment) replaced by `***`, the rest kept."""
    if uri is None:
        return "None"
    head, userinfo, body, tail = _split(str(uri))
    return (f"{head}{HIDDEN + '@' if userinfo else ''}{body}"
            f"{tail[0] + HIDDEN if tail else ''}")


def param_text(value) -> str:
    """A value as MLflow stores a param or tag: URI-like text redacted (a second line behind the loader, which
    refuses credentials in the URIs it knows), cut to MLflow's 500 characters."""
    text = redact_uri(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def tracking_uri(configured: str | None = None) -> str:
    """Where runs are tracked: the config's `trainer.mlflow_tracking_uri`, else $MLFLOW_TRACKING_URI, else a
    local sqlite store `./mlruns/mlflow.db` that needs no server."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside its database."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def get_experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id
