"""`pipeline train --fleet fleet.yaml`: stage the base once, train every member of the fleet in one run
(stages/train/fleet), write `<out>/members/<name>/adapter` and `<out>/fleet_outcome.json`."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ground.errors import ConfigError, RegistryError


def check_member_names(fleet) -> None:
    """Each member publishes under its name: it must be a valid registry adapter name."""
    from registry.refs import check_name

    for spec in fleet.members:
        try:
            check_name(spec.name)
        except RegistryError as exc:
            raise ConfigError(f"{spec.where}: name: {exc}") from None


def resolve_start_folders(fleet) -> dict[int, str]:
    """{member index: local folder} of members with a start_adapter (a folder or NAME@alias/version)."""
    from stages.start_adapter import check_start_adapter, resolve_start_adapter

    folders = {}
    for spec in fleet.members:
        if not spec.start_adapter:
            continue
        try:
            check_start_adapter(spec.cfg)
            start = resolve_start_adapter(spec.cfg)
        except ConfigError as exc:
            raise ConfigError(f"{spec.where}: start_adapter: {exc}") from None
        if start.get("ref"):
            click.echo(f"{spec.name}: start adapter {start['reference']} = {start['ref']} from {start['registry']}")
        folders[spec.index] = start["path"]
    return folders


def train_fleet(fleet_file: str, overrides: list[str], out_dir: str | None, *, fail_fast: bool, resume: bool,
                force: bool) -> dict:
    from ground.logs import log_to_file
    from ground.new_files import refuse_registry_folder
    from stages.stage_model import cleanup, stage_model
    from stages.train.fleet.config import parse_fleet
    from stages.train.fleet.recipe import FleetRun

    if resume and force:
        raise ConfigError("--resume and --force contradict each other (continue the run, or start it over): "
                          "pass one of them.")
    fleet = parse_fleet(fleet_file, list(overrides))
    check_member_names(fleet)
    out = Path(out_dir or fleet.shared.trainer.default_local_dir).expanduser()
    refuse_registry_folder(str(out), "--out-dir" if out_dir else "trainer.default_local_dir")
    if force:  # start over: the earlier run's checkpoints, history, adapters and outcome go
        for name in ("checkpoints", "members", "history.jsonl", "fleet_outcome.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    click.echo(f"log: {log_to_file(out / 'pipeline.log')}")
    start_folders = resolve_start_folders(fleet)
    staged = stage_model(fleet.shared)
    try:
        outcome = FleetRun(fleet, staged["model_dir"], out, fail_fast=fail_fast, resume=resume,
                           start_folders=start_folders).run()
    finally:
        cleanup(staged)
    for name, member in outcome["members"].items():
        if member["status"] == "finished":
            click.echo(f"{name}: finished, adapter {member['adapter_dir']} (reward {member['metrics'].get('reward/mean', float('nan')):.3f})")
        else:
            error = member["error"] or {}  # its message was printed when it failed: said once, not twice
            click.echo(f"{name}: {member['status']} at step {error.get('step')} ({error.get('type')}; the error "
                       "is in fleet_outcome.json)" if error else f"{name}: {member['status']}")
    click.echo(f"fleet outcome: {out.resolve() / 'fleet_outcome.json'} after {outcome['steps']} steps")
    return outcome
