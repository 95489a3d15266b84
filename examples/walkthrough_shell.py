"""What the walkthrough scripts (lifecycle_walkthrough.py, flywheel.py) share: running `pipeline` commands as a
terminal would show them, and starting `pipeline serve` in the background until it answers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PIPELINE = str(Path(sys.executable).with_name("pipeline"))


def sh(*args: str, check: bool = True) -> str:
    """Run `pipeline ARGS`, print the command and its output as a terminal would show them."""
    print(f"\n$ pipeline {' '.join(args)}", flush=True)
    done = subprocess.run([PIPELINE, *args], capture_output=True, text=True)
    text = (done.stdout + done.stderr).rstrip()
    print(text, flush=True)
    if check and done.returncode != 0:
        raise SystemExit(f"`pipeline {' '.join(args)}` exited {done.returncode}")
    return text


def start_serve(args: list[str], port: int, api_key: str, log_path: Path, timeout_s: float = 600) -> subprocess.Popen:
    """`pipeline serve ARGS &` (its own session, output to `log_path`), returned once /v1/models answers."""
    import httpx

    print(f"\n$ pipeline {' '.join(args)} &", flush=True)
    server = subprocess.Popen([PIPELINE, *args], stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2,
                         headers={"Authorization": f"Bearer {api_key}"}).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not answer within {timeout_s:.0f} s")
