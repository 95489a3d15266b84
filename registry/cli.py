"""`pipeline registry ...`: publish, list, show, alias, verify, delete, import, export, push, copy, cleanup; route,
history and gc come from registry/cli_lifecycle.py."""

from __future__ import annotations

import json

import click

from ground.errors import RegistryError
from registry.cli_open import open_from_context as _open
from registry.refs import check_version, parse_ref


def _tags(pairs) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RegistryError(f"--tag {pair!r} is not of the form key=value, e.g. --tag team=rl.")
        tags[key] = value
    return tags


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, sort_keys=True, default=str))


@click.group("registry")
@click.option("--registry", "uri", default=None, metavar="URI",
              help="Registry location: a folder, file:///path, or an MLflow server mlflow+http://HOST:PORT "
                   "(mlflow+https:// for TLS). Default: -c config's registry.uri, $PIPELINE_REGISTRY, else "
                   "./registry-store.")
@click.option("-c", "--config", "config", type=click.Path(), default=None,
              help="Take registry.uri and trainer.mlflow_tracking_uri from this config.")
@click.option("--mlflow-tracking-uri", "tracking", default=None,
              help="Mirror into this MLflow Model Registry (default: $MLFLOW_TRACKING_URI when set).")
@click.pass_context
def registry_cli(ctx, uri, config, tracking):
    """Versioned LoRA adapters: references are NAME (latest), NAME@7 or NAME@ALIAS."""
    ctx.ensure_object(dict)
    ctx.obj.update(uri=uri, config=config, tracking=tracking)


@registry_cli.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--name", required=True, help="Adapter name (letters, digits, . _ -).")
@click.option("--base", "base_dir", type=click.Path(), default=None,
              help="Base model folder to check shapes and fingerprint against (default: the adapter config's "
                   "base_model_name_or_path when that is a local folder).")
@click.option("--alias", default=None, help="Point this alias at the new version.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Free-form tag (repeatable).")
@click.option("--parent-version", default=None, help="The version this adapter was trained from (N or NAME@N).")
@click.option("--json", "as_json", is_flag=True, help="Print the new version's metadata as JSON.")
@click.pass_context
def publish(ctx, adapter_dir, name, base_dir, alias, tags, parent_version, as_json):
    """Validate a PEFT LoRA folder and store it as the next version of NAME."""
    parent = int(parent_version) if parent_version and parent_version.isdigit() else parent_version
    av = _open(ctx).publish(adapter_dir, name, base_dir=base_dir, alias=alias, tags=_tags(tags), parent_version=parent)
    if as_json:
        _echo_json({"ref": av.ref, "path": str(av.path), "metadata": av.metadata})
    else:
        click.echo(f"published {av.ref}" + (f" (alias {alias})" if alias else "") + f": {av.path}")


