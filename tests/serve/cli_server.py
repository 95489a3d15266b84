"""Start the real `pipeline serve` command for a test module and find the vLLM server process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

from ground.processes import stat_field
from ground.ports import free_port  # noqa: F401  (re-exported: the serve tests import it from here)


def ppid(pid: int) -> int | None:
    parent = stat_field(pid, 1)
    return int(parent) if parent is not None else None


def start_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[subprocess.Popen, int, str]:
    """`pipeline serve ARGS` in its own session; returns (command process, vLLM server pid, output so far)."""
    pipeline_script = os.path.join(os.path.dirname(sys.executable), "pipeline")
    cli = subprocess.Popen([pipeline_script, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True, env={**os.environ, **(env or {})})
    output = read_until_ready(cli, timeout)
    server_pid = next(p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if ppid(p) == cli.pid)
    return cli, server_pid, output


def read_until_ready(cli, timeout: float) -> str:
    """The command prints `serving ... at URL` once the server answers /health."""
    lines, done = [], threading.Event()

    def read():
        for line in cli.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout)
    text = "".join(lines)
    assert lines and lines[-1].startswith("serving ") and cli.poll() is None, f"`pipeline serve` did not start:\n{text}"
    return text


def server_env(pid: int) -> dict[str, str]:
    """The environment a process was started with (same user: /proc/PID/environ is readable)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


@contextmanager
def ctrl_c_when_done(cli: subprocess.Popen, output: str, timeout: float = 90):
    """Run the body against a started `pipeline serve`; then Ctrl-C it and require a clean exit (code 0). A command
    still running afterwards (a failed body, a hung stop) has its whole session killed, so no server outlives it."""
    try:
        yield
        cli.send_signal(signal.SIGINT)
        rest, _ = cli.communicate(timeout=timeout)
        assert cli.returncode == 0, output + rest
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
