"""registry.mlflow_http against a real HTTP server that dies in the middle of a download (no MLflow needed)."""

from __future__ import annotations

import socket
import threading

import pytest

from registry.mlflow_http import MlflowServer, ServerUnavailableError


def _serve_truncated_once(sock: socket.socket) -> None:
    """Answer one request with a 1 MiB Content-Length, send 1 KiB of it, then close: a server killed mid-body."""
    conn, _ = sock.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 1048576\r\n\r\n" + b"x" * 1024)


def test_a_download_cut_short_is_a_registry_error_and_leaves_no_partial_file(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=lambda: [_serve_truncated_once(sock) for _ in range(8)], daemon=True)
    thread.start()
    dst = tmp_path / "adapter_model.safetensors"
    try:
        with pytest.raises(ServerUnavailableError) as err:
            MlflowServer(f"http://127.0.0.1:{port}").download("1/abc/artifacts/adapter_model.safetensors", dst)
    finally:
        sock.close()
    assert f"127.0.0.1:{port}" in str(err.value) and "stopped answering" in str(err.value)
    assert not dst.exists()
