"""The one endpoint in front of the replicas: a FastAPI app wrapped in the single server's own middleware.

`RegistryRefMiddleware` (serve/middleware.py) is the outermost layer here exactly as in the single vLLM server:
API key and closed routes (serve/access.py), bounded bodies, JSON checks, pinning `NAME` / `NAME@alias` to
`NAME@V` through the catalog, and the registry listing on `GET /v1/models`. It reads its settings from the
process environment, which `Ingress.__init__` sets before the app's middleware stack is built (on the first
request). So there is no second implementation of pinning, validation or access: the routes below only see
requests that passed, with `model` already pinned, and the same answers for the same requests: every refusal
made before a request reaches an engine is the middleware's, and what a replica's vLLM refuses by raising is
answered as vLLM's own server answers it (`_refusal_of`). `tests/serve/test_same_answers.py` checks both modes
with one table of requests.

Routing: with `routing="multiplexed"` the pinned `NAME@V` is Serve's multiplexed model id, so Serve sends a
request to a replica that already holds the adapter when one has room; `round_robin` sends no id (plain Serve
routing, for comparison). Requests for the base model carry no id in either mode.

`/health` answers 503 until at least one engine replica is RUNNING (Serve's own replica state), then 200, so a
load balancer in front sends nothing that no engine could answer (scaled to zero by the autoscaler, the running
application stays 200: a request is what makes Serve start a replica).

A dead replica costs no request: a call that fails because its replica died (or its engine did) before a byte
was answered is sent again, with a short pause while Serve notices and routes around it. A streamed request
is retried only until its first chunk arrived; after that the client sees the stream end early.
"""


import asyncio
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-served-by-replica"
RETRY_BUDGET_S = 120.0  # a replica restart (engine start) takes ~30-60 s on 2 busy cores
RETRY_PAUSE_S = 0.5
REPLICA_DEPLOYMENT = "LoraReplica"  # the engine deployment's name (serve/replicas/app.py)
HEALTH_CACHE_S = 1.0


