"""`pipeline train [-c FILE] [key=value ...]`: stage the base model, then train (verl's main_ppo equivalent)."""

from __future__ import annotations

from pathlib import Path

import click

from ground.logs import log_to_file
from ground.new_files import refuse_registry_folder



@click.command("train")
@click.option("-c", "--config", "config_file", type=click.Path(), default=None,
              help="YAML config file (default: the embedded CPU demo).")
@click.argument("overrides", nargs=-1)
@click.option("--out-dir", type=click.Path(), default=None,
              help="Where the final adapter, history and outputs go (default: trainer.default_local_dir).")
@click.option("--force", is_flag=True, help="Start from scratch even where an earlier run left checkpoints or "
              "outputs, replacing them (default: refuse).")
@click.option("--fleet", "fleet_file", type=click.Path(), default=None,
              help="Train many adapters at once from a fleet YAML (shared config + fleet.members); see "
              "docs/training.md, 'Fleet training'.")
@click.option("--fail-fast", is_flag=True, help="With --fleet: stop every member at the first member failure.")
@click.option("--resume", is_flag=True, help="With --fleet: continue from the fleet's last checkpoint.")
def train_command(config_file, overrides, out_dir, force, fleet_file, fail_fast, resume):
    """Train a LoRA adapter with RL: FSDP2 actor workers on Ray, vLLM rollouts (no publishing)."""
    if fleet_file or fail_fast or resume:
        from ground.errors import ConfigError
        from pipeline.fleet_train import train_fleet

        if not fleet_file or config_file:
            raise ConfigError("--fail-fast and --resume go with --fleet FILE, and --fleet replaces -c: the fleet "
                              "YAML holds the shared config. Pass --fleet fleet.yaml alone.")
        train_fleet(fleet_file, list(overrides), out_dir, fail_fast=fail_fast, resume=resume, force=force)
        return
    from pipeline.runner import load_run_config
    from stages.stage_model import cleanup, stage_model
    from stages.start_adapter import check_start_adapter, resolve_start_adapter, with_start_folder
    from stages.train import train
    from stages.train.prepare_data import ensure_data

    cfg = load_run_config(config_file, overrides)
    # Before anything is written (data, pipeline.log, checkpoints): no output folder may be a registry.
    if out_dir:
        refuse_registry_folder(out_dir, "--out-dir")
    refuse_registry_folder(cfg.trainer.default_local_dir, "trainer.default_local_dir")
    ensure_data(cfg)  # a missing data file fails here, before any log file, model staging or Ray
    check_start_adapter(cfg)  # so does a lora_adapter_path that is neither a folder nor a registry reference
    out_root = Path(out_dir or cfg.trainer.default_local_dir)
    click.echo(f"log: {log_to_file(out_root / 'pipeline.log')}")
    start = resolve_start_adapter(cfg)
    if start.get("ref"):
        click.echo(f"start adapter: {start['reference']} = {start['ref']} from {start['registry']}")
    cfg = with_start_folder(cfg, start)  # training only ever sees a local folder
    staged = stage_model(cfg)
    try:
        outputs = train(cfg, staged["model_dir"], staged["fingerprint"], out_dir=out_dir,
                        replace_outputs=force)
    finally:
        cleanup(staged)  # the /dev/shm copy (use_shm) is removed unless keep_shm_copy
    click.echo(f"adapter: {outputs['adapter_dir']}")
    click.echo(f"validation reward: {outputs['val_reward_before']} -> {outputs['val_reward_after']} "
               f"after {outputs['steps']} steps ({outputs['seconds']:.0f} s)")
    click.echo(f"history: {outputs['history_path']}  mlflow run: {outputs['mlflow_run_id']}")
