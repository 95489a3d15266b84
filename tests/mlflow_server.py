"""A real `mlflow server` for the registry tests: sqlite backend, local artifact root behind its artifact proxy,
a free port on loopback, its own process group (stopped with everything it started)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ground.ports import free_port

MLFLOW = str(Path(sys.executable).parent / "mlflow")


class MlflowServerProcess:
    def __init__(self, root: Path, app_name: str | None = None, env: dict | None = None, workers: int = 2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts = self.root / "artifacts"
        self.port = free_port()
        self.app_name, self.env, self.workers = app_name, dict(env or {}), workers
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return f"mlflow+http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "MlflowServerProcess":
        cmd = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--serve-artifacts",
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(self.workers)]
        if self.app_name:
            cmd += ["--app-name", self.app_name]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            env.pop(key, None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        # workers that outlived their parent (same process group)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wipe(server: MlflowServerProcess) -> None:
    """Delete every registered model (and so every version and alias): each test starts from an empty registry.
    Numbers restart at 1 afterwards, which the cache must tell apart from the old ones (it keys by upload)."""
    from registry.mlflow_http import MlflowServer

    client = MlflowServer(server.url)
    for model in client.search("registered-models/search", "registered_models", "wiping", max_results=1000):
        client.delete("registered-models/delete", "wiping", {"name": model["name"]})