def _retryable(exc: BaseException) -> bool:
    """The replica (or its engine) died under the call: nothing was answered, so sending it again is safe."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return True
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        return type(cause).__name__ in ("EngineDeadError", "EngineGenerateError")
    return False


def _refusal_of(exc: BaseException) -> Response | None:
    """A request that vLLM refused by raising inside the replica (`n` > 1 with greedy sampling raises a
    VLLMValidationError there): the answer the single server gives for the same exception, built by vLLM's own
    `create_error_response`, so both modes answer alike (it was a 500 here). None for server faults (5xx)."""
    from ray.exceptions import RayTaskError

    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    if not isinstance(cause, Exception):
        return None
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    error = create_error_response(cause)
    if error.error.code >= 500:
        return None
    return JSONResponse(error.model_dump(), status_code=error.error.code)


def _ingress_class():
    from ray import serve

    from serve.capture import ENV_PROXY_REQUEST_IDS

    @serve.ingress()
    class Ingress:
        def __init__(self, replica, settings: dict, environment: dict):
            os.environ.update(environment)  # read by the middleware and its catalog (see serve.catalog.get_catalog)
            # Serve's proxy gives every request an `x-request-id` and always sends it back: the capture uses that
            # one (a second header of ours would reach the caller as "ours, Serve's")
            os.environ[ENV_PROXY_REQUEST_IDS] = "1"
            self.replica = replica
            self.settings = settings
            self.base_name = settings["base_name"]
            self.routing = settings["routing"]
            self.loads: dict[str, int] = {}  # replica -> adapter loads it reported last (its own counter)
            self.served: dict[str, int] = {}  # replica -> requests it answered
            self.retries = 0
            self.started = int(time.time())
            self._health, self._health_checked_at = (False, 0, 0), -HEALTH_CACHE_S

        def __serve_build_asgi_app__(self):
            """Called by Serve after __init__: the environment is set, so the middleware reads the right one."""
            from serve.middleware import RegistryRefMiddleware

            app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
            app.add_middleware(RegistryRefMiddleware)

            @app.get("/health")
            async def health() -> Response:
                ready, running, wanted = await self._replicas_running()
                if ready:
                    return Response(status_code=200)
                # a load balancer must not send traffic yet: no engine could answer it
                return JSONResponse({"error": {"message": f"no replica is ready yet ({running} of {wanted} running)",
                                               "type": "ServiceUnavailableError", "param": None, "code": 503}},
                                    status_code=503)

            @app.get("/ping")
            async def ping() -> Response:
                return Response(status_code=200)

            @app.get("/v1/models")
            async def models() -> JSONResponse:
                # the base card; the middleware appends every servable registry reference
                return JSONResponse({"object": "list", "data": [
                    {"id": self.base_name, "object": "model", "created": self.started, "owned_by": "lora-pipeline",
                     "root": self.base_name, "parent": None}]})

            @app.post("/v1/completions")
            async def completions(request: Request) -> Response:
                return await self._forward("completions", await request.json())

            @app.post("/v1/chat/completions")
            async def chat(request: Request) -> Response:
                return await self._forward("chat", await request.json())

            @app.get("/metrics")
            async def metrics() -> PlainTextResponse:
                return PlainTextResponse(self._metrics_text(), media_type="text/plain; version=0.0.4")

            return app

        async def _replicas_running(self) -> tuple[bool, int, int]:
            """(ready, replicas of the engine deployment that are RUNNING, replicas wanted), from Serve's
            controller; cached for a second so that a busy health checker costs the controller little."""
            now = time.monotonic()
            if now - self._health_checked_at > HEALTH_CACHE_S:
                from ray import serve

                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(serve.get_replica_context().app_name)
                deployment = app.deployments.get(REPLICA_DEPLOYMENT) if app else None
                states = deployment.replica_states if deployment else {}
                running = int(states.get("RUNNING", 0))
                wanted = max(running, sum(int(n) for n in states.values()))
                # scaled to zero by the autoscaler (min_replicas=0) the application is RUNNING with no replica:
                # it is ready, since a request makes Serve start one
                ready = running > 0 or (app is not None and app.status == "RUNNING")
                self._health = (ready, running, wanted)
                self._health_checked_at = now
            return self._health

        def _metrics_text(self) -> str:
            lines = ["# HELP pipeline_adapter_loads_total Adapters loaded into a replica's engine (registry -> "
                     "verified copy -> engine), as last reported by the replica.",
                     "# TYPE pipeline_adapter_loads_total counter"]
            lines += [f'pipeline_adapter_loads_total{{replica="{r}"}} {n}' for r, n in sorted(self.loads.items())]
            lines += ["# HELP pipeline_replica_requests_total Requests each replica answered.",
                      "# TYPE pipeline_replica_requests_total counter"]
            lines += [f'pipeline_replica_requests_total{{replica="{r}"}} {n}' for r, n in sorted(self.served.items())]
            lines += ["# HELP pipeline_request_retries_total Requests sent again because their replica died.",
                      "# TYPE pipeline_request_retries_total counter", f"pipeline_request_retries_total {self.retries}"]
            return "\n".join(lines) + "\n"

        # -------------------------------------------------------------------------------- forwarding
        def _handle_for(self, body: dict, stream: bool):
            handle = self.replica.options(stream=True) if stream else self.replica
            model = body.get("model")
            if self.routing == "multiplexed" and isinstance(model, str) and model and model != self.base_name:
                handle = handle.options(multiplexed_model_id=model)
            return handle

        def _note(self, meta: dict) -> dict:
            name = meta["replica"]
            self.loads[name] = max(self.loads.get(name, 0), int(meta.get("loads", 0)))
            self.served[name] = self.served.get(name, 0) + 1
            return {REPLICA_HEADER: name}

        async def _until_answered(self, attempt, deadline: float):
            """`await attempt()` again while it fails because its replica (or engine) died, until `deadline`."""
            while True:
                try:
                    return await attempt()
                except Exception as exc:
                    if not _retryable(exc) or time.monotonic() > deadline:
                        raise
                    self.retries += 1
                    log.warning("a replica died under a request (%s); sending it again", type(exc).__name__)
                    await asyncio.sleep(RETRY_PAUSE_S)

        async def _forward(self, kind: str, body: dict) -> Response:
            deadline = time.monotonic() + RETRY_BUDGET_S
            try:
                if body.get("stream"):
                    return await self._forward_stream(kind, body, deadline)
                return await self._forward_whole(kind, body, deadline)
            except Exception as exc:
                refusal = _refusal_of(exc)
                if refusal is None:
                    raise
                return refusal

        async def _forward_whole(self, kind: str, body: dict, deadline: float) -> Response:
            result = await self._until_answered(
                lambda: self._handle_for(body, stream=False).handle.remote(kind, body), deadline)
            headers = self._note(result)
            if isinstance(result["body"], str):
                return Response(result["body"], status_code=result["status"], headers=headers)
            return JSONResponse(result["body"], status_code=result["status"], headers=headers)

        async def _forward_stream(self, kind: str, body: dict, deadline: float) -> Response:
            async def first_chunk():  # the stream's first item says who answered and how
                started = self._handle_for(body, stream=True).stream.remote(kind, body)
                return started, await started.__anext__()

            chunks, meta = await self._until_answered(first_chunk, deadline)
            headers = self._note(meta)
            if "body" in meta:  # refused, or answered whole
                return JSONResponse(meta["body"], status_code=meta["status"], headers=headers)

            async def rest():
                async for chunk in chunks:
                    yield chunk

            return StreamingResponse(rest(), media_type="text/event-stream", headers=headers)

    return Ingress