@registry_cli.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(ctx, name, as_json):
    """List adapters, or the versions of NAME."""
    reg = _open(ctx)
    if name is None:
        rows = []
        for n in reg.list_adapters():
            versions = reg.store.version_numbers(n)
            rows.append({"name": n, "versions": len(versions), "latest": versions[-1], "aliases": reg.aliases(n)})
        if as_json:
            return _echo_json(rows)
        if not rows:
            return click.echo(f"no adapters in {reg.uri}")
        click.echo(f"{'ADAPTER':<32} {'VERSIONS':>8} {'LATEST':>6}  ALIASES")
        for r in rows:
            aliases = ", ".join(f"{a}->{v}" for a, v in sorted(r["aliases"].items()))
            click.echo(f"{r['name']:<32} {r['versions']:>8} {r['latest']:>6}  {aliases}")
        return
    aliases = reg.aliases(name)
    by_version: dict[int, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(v, []).append(a)
    rows = [{"ref": v.ref, "version": v.version, "created": v.metadata.get("created"), "rank": v.metadata.get("rank"),
             "alpha": v.metadata.get("alpha"), "aliases": sorted(by_version.get(v.version, [])),
             "run_id": v.lineage.get("run_id"), "base_fingerprint": v.base_fingerprint}
            for v in reg.list_versions(name)]
    if as_json:
        return _echo_json(rows)
    click.echo(f"{'VERSION':>7}  {'CREATED':<25} {'RANK':>4} {'ALPHA':>6}  {'BASE':<12} {'RUN':<20} ALIASES")
    for r in rows:
        click.echo(f"{r['version']:>7}  {r['created'] or '':<25} {r['rank']:>4} {r['alpha']:>6g}  "
                   f"{(r['base_fingerprint'] or '-')[:12]:<12} {str(r['run_id'] or '-')[:20]:<20} {', '.join(r['aliases'])}")


@registry_cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx, ref, as_json):
    """Metadata, lineage and file hashes of one version."""
    reg = _open(ctx)
    av = reg.resolve(ref)
    from registry.integrity import manifest_files, read_regular

    manifest_path = av.path / "manifest.json"
    try:
        files = manifest_files(av.ref, json.loads(read_regular(manifest_path, av.ref)), str(manifest_path))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{av.ref}: {manifest_path} is unreadable ({exc.__class__.__name__}); run "
                            f"`pipeline registry verify {av.ref}`.") from None
    manifest = {"files": files}
    pointing = sorted(a for a, v in reg.aliases(av.name).items() if v == av.version)
    info = {"ref": av.ref, "path": str(av.path), "aliases": pointing, "metadata": av.metadata,
            "files": manifest["files"]}
    if as_json:
        return _echo_json(info)
    md = av.metadata
    click.echo(f"{av.ref}  ({', '.join(pointing) or 'no aliases'})\n  path: {av.path}")
    for key in ("created", "base_model", "base_fingerprint", "rank", "alpha", "target_modules", "num_parameters",
                "parent_version"):
        click.echo(f"  {key}: {md.get(key)}")
    for section in ("lineage", "metrics", "tags"):
        if md.get(section):
            click.echo(f"  {section}:")
            for k, v in sorted(md[section].items()):
                click.echo(f"    {k}: {v}")
    click.echo("  files:")
    for fname, entry in sorted(manifest["files"].items()):
        click.echo(f"    {fname}  {entry['size']} B  sha256:{entry['sha256']}")


@registry_cli.group()
def alias():
    """Move or delete aliases (NAME@ALIAS)."""


@alias.command("set")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.argument("version")
@click.pass_context
def alias_set(ctx, name, alias_name, version):
    """Point ALIAS of NAME at VERSION (atomically)."""
    _open(ctx).set_alias(name, alias_name, check_version(version))
    click.echo(f"{name}@{alias_name} -> {version}")


@alias.command("delete")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.pass_context
def alias_delete(ctx, name, alias_name):
    """Delete ALIAS of NAME."""
    _open(ctx).delete_alias(name, alias_name)
    click.echo(f"deleted alias {name}@{alias_name}")


