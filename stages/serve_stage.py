"""Stage 4 (optional): serve what the pipeline just published behind the multi-adapter endpoint.

By default the stage is a smoke test of the published version: start the server, ask the new version one
question through the official `openai` client, record the answer and stop. With `serve.keep_running=True`
it keeps serving in the foreground until Ctrl-C, which ends the stage normally.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from config import Config
from ground.errors import StageError

log = logging.getLogger(__name__)


def serve_published(cfg: Config, staged: dict, published: dict, stage_dir: Path) -> dict:
    if not cfg.serve.enable:
        return {"served": False, "reason": "serve.enable=False"}
    if not published.get("published"):
        return {"served": False, "reason": "nothing was published"}
    from openai import OpenAI

    from serve.server import request_limits_env, start_server

    s = cfg.serve
    rollout = {**rollout_environment(cfg), **capture_environment(cfg)}  # both ride on the server's environment
    max_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    registry_uri = published.get("registry") or cfg.registry.uri
    if s.replicas > 1 or s.autoscaling.as_dict() or s.ray_address:
        from serve.replicas.app import start_replicated

        handle = start_replicated(
            staged["model_dir"], registry_uri, replicas=s.replicas, ray_address=s.ray_address, routing=s.routing,
            autoscaling=s.autoscaling.as_dict(), host=s.host, port=s.port, api_key=s.api_key,
            max_loras=s.max_loras, max_cpu_loras=s.max_cpu_loras, lora_cache_gib=s.lora_cache_gib,
            kv_cache_gib=s.kv_cache_gib, max_model_len=max(256, max_len),
            request_limits={**request_limits_env(), **rollout}, tool_call_parser=s.tool_call_parser)
    else:
        handle = start_server(
            staged["model_dir"], registry_uri=registry_uri, host=s.host, port=s.port,
            api_key=s.api_key, max_loras=s.max_loras, max_cpu_loras=s.max_cpu_loras, lora_cache_gib=s.lora_cache_gib,
            kv_cache_gib=s.kv_cache_gib, max_model_len=max(256, max_len),
            log_path=stage_dir / "server.log", env=rollout, tool_call_parser=s.tool_call_parser,
        )
    with handle:
        client = OpenAI(base_url=handle.url, api_key=s.api_key or "none", max_retries=0, timeout=120)
        t0 = time.monotonic()
        try:
            reply = client.chat.completions.create(
                model=published["ref"], max_tokens=cfg.data.max_response_length, temperature=0,
                messages=[{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
            )
        except Exception as exc:
            raise StageError(f"The server started but {published['ref']} did not answer: {exc}. "
                             f"Server log: {stage_dir / 'server.log'}") from None
        answer = reply.choices[0].message.content
        outputs = {"served": True, "url": handle.url, "model": published["ref"], "answer": answer,
                   "first_request_seconds": round(time.monotonic() - t0, 3)}
        log.info("%s answered %r through %s", published["ref"], answer, handle.url)
        if s.keep_running:
            log.info("Serving on %s until Ctrl-C (model names: %s, NAME@VERSION, NAME@ALIAS)", handle.url,
                     published["name"])
            try:
                handle.wait()  # also keeps the server's shm owner record current (serve/shm_owners.py)
            except KeyboardInterrupt:
                log.info("Stopping the server")
    return outputs


def capture_environment(cfg: Config) -> dict[str, str]:
    """`serve.capture.*` as the serving process's environment (serve/capture.py); empty while `dir` is unset.
    The folder, the patterns and the hook are checked here, before the server starts."""
    from serve.capture import CaptureSettings, capture_env

    c = cfg.serve.capture
    return capture_env(CaptureSettings(c.dir, c.rate, tuple(c.redact), c.redact_hook, c.max_shard_mb)
                       if c.dir else None, source="serve.capture")


def rollout_environment(cfg: Config) -> dict[str, str]:
    """`serve.rollout.*` as the serving process's environment: with `auto_rollback` on, the server's own watcher
    takes a failing canary out of its route (serve/auto_rollback.py); empty when it is off."""
    from serve.auto_rollback import RolloutSettings, rollout_env

    r = cfg.serve.rollout
    return rollout_env(RolloutSettings(window_s=r.window_s, min_requests=r.min_requests,
                                       max_error_rate=r.max_error_rate, max_latency_ratio=r.max_latency_ratio)
                       if r.auto_rollback else None)
