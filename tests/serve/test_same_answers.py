"""One table of requests against the single server and `--replicas 2`: the same status and message for each.

The replicated ingress wraps the single server's own middleware, so every refusal below is made by the same
code in both modes; before that was true for every row, the ingress answered a JSON body that is not an object
with 500 (single: 400), and with `Content-Type: text/plain` (or a form type) the middleware skipped its JSON,
depth and pinning checks while the ingress parsed the body anyway (100k-deep JSON: 500; `alpha@prod`: 404 "does
not exist"; the single server: 400, vLLM refuses anything but a JSON type, none included), and
a request vLLM refuses by raising in a replica (`n` > 1 with greedy sampling) was a 500 there (single: 400).
`n` / `best_of` above `--max-n` are refused the same way in both.

Both servers are the real `pipeline serve` command over one registry, shared with other modules
(tests/serve/conftest.py), and stopped with Ctrl-C after the last of them.
"""

from __future__ import annotations

import http.client
import json

import pytest

from tests.serve.shared_server import API_KEY, MAX_N, start_together

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def servers(shared_servers, shared_server, shared_replicated_server):
    """{"single": base URL, "replicated": base URL}, over one registry whose `alpha@prod` is alpha@1 (the shared
    servers, started together where neither runs yet; the replicated one takes longer)."""
    shared_servers.alpha()
    start_together(shared_server, shared_replicated_server)
    return {"single": shared_server.base_url, "replicated": shared_replicated_server.base_url}


def _post(base: str, path: str, body: bytes, content_type: str | None) -> tuple[int, dict]:
    """POST with exactly these headers (urllib would add a form Content-Type to a body sent without one)."""
    host, port = base.removeprefix("http://").split(":")
    headers = {"Authorization": f"Bearer {API_KEY}", **({"Content-Type": content_type} if content_type else {})}
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        status, raw = response.status, response.read()
    finally:
        connection.close()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"raw": raw[:200].decode(errors="replace")}


def _completion(model="alpha@prod", **extra) -> bytes:
    return json.dumps({"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0, **extra}).encode()


JSON, TEXT, FORM = "application/json", "text/plain", "application/x-www-form-urlencoded"
# (what, path, body, content type or None for no Content-Type header, expected status)
TABLE = [
    ("a JSON list body", "/v1/completions", b"[]", JSON, 400),
    ("a JSON string body", "/v1/completions", b'"s"', JSON, 400),
    ("a JSON list body, chat", "/v1/chat/completions", b"[1, 2]", JSON, 400),
    ("a JSON number body, no content type", "/v1/completions", b"7", None, 400),
    ("100k-deep JSON", "/v1/completions", DEEP, JSON, 400),
    ("100k-deep JSON, text/plain", "/v1/completions", DEEP, TEXT, 400),
    ("100k-deep JSON, no content type", "/v1/completions", DEEP, None, 400),
    ("broken JSON, text/plain", "/v1/completions", b'{"model": ', TEXT, 400),
    ("an alias, text/plain", "/v1/completions", _completion(), TEXT, 400),
    ("an alias, a form", "/v1/completions", _completion(), FORM, 400),
    ("an alias, multipart", "/v1/completions", _completion(), "multipart/form-data; boundary=x", 400),
    ("an alias, no content type", "/v1/completions", _completion(), None, 400),
    ("an alias, JSON with a charset", "/v1/completions", _completion(), JSON + "; charset=utf-8", 200),
    ("an unknown name, text/plain", "/v1/completions", _completion("nosuch@prod"), TEXT, 400),
    ("an unknown name", "/v1/completions", _completion("nosuch@prod"), JSON, 404),
    ("an invalid name", "/v1/completions", _completion("../etc"), JSON, 400),
    ("a version past the registry's range", "/v1/completions", _completion("alpha@" + "9" * 18), JSON, 404),
    ("a version of 20 digits (the registry's limit is 18)", "/v1/completions", _completion("alpha@" + "9" * 20),
     JSON, 400),
    ("a 5,000-digit version", "/v1/completions", _completion("alpha@" + "9" * 5000), JSON, 400),
    (f"n = --max-n ({MAX_N})", "/v1/completions", _completion(n=MAX_N, temperature=1.0), JSON, 200),
    ("n = 2 with greedy sampling (vLLM refuses it)", "/v1/completions", _completion(n=2), JSON, 400),
    ("n above --max-n", "/v1/completions", _completion(n=MAX_N + 1), JSON, 400),
    ("n = 1000", "/v1/completions", _completion(n=1000), JSON, 400),
    ("n = '1000' (a string)", "/v1/completions", _completion(n="1000"), JSON, 400),
    ("best_of above --max-n", "/v1/completions", _completion(n=1, best_of=MAX_N + 1), JSON, 400),
    ("n above --max-n, chat, base model", "/v1/chat/completions",
     json.dumps({"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                 "n": 1000}).encode(), JSON, 400),
]


def test_one_table_of_requests_gets_the_same_answers_from_both_modes(servers):
    differences, unexpected = [], []
    for what, path, body, content_type, expected in TABLE:
        answers = {kind: _post(base, path, body, content_type) for kind, base in servers.items()}
        (s_status, s_body), (r_status, r_body) = answers["single"], answers["replicated"]
        shown = {kind: (status, (body.get("error") or {}).get("message", body.get("model", body))
                        if isinstance(body, dict) else body) for kind, (status, body) in answers.items()}
        if s_status != r_status or shown["single"][1] != shown["replicated"][1]:
            differences.append(f"{what}: {shown}")
        if s_status != expected or r_status != expected:
            unexpected.append(f"{what}: expected {expected}, got {shown}")
        if expected == 200 and not s_body.get("model") == r_body.get("model") == "alpha@1":
            unexpected.append(f"{what}: expected the answer of alpha@1, got {shown}")
        if expected == 400 and ("max-n" in what or "1000" in what or "best_of" in what):
            message = str(shown["single"][1])
            if not (str(MAX_N) in message and "--max-n" in message):
                unexpected.append(f"{what}: the message does not name the limit and --max-n: {message}")
    assert not differences and not unexpected, "\n".join(differences + unexpected)