@registry_cli.command()
@click.argument("ref", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def verify(ctx, ref, as_json):
    """Recompute every hash (of REF, or of the whole registry); exits non-zero on any problem."""
    report = _open(ctx).verify(ref)
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(f"checked {len(report.checked)} version(s)")
        for p in report.problems:
            click.echo(f"  PROBLEM {p}")
    if not report.ok:
        raise RegistryError(f"verify found {len(report.problems)} problem(s); re-publish or delete the affected "
                            "versions (`pipeline registry delete NAME@VERSION --force`).")
    if not as_json:
        click.echo("all files match their manifests")


@registry_cli.command()
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--force", is_flag=True, help="Also delete aliases pointing at the version.")
@click.pass_context
def delete(ctx, ref, force):
    """Delete one version (refused while an alias points at it, unless --force). Its number is never reused."""
    name, version, alias_name = parse_ref(ref)
    if version is None:
        raise RegistryError(f"`delete {ref}` needs an explicit version, e.g. `{name}@3`, so nothing is deleted by accident.")
    _open(ctx).delete_version(name, version, force=force)
    click.echo(f"deleted {name}@{version}")


@registry_cli.command("import")
@click.argument("src")
@click.option("--name", required=True)
@click.option("--base", "base_dir", type=click.Path(), default=None)
@click.option("--alias", default=None)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.pass_context
def import_cmd(ctx, src, name, base_dir, alias, tags, revision):
    """Publish an existing PEFT adapter from a local folder or a Hugging Face repo id (OWNER/NAME)."""
    av = _open(ctx).import_adapter(src, name, base_dir=base_dir, alias=alias, tags=_tags(tags), revision=revision)
    click.echo(f"imported {src} as {av.ref}: {av.path}")


@registry_cli.command()
@click.argument("ref")
@click.option("--out", "out_dir", required=True, type=click.Path())
@click.option("--merge", is_flag=True, help="Merge into the base: one full safetensors model.")
@click.option("--base", "base_dir", type=click.Path(), default=None, help="Base folder for --merge (default: the "
              "one recorded at publish).")
@click.pass_context
def export(ctx, ref, out_dir, merge, base_dir):
    """Copy a version's PEFT files to DIR, or merge it into its base model (--merge)."""
    path = _open(ctx).export(ref, out_dir, merge=merge, base_dir=base_dir)
    click.echo(f"exported {ref}{' (merged)' if merge else ''} to {path}")


@registry_cli.command()
@click.argument("ref")
@click.option("--hub", "repo_id", required=True, metavar="OWNER/NAME")
@click.option("--private", is_flag=True, default=None)
@click.pass_context
def push(ctx, ref, repo_id, private):
    """Upload a version's PEFT files and metadata to a Hugging Face Hub model repo."""
    url = _open(ctx).push(ref, repo_id, private=private)
    click.echo(f"pushed {ref} to {repo_id}: {url}")


@registry_cli.command()
@click.argument("src_uri")
@click.argument("dst_uri")
@click.argument("names", nargs=-1)
@click.pass_context
def copy(ctx, src_uri, dst_uri, names):
    """Copy adapters (default: all) from SRC_URI to DST_URI with their numbers, aliases, lineage and hashes.

    Repeating a copy skips versions already there with the same files; e.g. a local registry to a server:
    pipeline registry copy ./registry-store mlflow+http://mlflow.internal:5000
    """
    from registry import open_registry
    from registry.copy import copy_registry

    src, dst = open_registry(src_uri, mirror_mlflow=False), open_registry(dst_uri, mirror_mlflow=False)
    if src.uri == dst.uri:
        raise RegistryError(f"copy: source and destination are the same registry ({src.uri}).")
    report = copy_registry(src, dst, list(names) or None)
    for name, aliases in sorted(report.aliases.items()):
        copied = [r for r in report.copied if r.startswith(f"{name}@")]
        skipped = [r for r in report.skipped if r.startswith(f"{name}@")]
        alias_text = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or "no aliases"
        route = report.routes.get(name)
        route_text = ("route " + " ".join(f"{t}={w}" for t, w in route["targets"].items())) if route else "no route"
        click.echo(f"{name}: copied {len(copied)} version(s), {len(skipped)} already there; {alias_text}; "
                   f"{route_text}; {report.events.get(name, 0)} history event(s) added")
    click.echo(f"copied {len(report.copied)} version(s) from {src.uri} to {dst.uri}")


@registry_cli.command()
@click.option("--older-than", "older_than", type=float, default=None, metavar="SECONDS",
              help="Also remove unfinished uploads / work folders older than this, whatever their writer "
                   "(default: only those whose writer is gone, or older than 6 h on a server, 1 day locally).")
@click.pass_context
def cleanup(ctx, older_than):
    """Report and remove what interrupted publishes left behind (staged uploads, work folders)."""
    reg = _open(ctx)
    lines = reg.cleanup(older_than)
    for line in lines:
        click.echo(f"  {line}")
    click.echo(f"cleanup of {reg.uri}: {len(lines)} leftover(s) handled")


# route set|show|clear, history, gc: registry/cli_lifecycle.py (the top-level `pipeline rollback` lives there too)
from registry.cli_lifecycle import add_lifecycle_commands  # noqa: E402

add_lifecycle_commands(registry_cli)
