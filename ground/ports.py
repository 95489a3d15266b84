"""A free TCP port, for the servers and process groups this project starts (one home: the trainer's rendezvous,
the tests' servers)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on this machine at `host` ("" = every interface, for peers on other nodes). Free when
    asked: a caller that binds it later may still lose it to another process, so bind soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
