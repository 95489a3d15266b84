"""One Ray Serve replica: a vLLM engine (`AsyncLLM`) on the base model with LoRA slots, and vLLM's own OpenAI
request handlers in front of it.

Requests arrive from the ingress (serve/replicas/ingress.py) already authorised, validated and pinned: `model`
is the base's name or an immutable `NAME@V`. With multiplexed routing the ingress sends `NAME@V` as Serve's
multiplexed model id, so Serve prefers a replica that already holds the adapter.

Loading an adapter (`_load_adapter`, wrapped by `serve.multiplexed`) reuses the single server's pieces: the
catalog looks the version up (same rank and base checks), the verified cache hands the engine a read-only copy
checked against the version's manifest, never the registry folder. Serve's per-replica model cache is sized to
vLLM's CPU LoRA cache (`max_cpu_loras`), so Serve forgets an adapter about when vLLM evicts it, and nothing
unloads adapters from an async `__del__` (that raced the engine's shutdown). Every load is counted; the count
rides back on each response, and the ingress exposes it as `pipeline_adapter_loads_total{replica=...}`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time

from serve.server import SERVER_ENGINE_DEFAULTS

log = logging.getLogger(__name__)

# Set in the replica before vLLM is imported: the engine core inherits them.
ENGINE_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # several engines share the cores; pinning would stack them on one
    "TOKENIZERS_PARALLELISM": "false",
    **SERVER_ENGINE_DEFAULTS,  # the merged-weight LoRA path off, as in the single server (serve/server.py)
}


class LoraReplica:
    """The Serve deployment class (made a deployment by serve/replicas/app.py). `settings`: see ReplicaSettings."""

    def __init__(self, settings: dict):
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        from ray import serve

        from registry import open_registry
        from serve.catalog import AdapterCatalog
        from serve.replicas.leftovers import OwnerRecord, sweep
        from serve.verified import VerifiedCache

        removed = sweep()  # a replica that died on this node before us: its engine and segments go first
        if removed:
            log.info("removed %d shared-memory segment(s) left by a dead replica", len(removed))
        self.settings = settings
        self.base_name = settings["base_name"]
        self.name = serve.get_replica_context().replica_id.unique_id
        self.run_dir = tempfile.mkdtemp(prefix="pipeline-serve-run-")
        self.owner = OwnerRecord(self.run_dir, app=settings.get("app"))
        self.catalog = AdapterCatalog(
            open_registry(settings["registry_uri"]), base_fingerprint=settings["base_fingerprint"],
            base_name=self.base_name, ttl_s=settings["alias_ttl_s"], max_lora_rank=settings["max_lora_rank"],
            verified=VerifiedCache(os.path.join(self.run_dir, "verified"), base_dir=settings["base_dir"]))
        self.loads = 0
        self.requests = 0
        self._state = None
        self._state_lock = asyncio.Lock()
        started = time.perf_counter()
        starting = self.owner.watch()  # the engine core maps its segments while it starts: record them as they come
        try:
            self.engine = self._start_engine(settings)
        except BaseException:  # Serve retries with a new replica; what this engine start left goes now
            starting.set()
            self.owner.release()
            raise
        starting.set()
        self.owner.refresh()  # the engine core and its segments exist now
        log.info("replica %s: engine ready in %.1f s (pid %d)", self.name, time.perf_counter() - started, os.getpid())
        # dynamic multiplexing: Serve's model cache per replica is as large as vLLM's CPU LoRA cache
        # (a plain function: Serve keeps its model cache as an attribute of what it wraps, which a bound method
        # cannot hold)
        async def load_adapter(ref: str):
            return await self._load_adapter(ref)

        self._adapter = serve.multiplexed(max_num_models_per_replica=settings["max_cpu_loras"])(load_adapter)

    # ------------------------------------------------------------------------------------------ engine
    @staticmethod
    def _engine_cli_args(settings: dict) -> list[str]:
        args = ["--model", settings["base_dir"], "--served-model-name", settings["base_name"],
                "--enable-lora", "--max-loras", str(settings["max_loras"]),
                "--max-cpu-loras", str(settings["max_cpu_loras"]), "--max-lora-rank", str(settings["max_lora_rank"]),
                "--max-model-len", str(settings["max_model_len"]), "--dtype", settings["dtype"],
                "--kv-cache-memory-bytes", str(settings["kv_cache_bytes"]), "--disable-log-stats"]
        from ground.vllm_tool_parsers import tool_parser_args  # the single server's flags; app.py checked the name

        args += tool_parser_args(settings.get("tool_call_parser"), "serve.tool_call_parser")
        return args + (["--enforce-eager"] if settings.get("enforce_eager", True) else [])

    def _start_engine(self, settings: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cli_args = make_arg_parser(FlexibleArgumentParser()).parse_args(self._engine_cli_args(settings))
        return AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(self.cli_args))

    async def _handlers(self):
        """vLLM's OpenAI handlers on this engine, built on first use (they need the running event loop)."""
        if self._state is None:
            async with self._state_lock:
                if self._state is None:
                    from starlette.datastructures import State
                    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

                    state = State()
                    await init_app_state(self.engine, state, self.cli_args,
                                         supported_tasks=await self.engine.get_supported_tasks())
                    self._state = state
        return self._state

    async def check_health(self) -> None:
        """Serve calls this periodically; a dead engine makes Serve replace the replica."""
        if self.owner is not None:  # cheap; rewrites the record only when something changed
            await asyncio.to_thread(self.owner.refresh)
        await self.engine.check_health()

    def __del__(self):
        # Serve calls this when it stops the replica gracefully (also after a failed health check, when the
        # engine core is already dead). vLLM's shutdown SIGKILLs an engine core that has not exited 5 s after
        # SIGTERM (a busy engine on loaded cores), and an engine core killed by anything leaves its segments:
        # so after the shutdown the replica removes what its engine recorded, then the record (release()).
        engine = getattr(self, "engine", None)
        owner = getattr(self, "owner", None)
        if owner is not None and engine is not None:
            owner.refresh()
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # already dead: release() below stops what is left and removes its segments
                log.exception("replica %s: engine shutdown failed", getattr(self, "name", "?"))
            self.engine = None
        if owner is not None:
            try:
                owner.release()
            except Exception:  # the record stays: the command's sweep at stop, or the next start, tries again
                log.exception("replica %s: removing what the engine left failed", getattr(self, "name", "?"))
            self.owner = None

    # ------------------------------------------------------------------------------------------ adapters
    async def _load_adapter(self, ref: str):
        """NAME@V -> a LoRARequest loaded into this engine (verified copy first). Called by Serve's multiplexer,
        only on a miss in this replica's model cache."""
        from vllm.lora.request import LoRARequest

        from ground.vllm_lora import stable_lora_id

        resolved = await asyncio.to_thread(self.catalog.lookup, ref)
        path = await asyncio.to_thread(self.catalog.engine_path, resolved)
        lora = LoRARequest(lora_name=resolved.ref, lora_int_id=stable_lora_id(resolved.ref), lora_path=path,
                           base_model_name=self.base_name)
        await self.engine.add_lora(lora)
        self.loads += 1
        self.owner.refresh()
        log.info("replica %s: loaded %s (%d loads so far)", self.name, resolved.ref, self.loads)
        return lora

    async def _prepare(self, body: dict):
        """Make the request's adapter known to vLLM's handlers; returns an error result or None."""
        from ground.errors import RegistryError
        from serve.resolver import error_status

        self.requests += 1
        state = await self._handlers()
        model = body.get("model")
        if not isinstance(model, str) or not model or self.catalog.is_base(model):
            return None
        try:
            lora = await self._adapter(model)
            resolved = await asyncio.to_thread(self.catalog.lookup, model)
            # deleted or changed in the registry since this replica verified it: refused as by the single server
            await asyncio.to_thread(self.catalog.check_current, resolved)
        except RegistryError as exc:
            return self._error(int(error_status(exc)), str(exc))
        state.openai_serving_models.lora_requests[lora.lora_name] = lora
        return None

    # ------------------------------------------------------------------------------------------ requests
    def _meta(self, status: int) -> dict:
        return {"replica": self.name, "pid": os.getpid(), "loads": self.loads, "status": status}

    def _error(self, status: int, message: str) -> dict:
        from serve.middleware import ERROR_TYPES

        return {**self._meta(status), "body": {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"),
                                                         "param": None, "code": status}}}

    async def _call(self, kind: str, body: dict):
        """Run one request through vLLM's handler: (error result | None, response or SSE generator)."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        refused = await self._prepare(body)
        if refused is not None:
            return refused, None
        state = self._state
        try:
            if kind == "chat":
                out = await state.openai_serving_chat.create_chat_completion(ChatCompletionRequest(**body), None)
            else:
                out = await state.openai_serving_completion.create_completion(CompletionRequest(**body), None)
        except ValidationError as exc:
            return self._error(400, f"Invalid request: {exc.errors()[:3]}"), None
        except (ValueError, TypeError) as exc:
            return self._error(400, str(exc)[:500]), None
        if isinstance(out, ErrorResponse):
            return {**self._meta(out.error.code), "body": out.model_dump()}, None
        return None, out

    async def handle(self, kind: str, body: dict) -> dict:
        """A non-streamed request (`kind`: "completions" or "chat") -> {"status", "body", "replica", "loads"}."""
        refused, out = await self._call(kind, body)
        if refused is not None:
            return refused
        if not hasattr(out, "model_dump"):  # a generator although stream was not asked for: drain it
            return {**self._meta(200), "body": "".join([chunk async for chunk in out])}
        return {**self._meta(200), "body": out.model_dump()}

    async def stream(self, kind: str, body: dict):
        """A streamed request: first a dict like handle()'s (without body when status is 200), then SSE text."""
        refused, out = await self._call(kind, body)
        if refused is not None:
            yield refused
            return
        if hasattr(out, "model_dump"):
            yield {**self._meta(200), "body": out.model_dump()}
            return
        yield self._meta(200)
        async for chunk in out:
            yield chunk

    def info(self) -> dict:
        return {**self._meta(200), "requests": self.requests}
