"""Attacks and faults against a real `pipeline serve` (tiny model, vLLM CPU, real HTTP): every one of them was
observed to succeed, leak or kill the server before the hardening of serve/access.py, serve/middleware.py and
serve/verified.py.

One server for the module, with an API key and room for ONE adapter in the engine and in its CPU cache
(`--max-loras 1 --max-cpu-loras 1`), so that requesting a second adapter evicts the first and the next request
for the first reloads it. The last test SIGKILLs that server's whole tree and starts `pipeline serve` again,
which must remove the shared memory the dead server left in /dev/shm.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from registry import open_registry
from tests.synthetic_lora import write_lora
from serve.server import session_pids, shm_segments_of, tree_memory_mib
from tests.serve.adapters import PROMPT, make_adapters
from tests.serve.cli_server import free_port, server_env, start_cli

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "hardening-key-9f2"
MAX_TOKENS = 6
PUBLIC = {"/health", "/ping"}
# every registry name and alias starts with or is one of these; no anonymous answer may contain them
SECRET_NAMES = re.compile(r"qx-|canary7")
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("harden")
    reg = open_registry(str(root / "registry"))
    dirs, answers = make_adapters(tiny_model_dir, root, seeds=[1, 2], max_new_tokens=MAX_TOKENS)
    expected = {}
    for name, seed in [("qx-alpha", 1), ("qx-alpha", 2), ("qx-beta", 2), ("qx-flip", 1), ("qx-gone", 1),
                       ("qx-trunc", 2)]:
        expected[reg.publish(dirs[seed], name, base_dir=tiny_model_dir).ref] = answers[seed]
    reg.set_alias("qx-alpha", "canary7", 1)
    # tensors for a wider model, published without a base to check against: only the server can refuse it
    reg.publish(write_lora(root / "wide", shapes={"self_attn.q_proj": (96, 64)}, targets=("q_proj",)), "qx-wide")

    port = free_port()
    cli = None
    try:
        cli, server_pid, _ = start_cli(
            ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port),
             "--max-loras", "1", "--max-cpu-loras", "1", "--max-model-len", "128", "--kv-cache-gib", "0.0625",
             "--dtype", "float32", "--served-name", "tiny-base", "--max-body-mb", "16"],
            env={"PIPELINE_SERVE_API_KEY": API_KEY})
        base = f"http://127.0.0.1:{port}"
        yield {"cli": cli, "pid": server_pid, "base": base, "port": port, "registry": reg, "root": root,
               "expected": expected, "base_dir": tiny_model_dir, "run_dir": server_env(server_pid)["PIPELINE_SERVE_RUN_DIR"],
               "client": openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)}
    finally:
        if cli is not None and cli.poll() is None:
            cli.send_signal(signal.SIGINT)
            try:
                cli.communicate(timeout=90)
            except Exception:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait()


def _call(base: str, method: str, path: str, body=None, key: str | None = None, headers: dict | None = None,
          timeout: float = 60) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method, headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _answer(client, model: str) -> list[int]:
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"return_token_ids": True})
    return list(resp.choices[0].model_extra["token_ids"])


def _healthy(served) -> bool:
    return _call(served["base"], "GET", "/health")[0] == 200 and served["cli"].poll() is None


# ------------------------------------------------------------------------------------------------ the doors
def test_every_mounted_route_needs_the_key_and_anonymous_answers_name_nothing(served):
    """The routes the server process walked at start-up, each method, called without the key with
    model=nosuch: 401, apart from the public probes; no answer holds a registry name."""
    routes = json.loads(open(os.path.join(served["run_dir"], "routes.json")).read())
    paths = {r["path"] for r in routes}
    assert {"/invocations", "/adapters", "/metrics", "/tokenize", "/v1/completions", "/health"} <= paths
    status, openapi = _call(served["base"], "GET", "/openapi.json", key=API_KEY)
    assert status == 200 and set(json.loads(openapi)["paths"]) <= paths  # nothing mounted escapes the walk
    called = 0
    for route in routes:
        path = re.sub(r"\{[^}]+\}", "nosuch", route["path"])
        for method in route["methods"] or ["GET"]:
            if method in ("HEAD", "OPTIONS"):
                continue
            body = {"model": "nosuch", "prompt": "x", "name": "nosuch", "src": "/etc"} if method != "GET" else None
            status, text = _call(served["base"], method, path, body)
            called += 1
            expected = 200 if route["path"] in PUBLIC else 401
            assert status == expected, f"{method} {path} without the key: {status} {text[:200]!r}"
            assert not SECRET_NAMES.search(text.decode(errors="replace")), f"{method} {path} leaked: {text[:300]!r}"
            if route["path"] not in PUBLIC:
                assert _call(served["base"], method, path, body, key="wrong-key")[0] == 401
    assert called >= len(routes)
    # unmounted paths are closed as well (deny by default), and with the key nosuch is an ordinary 404
    assert _call(served["base"], "GET", "/v9/something-new")[0] == 401
    status, text = _call(served["base"], "POST", "/tokenize", {"model": "nosuch", "prompt": "x"}, key=API_KEY)
    assert status == 404 and b"`nosuch` does not exist" in text
    assert _healthy(served)


def test_adapters_and_invocations_attacks_are_refused_even_with_the_key(served):
    base, reg = served["base"], served["registry"]
    beta_folder = str(reg.resolve("qx-beta@1").path)
    swap = {"name": "qx-alpha@1", "src": beta_folder}
    invocation = {"model": "tiny-base", "prompt": PROMPT, "max_tokens": 2}
    for key, want in [(None, 401), (API_KEY, 404)]:
        assert _call(base, "DELETE", "/adapters/qx-alpha@1", key=key)[0] == want
        status, text = _call(base, "POST", "/adapters", swap, key=key)
        assert status == want and b"/etc" not in text and beta_folder.encode() not in text
        assert _call(base, "POST", "/invocations", invocation, key=key)[0] == want
        assert _call(base, "POST", "/invocations", invocation, key=key, headers={ADAPTER_HEADER: "qx-alpha@2"})[0] == want
        assert _call(base, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, key=key)[0] == want
    # qx-alpha@1 still answers with its own weights, and nothing anonymous showed up in the listing
    assert _answer(served["client"], "qx-alpha@1") == served["expected"]["qx-alpha@1"]
    ids = {m.id for m in served["client"].models.list().data}
    assert "qx-alpha@1" in ids and not any("/" in i for i in ids)


# ------------------------------------------------------------------------------------------------ the weights
def test_flipped_byte_is_refused_and_the_server_stays_up(served):
    weights = served["registry"].resolve("qx-flip@1").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _answer(served["client"], "qx-flip@1")
    assert "qx-flip@1" in str(info.value) and "pipeline registry verify" in str(info.value)
    assert _healthy(served)
    assert _answer(served["client"], "qx-beta@1") == served["expected"]["qx-beta@1"]


def test_deleted_or_truncated_after_load_and_eviction_is_4xx_and_the_server_stays_up(served):
    client, reg, expected = served["client"], served["registry"], served["expected"]
    for ref in ("qx-gone@1", "qx-trunc@1", "qx-alpha@2"):  # one slot: each load evicts the one before
        assert _answer(client, ref) == expected[ref]
    reg.delete_version("qx-gone", 1)
    os.truncate(reg.resolve("qx-trunc@1").path / "adapter_model.safetensors", 1000)
    with pytest.raises(openai.NotFoundError, match="qx-gone@1.*deleted"):
        _answer(client, "qx-gone@1")
    with pytest.raises(openai.UnprocessableEntityError, match="qx-trunc@1"):
        _answer(client, "qx-trunc@1")
    assert _healthy(served)
    assert "qx-gone@1" not in {m.id for m in client.models.list().data}
    assert _answer(client, "qx-alpha@1") == expected["qx-alpha@1"]  # evicted earlier, reloads from its copy


def test_adapter_whose_shapes_do_not_fit_is_refused(served):
    with pytest.raises(openai.UnprocessableEntityError, match=r"qx-wide@1 does not fit.*96 -> 64"):
        _answer(served["client"], "qx-wide@1")
    assert _healthy(served)


# ------------------------------------------------------------------------------------------------ the input
def _send_large(port: int, size: int, key: str | None, chunked: bool) -> int:
    """POST `size` bytes of a JSON string to /v1/completions from a writer thread; returns the status read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = ["POST /v1/completions HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    head += [f"Authorization: Bearer {key}"] if key else []
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {size}"]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def write():
        piece = b'{"model": "qx-alpha@1", "prompt": "' + b"a" * ((1 << 20) - 40)
        sent = 0
        try:
            while sent < size:
                chunk = piece[: size - sent]
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
                piece = b"a" * len(piece)
        except OSError:
            pass  # the server answered and closed the connection: what we want

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    status_line = sock.makefile("rb").readline().decode()
    writer.join(timeout=60)
    sock.close()
    return int(status_line.split()[1])


def test_large_bodies_are_refused_without_the_server_growing(served, record_property):
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(tree_memory_mib(served["pid"])["rss_mib"])
            stop.wait(0.05)

    before = tree_memory_mib(served["pid"])["rss_mib"]
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        anonymous = _send_large(served["port"], 300 << 20, key=None, chunked=False)
        anonymous_chunked = _send_large(served["port"], 300 << 20, key=None, chunked=True)
        keyed_chunked = _send_large(served["port"], 300 << 20, key=API_KEY, chunked=True)  # read up to 16 MiB
        keyed = _send_large(served["port"], 300 << 20, key=API_KEY, chunked=False)
    finally:
        stop.set()
        sampler.join()
    growth = max(samples) - before
    record_property("rss_growth_mib", round(growth, 1))  # in the JUnit XML report (--junitxml)
    record_property("rss_before_mib", round(before, 1))
    assert (anonymous, anonymous_chunked, keyed_chunked, keyed) == (401, 401, 413, 413)
    assert growth <= 50, f"the server's processes grew by {growth:.0f} MiB RSS"
    assert _healthy(served)


def test_malformed_input_is_a_400(served):
    base = served["base"]
    deep = b'{"model": "qx-alpha@1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _call(base, "POST", "/v1/completions", deep)[0] == 401
    status, text = _call(base, "POST", "/v1/completions", deep, key=API_KEY)
    assert status == 400 and b"not valid JSON" in text
    status, text = _call(base, "POST", "/v1/completions", b'{"model": "qx-alpha@1", "prompt": ', key=API_KEY)
    assert status == 400
    status, text = _call(base, "POST", "/v1/completions", {"model": "x" * (1 << 20), "prompt": "x"}, key=API_KEY)
    assert status == 400 and len(text) < 2000
    status, text = _call(base, "POST", "/v1/completions", {"model": "qx-alpha@१", "prompt": "x"}, key=API_KEY)
    assert status == 400 and b"ASCII digits" in text
    assert _healthy(served)


# ------------------------------------------------------------------------------------------------ crash: last
def test_next_start_removes_the_shared_memory_of_a_sigkilled_server(served, tiny_model_dir):
    cli, pid = served["cli"], served["pid"]
    segments = shm_segments_of(session_pids(pid))
    assert segments
    os.killpg(cli.pid, signal.SIGKILL)  # the command (its own session) and the server's whole session
    os.killpg(pid, signal.SIGKILL)
    for p in session_pids(pid):
        os.kill(p, signal.SIGKILL)
    cli.wait()
    deadline = time.monotonic() + 20
    while session_pids(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_pids(pid) == []
    left = {s for s in segments if os.path.exists(s)}
    assert left, "the SIGKILL left no segment behind: nothing to test"
    run_dir = served["run_dir"]
    assert os.path.isdir(run_dir)

    port = free_port()
    cli2, pid2, _ = start_cli(["--registry", str(served["root"] / "registry"), "--base", str(tiny_model_dir),
                               "--port", str(port), "--max-loras", "1", "--max-model-len", "128",
                               "--kv-cache-gib", "0.0625", "--dtype", "float32"])
    try:
        assert not any(os.path.exists(s) for s in left), "segments of the dead server are still in /dev/shm"
        assert not os.path.exists(run_dir)
        assert _call(f"http://127.0.0.1:{port}", "GET", "/health")[0] == 200
    finally:
        cli2.send_signal(signal.SIGINT)
        cli2.communicate(timeout=90)
    assert session_pids(pid2) == []
