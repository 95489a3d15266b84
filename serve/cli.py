"""`pipeline serve`: one OpenAI-compatible endpoint for a base model and every adapter in the registry;
`pipeline serve status`: what each adapter version of a running server answered (serve/version_metrics.py)."""

from __future__ import annotations

import signal

import click

from config.serve_schema import ServeConfig

from serve.auto_rollback import RolloutSettings
from serve.capture import DEFAULT_MAX_SHARD_MB, CaptureSettings, capture_env
from serve.lora_tier import DEFAULT_LORA_CACHE_GIB, MAX_CPU_LORAS_CAP
from serve.server import DEFAULT_LOOKUP_TIMEOUT_S, DEFAULT_MAX_N, ENV_LOOKUP_TIMEOUT, request_limits_env


ROLLOUT_DEFAULTS = RolloutSettings()  # the same defaults as serve.rollout.* (a test holds them equal)


@click.group("serve", invoke_without_command=True)
@click.option("--registry", "registry_uri", default=None,
              help="Registry: a folder, file:///path or mlflow+http(s)://HOST:PORT (default: $PIPELINE_REGISTRY, "
                   "then ./registry-store).")
@click.option("--base", "base", default="default", show_default=True,
              help="Base model folder, or `default` for the packaged SmolLM2-135M-Instruct.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar=["PIPELINE_SERVE_API_KEY", "VLLM_API_KEY"],
              help="Require `Authorization: Bearer KEY` (or set $PIPELINE_SERVE_API_KEY).")
@click.option("--max-loras", default=4, show_default=True, type=click.IntRange(1),
              help="Adapters that can run in one batch.")
@click.option("--max-cpu-loras", default=None, type=click.IntRange(1),
              help="Adapters kept loaded in host memory (default: as many as --lora-cache-gib holds); others are "
                   "read from disk again on use.")
@click.option("--lora-cache-gib", default=DEFAULT_LORA_CACHE_GIB, show_default=True, type=click.FloatRange(0),
              help="Host memory for loaded adapters: sets --max-cpu-loras from the registry's largest adapter on "
                   f"this base (never below --max-loras, at most {MAX_CPU_LORAS_CAP}).")
@click.option("--max-lora-rank", default=None, type=click.IntRange(1),
              help="Default: the registry's largest rank, rounded up to a value vLLM accepts.")
@click.option("--max-model-len", default=512, show_default=True, type=click.IntRange(16))
@click.option("--kv-cache-gib", default=ServeConfig.model_fields["kv_cache_gib"].default, show_default=True,
              type=click.FloatRange(0.01), help="KV-cache size in GiB (config: serve.kv_cache_gib).")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--served-name", default=None, help="The base model's name in requests (default: its folder name).")
@click.option("--alias-ttl", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Seconds an alias or latest-version lookup is reused (bounds how fast alias moves apply).")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(0.001),
              help="Largest request body in MiB; larger ones get 413 before they are read.")
@click.option("--lookup-timeout", default=DEFAULT_LOOKUP_TIMEOUT_S, show_default=True, type=click.FloatRange(0.1),
              envvar=ENV_LOOKUP_TIMEOUT, show_envvar=True,
              help="Seconds a request waits for the registry to resolve its model before a 503; what was resolved "
                   "before keeps being served while the registry does not answer.")
@click.option("--max-n", default=DEFAULT_MAX_N, show_default=True, type=click.IntRange(1),
              help="Largest `n` / `best_of` (completions per request); larger ones get 400.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1),
              help="vLLM replicas behind one endpoint; above 1 they run on Ray Serve (one engine each).")
@click.option("--ray-address", default=None,
              help="Run on Ray Serve in this Ray cluster (`auto`, HOST:PORT), even with one replica; with "
                   "--replicas > 1 alone a local Ray is started.")
@click.option("--routing", default="multiplexed", show_default=True, type=click.Choice(["multiplexed", "round_robin"]),
              help="With --replicas > 1: send each adapter to a replica that holds it, or plain Serve routing.")
@click.option("--min-replicas", default=None, type=click.IntRange(0),
              help="Autoscale between --min-replicas and --max-replicas (Ray Serve's autoscaler; runs on Ray Serve).")
@click.option("--max-replicas", default=None, type=click.IntRange(1))
@click.option("--target-ongoing-requests", default=None, type=click.FloatRange(0.01),
              help="Autoscaling target of requests in flight per replica.")
