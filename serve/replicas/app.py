"""`pipeline serve --replicas N`: start (or join) Ray, run the ingress + replicas as one Serve application, stop.

    ingress (1, FastAPI + our middleware) --NAME@V as multiplexed id--> LoraReplica x N (one vLLM engine each)

Every node that runs a replica must see the base model folder and the registry at the same paths (or the
registry on an MLflow server). `ray_address=None` starts a local Ray instance that lives as long as the command;
an address joins an existing cluster, where only this application is deleted at stop.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import ConfigError, StageError
from ground.vllm_tool_parsers import tool_parser_args
from serve.lora_tier import DEFAULT_LORA_CACHE_GIB

log = logging.getLogger(__name__)

APP_NAME = "lora-pipeline"
ROUTINGS = ("multiplexed", "round_robin")
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")
REPLICA_CPUS = 0.5  # vLLM's CPU engine threads are not what Ray counts; half a CPU lets 2 replicas share 2 cores
INGRESS_CPUS = 0.1
STICKY_ROUTER = "serve.replicas.sticky_router.StickyAdapterRouter"
MAX_ONGOING_REQUESTS = 32  # per replica: vLLM batches them; Serve's default of 5 would queue at the router
OWNERS_TIMEOUT_S = 30.0  # at stop: how long this run's replica processes on this node may take to exit


AUTOSCALING_SOURCE = "serve.autoscaling (--min-replicas / --max-replicas / --target-ongoing-requests)"


def check_autoscaling(autoscaling: dict | None, source: str = AUTOSCALING_SOURCE) -> dict | None:
    """Validate {min_replicas, max_replicas, target_ongoing_requests}; None or {} means a fixed replica count."""
    if not autoscaling:
        return None
    unknown = sorted(set(autoscaling) - set(AUTOSCALING_KEYS))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {source}; valid keys: {', '.join(AUTOSCALING_KEYS)}.")
    lo, hi = autoscaling.get("min_replicas", 1), autoscaling.get("max_replicas", 1)
    target = autoscaling.get("target_ongoing_requests", 2)
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
        raise ConfigError(f"{source}: need 0 <= min_replicas <= max_replicas and max_replicas >= 1 "
                          f"(got min_replicas={lo!r}, max_replicas={hi!r}).")
    if not isinstance(target, (int, float)) or target <= 0:
        raise ConfigError(f"{source}: target_ongoing_requests must be a positive number (got {target!r}).")
    return {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": float(target)}


@dataclass
class ReplicatedServer:
    """A running replicated server; `stop()` is idempotent (context manager: stops on any error)."""

    url: str
    base_name: str
    replicas: int
    routing: str
    started_ray: bool
    api_key: str | None = None
    lora_tier: str = ""  # per replica: the host-memory adapter tier chosen and why
    app_token: str = ""  # written into every replica's owner record (leftovers.py): which replicas are ours
    extra: dict = field(default_factory=dict)
    _stopped: bool = False

    def stop(self, owners_timeout_s: float = OWNERS_TIMEOUT_S) -> None:
        if self._stopped:
            return
        self._stopped = True
        import ray
        from ray import serve

        from serve.replicas.leftovers import sweep, wait_for_owners

        try:
            if ray.is_initialized():
                if self.started_ray:
                    serve.shutdown()  # replicas stop gracefully: each shuts its engine down (its __del__)
                else:
                    serve.delete(APP_NAME)
        except Exception:
            log.exception("stopping the Serve application failed")
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()
            # Ray stops a replica that overran its graceful shutdown, or one still running at ray.shutdown(),
            # without its __del__, and an actor's process outlives the call that killed it for a moment; the
            # sweep only takes what dead replicas left, so wait for this run's replicas on this node to be gone
            live = wait_for_owners(self.app_token, owners_timeout_s) if self.app_token else []
            if live:
                log.warning("replica process(es) %s still run %.0f s after the stop; the next start on this "
                            "node removes what they leave", live, owners_timeout_s)
            removed = sweep()  # what replicas on this node that did not get to clean up left
            if removed:
                log.info("removed %d shared-memory segment(s) left by this run's replicas", len(removed))

    def wait(self, poll_s: float = 5.0) -> None:
        """Block until the application is no longer running (Ctrl-C raises KeyboardInterrupt)."""
        from ray import serve

        while True:
            time.sleep(poll_s)
            status = serve.status().applications.get(APP_NAME)
            if status is None or status.status in ("DEPLOY_FAILED", "DELETING"):
                raise StageError(f"The Serve application {APP_NAME} stopped: {status}")

    def __enter__(self) -> "ReplicatedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class ReplicaPlan:
    """What every replica and the ingress get, decided before Ray starts (so a bad setting costs no cluster)."""

    settings: dict  # the replicas' and the ingress's settings (see LoraReplica)
    environment: dict  # process environment of the ingress: the single server's middleware reads it
    lora_tier: str  # the host-memory tier chosen and why (serve/lora_tier.py)


def plan_replicas(base_dir: str | Path, registry_uri: str | None = None, routing: str = "multiplexed",
                  api_key: str | None = None, max_loras: int = 4, max_cpu_loras: int | None = None,
                  lora_cache_gib: float = DEFAULT_LORA_CACHE_GIB, max_lora_rank: int | None = None,
                  max_model_len: int = 512, kv_cache_gib: float = 0.25, dtype: str = "auto",
                  base_name: str | None = None, alias_ttl_s: float = 1.0, max_body_mb: float = 32.0,
                  request_limits: dict | None = None, tool_call_parser: str | None = None) -> ReplicaPlan:
    """Check the settings and size each replica as the single server sizes itself: the host-memory tier from
    `lora_cache_gib` and the registry's largest adapter on this base unless `max_cpu_loras` is given. Serve's
    per-replica model cache (max_num_models_per_replica) is that same number (see serve/replicas/replica.py).
    `tool_call_parser` (vLLM's parser of tool calls) is checked here, as the single server checks it."""
    from ground.model_files import fingerprint
    from registry import open_registry
    from serve.lora_tier import choose_max_cpu_loras
    from serve.server import (ENV_ALIAS_TTL, ENV_BASE_DIR, ENV_BASE_FINGERPRINT, ENV_BASE_NAME, ENV_MAX_BODY_BYTES,
                              ENV_MAX_LORA_RANK, ENV_REGISTRY, TOOL_PARSER_SOURCE, round_lora_rank)

    if routing not in ROUTINGS:
        raise ConfigError(f"Unknown routing `{routing}`; use one of: {', '.join(ROUTINGS)}.")
    tool_parser_args(tool_call_parser, TOOL_PARSER_SOURCE)  # the replicas add the flags (replica._engine_cli_args)
    base_dir = Path(base_dir).expanduser().absolute()
    if not (base_dir / "config.json").is_file():
        raise StageError(f"Base model folder `{base_dir}` has no config.json; pass --base a model folder or `default`.")
    registry = open_registry(registry_uri)
    base_name = base_name or base_dir.name
    max_lora_rank = round_lora_rank(max_lora_rank or registry.max_rank() or 8)
    base_fp = fingerprint(base_dir)
    max_cpu_loras, tier = choose_max_cpu_loras(registry, base_dir, base_fp, dtype, max_loras, max_lora_rank,
                                               max_cpu_loras, lora_cache_gib)
    settings = {"base_dir": str(base_dir), "base_name": base_name, "base_fingerprint": base_fp,
                "registry_uri": registry.uri, "alias_ttl_s": alias_ttl_s, "max_lora_rank": max_lora_rank,
                "max_loras": max_loras, "max_cpu_loras": max_cpu_loras, "max_model_len": max_model_len,
                "dtype": dtype, "kv_cache_bytes": int(kv_cache_gib * (1 << 30)), "routing": routing,
                "tool_call_parser": tool_call_parser}
    environment = {ENV_REGISTRY: registry.uri, ENV_BASE_FINGERPRINT: base_fp, ENV_BASE_NAME: base_name,
                   ENV_ALIAS_TTL: str(alias_ttl_s), ENV_MAX_LORA_RANK: str(max_lora_rank),
                   ENV_BASE_DIR: str(base_dir), ENV_MAX_BODY_BYTES: str(int(max_body_mb * (1 << 20))),
                   **(request_limits or {})}  # serve.server.request_limits_env: lookup deadline, --max-n
    if api_key:
        environment["VLLM_API_KEY"] = api_key  # the middleware's AccessPolicy reads it, as in the single server
    return ReplicaPlan(settings=settings, environment=environment, lora_tier=tier)


def start_replicated(base_dir: str | Path, registry_uri: str | None = None, replicas: int = 2,
                     ray_address: str | None = None, routing: str = "multiplexed", autoscaling: dict | None = None,
                     host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_loras: int = 4,
                     max_cpu_loras: int | None = None, lora_cache_gib: float = DEFAULT_LORA_CACHE_GIB,
                     max_lora_rank: int | None = None, max_model_len: int = 512,
                     kv_cache_gib: float = 0.25, dtype: str = "auto", base_name: str | None = None,
                     alias_ttl_s: float = 1.0, max_body_mb: float = 32.0, ready_timeout_s: float = 600.0,
                     max_replicas_per_node: int | None = None, ray_num_cpus: int | None = None,
                     request_limits: dict | None = None, tool_call_parser: str | None = None) -> ReplicatedServer:
    """Start the replicated server and wait until every replica is ready and /health answers."""
    import ray
    from ray import serve

    from serve.replicas.ingress import REPLICA_DEPLOYMENT, _ingress_class
    from serve.replicas.leftovers import sweep
    from serve.replicas.replica import LoraReplica

    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1 (got {replicas}).")
    autoscaling = check_autoscaling(autoscaling)
    plan = plan_replicas(base_dir, registry_uri, routing=routing, api_key=api_key, max_loras=max_loras,
                         max_cpu_loras=max_cpu_loras, lora_cache_gib=lora_cache_gib, max_lora_rank=max_lora_rank,
                         max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, dtype=dtype, base_name=base_name,
                         alias_ttl_s=alias_ttl_s, max_body_mb=max_body_mb, request_limits=request_limits,
                         tool_call_parser=tool_call_parser)
    settings, environment = plan.settings, plan.environment
    base_name, max_cpu_loras = settings["base_name"], settings["max_cpu_loras"]
    max_lora_rank = settings["max_lora_rank"]
    log.info("host-memory adapter tier per replica: %s", plan.lora_tier)

    sweep()
    settings = {**settings, "app": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"}
    started_ray = not ray.is_initialized() and ray_address is None
    if not ray.is_initialized():
        log.info("starting Ray (%s)", ray_address or "a local instance")
        ray.init(address=ray_address or "local", num_cpus=ray_num_cpus if ray_address is None else None,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    server = ReplicatedServer(url=f"http://{host}:{port}/v1", base_name=base_name, replicas=replicas,
                              routing=routing, started_ray=started_ray, api_key=api_key, lora_tier=plan.lora_tier,
                              app_token=settings["app"])
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
        if max_replicas_per_node:
            scaling["max_replicas_per_node"] = max_replicas_per_node
        if routing == "multiplexed":  # Serve's plug-in point: a home replica per adapter (sticky_router.py)
            from ray.serve.config import RequestRouterConfig

            scaling["request_router_config"] = RequestRouterConfig(request_router_class=STICKY_ROUTER)
        replica = serve.deployment(LoraReplica, name=REPLICA_DEPLOYMENT, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                                   ray_actor_options={"num_cpus": REPLICA_CPUS}, health_check_period_s=5,
                                   health_check_timeout_s=60, graceful_shutdown_timeout_s=30, **scaling)
        ingress = serve.deployment(_ingress_class(), name="Ingress", ray_actor_options={"num_cpus": INGRESS_CPUS},
                                   max_ongoing_requests=1024)
        log.info("deploying %s replica(s) of %s (routing %s, max_loras=%d, max_cpu_loras=%d, max_lora_rank=%d)",
                 autoscaling or replicas, base_name, routing, max_loras, max_cpu_loras, max_lora_rank)
        deadline = time.monotonic() + ready_timeout_s
        serve.run(ingress.bind(replica.bind(settings), settings, environment), name=APP_NAME, route_prefix="/",
                  blocking=False)
        _wait_running(deadline)
        _wait_health(server.url.removesuffix("/v1") + "/health", deadline)
    except BaseException:  # includes Ctrl-C while starting
        server.stop()
        raise
    log.info("replicated server ready at %s", server.url)
    return server


def _wait_running(deadline: float) -> None:
    from ray import serve

    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise StageError(f"The replicas failed to start: {status.message}\n"
                             f"{ {n: d.message for n, d in status.deployments.items()} }")
        time.sleep(1.0)
    raise StageError(f"The replicas were not running before the timeout; last status: {status}")


def _wait_health(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise StageError(f"{url} did not answer before the timeout.")
