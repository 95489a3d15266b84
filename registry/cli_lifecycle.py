"""`pipeline registry route set|show|clear`, `pipeline registry history`, `pipeline registry gc`, and the top-level
`pipeline rollback NAME ALIAS`: the lifecycle half of the registry's CLI (registry/cli.py holds the rest)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone

import click

from registry.cli_open import open_from_context as _open
from registry.routes import parse_weight_args


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


@click.group()
def route():
    """Traffic splits of a bare NAME between aliases or versions (sticky per caller)."""


@route.command("set")
@click.argument("name")
@click.argument("weights", nargs=-1, required=True, metavar="TARGET=WEIGHT...")
@click.option("--mirror", default=None, metavar="TARGET",
              help="Also send each request to this alias or version; its answers are recorded, never returned.")
@click.option("--reason", default="", help="Why, for `pipeline registry history`.")
@click.pass_context
def route_set(ctx, name, weights, mirror, reason):
    """Send requests for NAME to weighted targets, e.g. `route set NAME prod=90 canary=10` (weights sum to 100)."""
    new = _open(ctx).set_route(name, parse_weight_args(name, weights), mirror=mirror, reason=reason)
    click.echo(f"route of {name} (revision {new.revision}): {new.describe()}")


@route.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def route_show(ctx, name, as_json):
    """The route of NAME and the version each target points at now."""
    reg = _open(ctx)
    current = reg.get_route(name)
    aliases = reg.aliases(name)

    def version_of(target: str):
        return int(target) if target.isdigit() else aliases.get(target)

    if as_json:
        if current is None:
            return _echo_json(None)
        return _echo_json({**current.to_dict(), "versions": {t: version_of(t) for t, _ in current.targets},
                           "mirror_version": version_of(current.mirror) if current.mirror else None})
    if current is None:
        latest = reg.resolve(name).version
        return click.echo(f"{name}: no route; requests for {name} go to the latest version ({name}@{latest})")
    when = datetime.fromtimestamp(current.updated_at, timezone.utc).isoformat(timespec="seconds")
    click.echo(f"{name}: revision {current.revision}, set {when}")
    for target, weight in current.targets:
        click.echo(f"  {weight:>3}%  {target:<20} -> {name}@{version_of(target)}")
    if current.mirror:
        click.echo(f"  mirror {current.mirror:<18} -> {name}@{version_of(current.mirror)} (answers recorded, never "
                   "returned)")


@route.command("clear")
@click.argument("name")
@click.option("--reason", default="", help="Why, for `pipeline registry history`.")
@click.pass_context
def route_clear(ctx, name, reason):
    """Remove the route: requests for NAME go to the latest version again."""
    reg = _open(ctx)
    had = reg.get_route(name)
    reg.clear_route(name, reason=reason)
    click.echo(f"cleared the route of {name} ({had.describe()})" if had else f"{name} has no route; nothing to clear")


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx, name, as_json):
    """Every alias move, route change, promotion and rollback of NAME, oldest first."""
    events = _open(ctx).history(name)
    if as_json:
        return _echo_json([asdict(e) for e in events])
    if not events:
        return click.echo(f"{name}: no recorded events")
    for event in events:
        click.echo(event.summary())


@click.command("gc")
@click.argument("name")
@click.option("--keep-last", "keep_last", type=int, required=True, metavar="N",
              help="Keep the newest N versions, whatever points at them.")
@click.option("--yes", is_flag=True, help="Delete (without it, only list what would be deleted).")
@click.option("--drop-parents", is_flag=True, help="Also delete versions a kept version was trained from.")
@click.pass_context
def gc_cmd(ctx, name, keep_last, yes, drop_parents):
    """Delete old versions of NAME, never one an alias or the route points at, nor a kept version's parent."""
    reg = _open(ctx)
    doomed = reg.gc(name, keep_last, delete=yes, drop_parents=drop_parents)
    refs = ", ".join(f"{name}@{v}" for v in doomed) or "nothing"
    if yes:
        click.echo(f"deleted {len(doomed)} version(s): {refs}")
    else:
        click.echo(f"would delete {len(doomed)} version(s): {refs}\n(dry run: nothing was deleted; add --yes to "
                   "delete)")


@click.command("rollback")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--registry", "uri", default=None, metavar="URI",
              help="Registry location (default: $PIPELINE_REGISTRY, else ./registry-store).")
@click.option("--reason", default="", help="Why, for `pipeline registry history`.")
def rollback_cmd(name, alias_name, uri, reason):
    """Move ALIAS of NAME back to the version it pointed at before its last move (from the history)."""
    from registry import open_registry

    before, after = open_registry(uri).rollback(name, alias_name, reason=reason)
    click.echo(f"rolled back {name}@{alias_name}: {before if before is not None else '-'} -> {after}")


def add_lifecycle_commands(group: click.Group) -> None:
    for command in (route, history, gc_cmd):
        group.add_command(command)
