"""The servers `serve_multi_lora.py` compares with `pipeline serve`: raw vLLM with its filesystem LoRA resolver,
and `pipeline serve --replicas N --routing ...` (Ray Serve), whose adapter loads are read from /metrics.

Both are started as a user would (a command line in its own session) and stopped by signalling that session,
then the `/dev/shm/psm_*` segments its processes had mapped are removed (an engine killed hard leaves them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ground.processes import remove_files, shm_segments_of
from serve.server import session_pids

log = logging.getLogger("serve_multi_lora")

LOADS_METRIC = "pipeline_adapter_loads_total"


class CommandServer:
    """A server command in its own session: readiness on /health, memory of its process tree, clean stop."""

    def __init__(self, cmd: list[str], url: str, log_path: Path, env: dict[str, str] | None = None):
        self.url, self.log_path, self.segments = url, log_path, set()
        log.info("starting %s; log: %s", " ".join(cmd[:6]) + " ...", log_path)
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def memory_mib(self) -> dict[str, float]:
        from serve.server import tree_memory_mib

        return tree_memory_mib(self.process.pid)

    def wait_ready(self, timeout: float, ready_line: str | None = None) -> None:
        """Until /health answers 200 and, when `ready_line` is given, the log has a line starting with it (the
        replicated command's ingress answers /health before its replicas are up; it prints `serving ...` once
        they all are)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log_path}: the server exited with code {self.process.returncode}:\n"
                                   + self.log_tail())
            self.segments |= shm_segments_of(session_pids(self.process.pid))
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=2) as r:
                    if r.status == 200 and (ready_line is None or any(
                            line.startswith(ready_line) for line in self.log_tail(10_000).splitlines())):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.log_path}: not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 90.0) -> None:
        """SIGINT (the command's Ctrl-C path), then SIGKILL of whatever is left of its session."""
        sid = self.process.pid
        self.segments |= shm_segments_of(session_pids(sid))
        if self.process.poll() is None:
            os.killpg(sid, signal.SIGINT)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGINT for %.0f s; killing its session", self.log_path, grace)
        deadline = time.monotonic() + 15
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if removed := remove_files(sorted(self.segments)):
            log.info("removed %d leaked shared-memory segment(s)", removed)


# ------------------------------------------------------------------------------------------------ raw vLLM
def raw_adapter_folders(registry_dir: Path, refs: list[str], out: Path, base_dir: Path) -> list[str]:
    """The registry's adapter files as the filesystem resolver wants them: one folder per request name, whose
    adapter_config.json names the served base as vLLM knows it, its `--model` path (the resolver compares
    `base_model_name_or_path` with that, not with `--served-model-name`, and skips any other)."""
    from registry import open_registry

    reg = open_registry(str(registry_dir))
    names = []
    for ref in refs:
        src = reg.resolve(ref).path
        name = "raw-" + ref.replace("@", "-v")
        folder = out / name
        folder.mkdir(parents=True)
        shutil.copyfile(src / "adapter_model.safetensors", folder / "adapter_model.safetensors")
        config = json.loads((src / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base_dir)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        names.append(name)
    return names


def start_raw_vllm(base_dir: Path, adapters_dir: Path, port: int, max_loras: int, max_cpu_loras: int, rank: int,
                   max_model_len: int, kv_cache_gib: float, dtype: str, log_path: Path,
                   ready_timeout: float = 300) -> CommandServer:
    """vLLM's OpenAI server with the same engine settings as `pipeline serve` and vLLM's own filesystem resolver
    (no registry, no verification, no middleware): the baseline for what the registry layer costs."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
           "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
           "--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras), "--max-lora-rank", str(rank),
           "--max-model-len", str(max_model_len), "--gpu-memory-utilization", "0.1", "--dtype", dtype,
           "--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30))), "--enforce-eager",
           "--disable-uvicorn-access-log"]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_LORA_RESOLVER_CACHE_DIR": str(adapters_dir),
           "VLLM_PLUGINS": "lora_filesystem_resolver"}
    server = CommandServer(cmd, f"http://127.0.0.1:{port}/v1", log_path, env)
    try:
        server.wait_ready(ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


# ------------------------------------------------------------------------------------------------ replicas
def start_replicated(base_dir: Path, registry_dir: Path, port: int, replicas: int, routing: str, max_loras: int,
                     rank: int, max_model_len: int, kv_cache_gib: float, dtype: str, log_path: Path,
                     extra: list[str] | None = None, ready_timeout: float = 420) -> CommandServer:
    """`pipeline serve --replicas N --routing R` as a user starts it (a local Ray cluster of its own)."""
    pipeline_script = Path(sys.executable).with_name("pipeline")
    cmd = [str(pipeline_script), "serve", "--registry", str(registry_dir), "--base", str(base_dir),
           "--port", str(port), "--served-name", "base", "--replicas", str(replicas), "--routing", routing,
           "--max-loras", str(max_loras), "--max-lora-rank", str(rank), "--max-model-len", str(max_model_len),
           "--kv-cache-gib", str(kv_cache_gib), "--dtype", dtype, *(extra or [])]
    server = CommandServer(cmd, f"http://127.0.0.1:{port}/v1", log_path)
    try:
        server.wait_ready(ready_timeout, ready_line="serving ")
    except BaseException:
        server.stop()
        raise
    return server


def adapter_loads(url: str) -> dict[str, float]:
    """`pipeline_adapter_loads_total` per replica label from the server's Prometheus /metrics."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as r:
        return parse_adapter_loads(r.read().decode(errors="replace"))


def parse_adapter_loads(text: str) -> dict[str, float]:
    """Sum the loads counter's samples per `replica` label in Prometheus text format (other labels, such as
    the adapter, are added up; `# HELP`/`# TYPE` lines and other metrics are skipped)."""
    loads = {}
    for line in text.splitlines():
        if line.startswith(LOADS_METRIC + "{") or line.startswith(LOADS_METRIC + " "):
            labels, _, value = line.rpartition(" ")
            replica = re.search(r'replica="([^"]*)"', labels)
            key = replica.group(1) if replica else ""
            loads[key] = loads.get(key, 0.0) + float(value)
    return loads
