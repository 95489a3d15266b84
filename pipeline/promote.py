"""`pipeline promote NAME --candidate canary --to prod`: gate a candidate version, then move the alias to it.

Two gates, each printing its figures and verdict:

- offline (always): the held-out reward of the candidate's version against the version `--to` points at now,
  measured in one engine on the same prompts with the same scorer (`pipeline.heldout`); the data and scorer
  are those the candidate's training validated on (its lineage), or `--data`. Refused when the candidate falls
  more than `--margin` below.
- online (with `--url`): the serving metrics of both versions (`serve.version_metrics.read_version_stats`):
  each needs at least `--min-requests`; the candidate's error rate may exceed the target's by at most
  `--max-error-rate-delta`, its p90 time to first token be at most `--max-ttft-ratio` times the target's.

On pass: `--to` moves to the candidate's version, a route on NAME is cleared (the whole name now goes to the
promoted version), and a `promote` event with both gates' figures goes into the registry's history. On fail:
nothing moves, and the command exits 2 with a message naming both figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from ground.errors import PipelineError


class GateRefused(PipelineError):
    """A promotion gate's verdict: the message names the candidate's and the target's figures."""


@dataclass
class Gate:
    name: str  # "offline" or "online"
    passed: bool
    figures: dict
    lines: list[str] = field(default_factory=list)  # what the command prints: figures, then the verdict
    why: str = ""  # on failure: the sentence for the error message


@dataclass
class Promotion:
    name: str
    alias: str
    before: int | None  # the version `alias` pointed at (None: it did not exist)
    after: int
    gates: list[Gate]
    route_cleared: bool = False


# ------------------------------------------------------------------------------------------------- offline
def offline_gate(candidate, target, evaluator, data, margin: float) -> Gate:
    """Held-out reward of candidate vs target (same engine, prompts and scorer); pass unless it falls > margin."""
    cand = evaluator.reward(candidate, data)
    figures = {"data": data.files, "prompts": cand["prompts"], "margin": margin,
               "candidate": {"ref": candidate.ref, "reward": cand["reward"], "acc": cand["acc"]}}
    lines = [f"offline gate: held-out reward on {cand['prompts']} prompts of {', '.join(data.files)} "
             f"(from {data.origin}), greedy",
             f"  candidate {candidate.ref}: {cand['reward']:.3f}"]
    if target is None:
        figures["target"] = None
        lines.append("  verdict: pass (no current version to compare with)")
        return Gate("offline", True, figures, lines)
    tgt = evaluator.reward(target, data)
    figures["target"] = {"ref": target.ref, "reward": tgt["reward"], "acc": tgt["acc"]}
    delta = cand["reward"] - tgt["reward"]
    figures["delta"] = delta
    lines.append(f"  target    {target.ref}: {tgt['reward']:.3f}")
    passed = delta >= -margin
    verdict = (f"pass ({delta:+.3f} >= -{margin})" if passed
               else f"refused: the candidate is {-delta:.3f} below the target, more than --margin {margin}")
    lines.append(f"  verdict: {verdict}")
    why = (f"the candidate {candidate.ref}'s held-out reward {cand['reward']:.3f} is {-delta:.3f} below "
           f"{target.ref}'s {tgt['reward']:.3f}, more than the margin {margin} (data: {', '.join(data.files)})")
    return Gate("offline", passed, figures, lines, "" if passed else why)


# -------------------------------------------------------------------------------------------------- online
def online_gate(candidate, target, stats: dict, *, min_requests: int, max_error_rate_delta: float,
                max_ttft_ratio: float) -> Gate:
    """Serving metrics of candidate vs target from `read_version_stats`'s {(adapter, version): stats}."""
    def figures_of(version) -> dict | None:
        s = stats.get((version.name, version.version)) if version is not None else None
        if s is None:
            return None
        return {"ref": version.ref, "requests": s.requests, "error_rate": s.error_rate, "ttft_p90": s.ttft_p90}

    cand, tgt = figures_of(candidate), figures_of(target)
    figures = {"candidate": cand, "target": tgt, "min_requests": min_requests,
               "max_error_rate_delta": max_error_rate_delta, "max_ttft_ratio": max_ttft_ratio}
    lines = ["online gate: serving metrics"]
    for label, version, f in (("candidate", candidate, cand), ("target   ", target, tgt)):
        if version is None:
            continue
        lines.append(f"  {label} {version.ref}: " + (
            "no requests" if f is None else
            f"{f['requests']} requests, error rate {f['error_rate']:.4f}, p90 TTFT " + _seconds(f["ttft_p90"])))
    problems = []
    for version, f in ((candidate, cand), (target, tgt)):
        if version is not None and (f is None or f["requests"] < min_requests):
            got = 0 if f is None else f["requests"]
            problems.append(f"{version.ref} has {got} requests, fewer than --min-requests {min_requests}")
    if not problems and tgt is not None:
        delta = cand["error_rate"] - tgt["error_rate"]
        figures["error_rate_delta"] = delta
        if delta > max_error_rate_delta:
            problems.append(f"the candidate's error rate {cand['error_rate']:.4f} exceeds the target's "
                            f"{tgt['error_rate']:.4f} by {delta:.4f}, more than --max-error-rate-delta "
                            f"{max_error_rate_delta}")
        if cand["ttft_p90"] is not None and tgt["ttft_p90"]:
            ratio = cand["ttft_p90"] / tgt["ttft_p90"]
            figures["ttft_ratio"] = ratio
            if ratio > max_ttft_ratio:
                problems.append(f"the candidate's p90 TTFT {_seconds(cand['ttft_p90'])} is {ratio:.2f}x the "
                                f"target's {_seconds(tgt['ttft_p90'])}, more than --max-ttft-ratio {max_ttft_ratio}")
    lines.append("  verdict: " + ("pass" if not problems else "refused: " + "; ".join(problems)))
    return Gate("online", not problems, figures, lines, "; ".join(problems))