@click.option("--auto-rollback", is_flag=True,
              help="Take a route's candidate out of the route (weight 0, recorded in the registry's history) when it "
                   "breaches the error rate or latency ratio below (config: serve.rollout.*).")
@click.option("--rollout-window-s", default=ROLLOUT_DEFAULTS.window_s, show_default=True,
              type=click.FloatRange(0, min_open=True), help="Sliding window of --auto-rollback, in seconds.")
@click.option("--rollout-min-requests", default=ROLLOUT_DEFAULTS.min_requests, show_default=True,
              type=click.IntRange(1), help="Answers a candidate needs in the window before it is judged.")
@click.option("--rollout-max-error-rate", default=ROLLOUT_DEFAULTS.max_error_rate, show_default=True,
              type=click.FloatRange(0, 1), help="Largest share of 4xx/5xx answers a candidate may give.")
@click.option("--rollout-max-latency-ratio", default=ROLLOUT_DEFAULTS.max_latency_ratio, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Largest p90 end-to-end time of a candidate over the heaviest target's.")
@click.option("--tool-call-parser", default=None,
              help="vLLM's parser of the model's tool calls (e.g. `hermes`, the format multi_turn.format=hermes "
                   "trains); without one vLLM refuses every `tool_choice` but \"none\" (config: "
                   "serve.tool_call_parser).")
@click.option("--capture", "capture_dir", default=None, metavar="DIR",
              help="Record every answered chat/completion request in DIR (JSONL shards; off by default; config: "
                   "serve.capture.dir). Callers opt out with `x-capture: off`; feedback: POST /v1/feedback.")
@click.option("--capture-rate", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of answered requests captured (sampled at random).")
@click.option("--capture-redact", multiple=True, metavar="REGEX",
              help="Replace what matches by [REDACTED] in the captured text before it is written (repeatable).")
@click.option("--capture-redact-hook", default=None, metavar="MODULE:FUNCTION",
              help="A function str -> str applied to the captured text before it is written.")
@click.option("--capture-max-shard-mb", default=DEFAULT_MAX_SHARD_MB, show_default=True,
              type=click.FloatRange(0, min_open=True), help="A capture shard is closed and the next begun at this size.")
@click.pass_context
def serve_cmd(ctx, capture_dir, capture_rate, capture_redact, capture_redact_hook, capture_max_shard_mb,
              registry_uri, base, host, port, api_key, max_loras, max_cpu_loras, max_lora_rank, max_model_len,
              kv_cache_gib, dtype, served_name, alias_ttl, max_body_mb, replicas, ray_address, routing, min_replicas,
              max_replicas, target_ongoing_requests, lora_cache_gib, lookup_timeout, max_n, auto_rollback,
              rollout_window_s, rollout_min_requests, rollout_max_error_rate, rollout_max_latency_ratio,
              tool_call_parser):
    """Serve the base model and the registry's adapters behind one OpenAI-compatible endpoint.

    A request's `model` may be the base model's name, NAME (latest version; a route's pick when NAME has one),
    NAME@7 or NAME@ALIAS. Stop with Ctrl-C; the server and its engine processes are shut down and their shared
    memory removed. `pipeline serve status` shows what a running server answered per adapter version.
    """
    if ctx.invoked_subcommand is not None:  # `pipeline serve status ...`: the subcommand alone runs
        return
    from ground.errors import StageError
    from serve.auto_rollback import rollout_env
    from serve.server import start_server
    from ground.base_model import resolve_model_path
    from ground.vllm_tool_parsers import tool_parser_args

    tool_parser_args(tool_call_parser, "--tool-call-parser")  # refused before the base model is resolved
    rollout = rollout_env(RolloutSettings(
        window_s=rollout_window_s, min_requests=rollout_min_requests, max_error_rate=rollout_max_error_rate,
        max_latency_ratio=rollout_max_latency_ratio) if auto_rollback else None)
    # checked here, before any engine starts: an unwritable folder or a bad pattern is refused by name
    capture = capture_env(CaptureSettings(capture_dir, capture_rate, tuple(capture_redact), capture_redact_hook,
                                          capture_max_shard_mb) if capture_dir else None)
    base_dir = resolve_model_path(base)
    autoscaling = {k: v for k, v in [("min_replicas", min_replicas), ("max_replicas", max_replicas),
                                     ("target_ongoing_requests", target_ongoing_requests)] if v is not None}
    if replicas > 1 or autoscaling or ray_address:
        from serve.replicas.app import start_replicated

        _serve_replicated(lambda: start_replicated(
            base_dir, registry_uri, replicas=replicas, ray_address=ray_address, routing=routing,
            autoscaling=autoscaling, host=host, port=port, api_key=api_key, max_loras=max_loras,
            max_cpu_loras=max_cpu_loras, lora_cache_gib=lora_cache_gib, max_lora_rank=max_lora_rank,
            max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, dtype=dtype, base_name=served_name,
            alias_ttl_s=alias_ttl, max_body_mb=max_body_mb,
            request_limits={**request_limits_env(lookup_timeout, max_n), **rollout, **capture},
            tool_call_parser=tool_call_parser))
        return
    # SIGTERM (systemd, docker stop) takes the same clean path as Ctrl-C, also while the server starts
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        handle = start_server(base_dir, registry_uri, host=host, port=port, api_key=api_key, max_loras=max_loras,
                              max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank, max_model_len=max_model_len,
                              kv_cache_gib=kv_cache_gib, dtype=dtype, base_name=served_name, alias_ttl_s=alias_ttl,
                              max_body_mb=max_body_mb, lora_cache_gib=lora_cache_gib,
                              lookup_timeout_s=lookup_timeout, max_n=max_n, env={**rollout, **capture},
                              tool_call_parser=tool_call_parser)
    except KeyboardInterrupt:  # start_server already stopped the half-started server
        signal.signal(signal.SIGTERM, previous)
        click.echo("interrupted while starting; the server was stopped", err=True)
        return
    died_with = None
    try:
        click.echo(f"serving `{handle.base_name}` and registry adapters at {handle.url} (log: {handle.log_path}); "
                   f"Ctrl-C stops; host-memory adapter tier: {handle.lora_tier}")
        died_with = handle.wait()
    except KeyboardInterrupt:
        click.echo("stopping the server", err=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        handle.stop()
    if died_with is not None:
        raise StageError(f"The vLLM server exited on its own with code {died_with}; last lines of "
                         f"{handle.log_path}:\n{handle.log_tail()}")


@serve_cmd.command("status")
@click.option("--url", default="http://127.0.0.1:8000/v1", show_default=True,
              help="The server's address (its OpenAI base URL or its root).")
@click.option("--api-key", default=None, envvar=["PIPELINE_SERVE_API_KEY", "VLLM_API_KEY"],
              help="The server's key (or $PIPELINE_SERVE_API_KEY); /metrics needs it when the server has one.")
def status_cmd(url, api_key):
    """One line per adapter version and route target: requests, error rate, p50/p90 TTFT and end-to-end time,
    tokens, since the server started (its /metrics)."""
    from serve.version_metrics import fetch_metrics_text, stats_from_text

    stats = stats_from_text(fetch_metrics_text(url, api_key), by_route_target=True)
    if not stats:
        click.echo(f"no adapter requests answered yet by {url}")
        return
    click.echo(status_table(stats))


def status_table(stats: dict) -> str:
    """The `serve status` table from stats_from_text(..., by_route_target=True)."""
    def secs(value):
        return "-" if value is None else f"{value:.3f}"

    header = ("ADAPTER", "VERSION", "ROUTE TARGET", "REQUESTS", "ERRORS", "ERROR RATE", "TTFT P50", "TTFT P90",
              "E2E P50", "E2E P90", "PROMPT TOK", "COMPL TOK")
    rows = [header]
    for (adapter, version, target), s in sorted(stats.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        rows.append((adapter, "?" if version is None else str(version), target or "-", str(s.requests),
                     str(s.errors), f"{s.error_rate:.1%}", secs(s.ttft_p50),
                     secs(s.ttft_p90), secs(s.e2e_p50), secs(s.e2e_p90), str(s.prompt_tokens),
                     str(s.completion_tokens)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _serve_replicated(start) -> None:
    """Start the replicated server, serve until Ctrl-C/SIGTERM, stop it (Serve, Ray if ours, engines, /dev/shm)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    server = None
    try:
        server = start()
        how = f"{server.replicas} replica(s), routing {server.routing}"
        click.echo(f"serving `{server.base_name}` and registry adapters at {server.url} ({how}); Ctrl-C stops; "
                   f"host-memory adapter tier per replica: {server.lora_tier}")
        server.wait()
    except KeyboardInterrupt:
        click.echo("stopping the server", err=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