def _seconds(value) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


# ---------------------------------------------------------------------------------------------------- apply
def promote(reg, name: str, candidate_ref: str, to: str, *, evaluator, data: str | None = None,
            margin: float = 0.0, stats: dict | None = None, min_requests: int = 100,
            max_error_rate_delta: float = 0.01, max_ttft_ratio: float = 1.5, reason: str = "",
            echo=click.echo) -> Promotion:
    """Run the gates (online only when `stats` is given), then move `to` onto the candidate's version.

    `candidate_ref` is an alias or a version number of `name`. Raises GateRefused (nothing moved) on a failed
    gate; each gate's lines go through `echo` first, so a refusal still shows both figures."""
    from pipeline.heldout import heldout_data

    candidate = reg.resolve(f"{name}@{candidate_ref}")
    target_version = reg.aliases(name).get(to)
    target = None if target_version is None else reg.get_version(name, target_version)
    if target is not None and target.version == candidate.version:
        raise PipelineError(f"`{name}@{to}` already points at {candidate.ref}, the candidate `{candidate_ref}`; "
                            "nothing to promote.")
    gates = [offline_gate(candidate, target, evaluator, heldout_data(candidate, data), margin)]
    if stats is not None:
        gates.append(online_gate(candidate, target, stats, min_requests=min_requests,
                                 max_error_rate_delta=max_error_rate_delta, max_ttft_ratio=max_ttft_ratio))
    for gate in gates:
        for line in gate.lines:
            echo(line)
    refused = [g for g in gates if not g.passed]
    if refused:
        raise GateRefused(f"Not promoting {candidate.ref} to `{name}@{to}`: "
                          + "; ".join(f"{g.name} gate: {g.why}" for g in refused) + ".")
    figures = {g.name: g.figures for g in gates}
    why = reason or f"promoted {candidate_ref} ({candidate.ref}) after the {' and '.join(g.name for g in gates)} gate(s)"
    reg.set_alias(name, to, candidate.version, reason=why)
    route = reg.get_route(name)
    if route is not None:  # the whole name now goes to the promoted version
        reg.clear_route(name, reason=why)
    reg.record_event(name, "promote", before={"alias": to, "version": target_version},
                     after={"alias": to, "version": candidate.version}, reason=why, figures=figures)
    return Promotion(name, to, target_version, candidate.version, gates, route_cleared=route is not None)


# ------------------------------------------------------------------------------------------------------ CLI
@click.command("promote")
@click.argument("name")
@click.option("--candidate", default="canary", show_default=True, help="Alias or version number to promote.")
@click.option("--to", "to", default="prod", show_default=True, help="The alias that moves to the candidate.")
@click.option("--margin", type=float, default=0.0, show_default=True,
              help="Refuse when the candidate's held-out reward is more than this below the target's.")
@click.option("--data", type=click.Path(), default=None,
              help="Held-out prompts (verl parquet/JSONL); default: data_files.val in the candidate's lineage.")
@click.option("--base", default=None, help="Base model folder (default: the candidate's lineage base_model).")
@click.option("--registry", "registry_uri", default=None, metavar="URI",
              help="Registry (a folder or mlflow+http://HOST:PORT; default $PIPELINE_REGISTRY, else ./registry-store).")
@click.option("--url", default=None, help="A running server's URL: also gate on its per-version metrics.")
@click.option("--api-key", default=None, envvar=["PIPELINE_SERVE_API_KEY", "VLLM_API_KEY"],
              help="The server's API key for /metrics (or $PIPELINE_SERVE_API_KEY).")
@click.option("--min-requests", type=int, default=100, show_default=True,
              help="Requests each version must have served (online gate).")
@click.option("--max-error-rate-delta", type=float, default=0.01, show_default=True,
              help="Candidate error rate minus the target's, at most (online gate).")
@click.option("--max-ttft-ratio", type=float, default=1.5, show_default=True,
              help="Candidate p90 time to first token over the target's, at most (online gate).")
@click.option("--reason", default="", help="Recorded in the history with the gate figures.")
def promote_cmd(name, candidate, to, margin, data, base, registry_uri, url, api_key, min_requests,
                max_error_rate_delta, max_ttft_ratio, reason):
    """Gate NAME@CANDIDATE against NAME@TO (held-out reward; serving metrics with --url), then move TO to it."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's start-up chatter would bury the gates
    from ground.base_model import resolve_model_path
    from pipeline.heldout import HeldoutEvaluator
    from registry import open_registry

    reg = open_registry(registry_uri)
    cand = reg.resolve(f"{name}@{candidate}")
    stats = None
    if url:
        from serve.version_metrics import read_version_stats

        stats = read_version_stats(url, api_key)
    base_dir = resolve_model_path(base or cand.lineage.get("base_model") or "default")
    ranks = [cand.rank] + ([reg.resolve(f"{name}@{to}").rank] if to in reg.aliases(name) else [])
    with HeldoutEvaluator(base_dir, max_rank=max(ranks)) as evaluator:
        done = promote(reg, name, candidate, to, evaluator=evaluator, data=data, margin=margin, stats=stats,
                       min_requests=min_requests, max_error_rate_delta=max_error_rate_delta,
                       max_ttft_ratio=max_ttft_ratio, reason=reason)
    before = f"{name}@{done.before}" if done.before is not None else "(none)"
    click.echo(f"promoted: {name}@{to} {before} -> {name}@{done.after}"
               + (f"; route of {name} cleared" if done.route_cleared else "") + "; recorded in the history")
