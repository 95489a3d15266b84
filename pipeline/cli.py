"""The `pipeline` command line. Errors a user can cause print as one message, without a traceback."""

from __future__ import annotations

import logging
import sys

import click

from ground.errors import PipelineError
from ground.mlflow_uri import redact_text
from ground.logs import log_to_file, setup_logging
from ground.new_files import refuse_registry_folder

CONFIG_OPTION = click.option("-c", "--config", "config_file", type=click.Path(), default=None,
                             help="YAML config file (default: the embedded CPU demo).")
OVERRIDES = click.argument("overrides", nargs=-1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Everything on the console (default: progress, results and "
                                                    "warnings; the rest goes to the run's pipeline.log).")
def main(verbose: bool) -> None:
    """The lifecycle of LoRA adapters: stage a base model, train with RL, publish, serve."""
    setup_logging(verbose)


@main.command()
@click.argument("pipeline_name", metavar="PIPELINE")
@CONFIG_OPTION
@OVERRIDES
@click.option("--run-dir", type=click.Path(), default=None, help="Run directory (default: ./runs/<pipeline>-<time>).")
@click.option("--resume", "resume_dir", type=click.Path(), default=None, help="Continue the run in this directory.")
def run(pipeline_name, config_file, overrides, run_dir, resume_dir):
    """Run PIPELINE (see `pipeline stages`) with a config and key=value overrides."""
    from pipeline.pipelines import PIPELINES
    from pipeline.runner import Run, load_run_config

    if pipeline_name not in PIPELINES:
        raise PipelineError(f"Unknown pipeline `{pipeline_name}`; known: {', '.join(PIPELINES)}.")
    if resume_dir:
        if config_file or overrides:
            raise PipelineError("--resume reuses the run's saved config; drop -c and the overrides.")
        the_run = Run.resume(PIPELINES, resume_dir)
        if the_run.pipeline.name != pipeline_name:
            raise PipelineError(f"Run `{resume_dir}` is a `{the_run.pipeline.name}` run, not `{pipeline_name}`.")
    else:
        keep_fleet = None
        if pipeline_name == "train-fleet":  # -c is a fleet YAML: shared config + fleet.members
            from pipeline.fleet_pipeline import load_fleet_for_run

            cfg, keep_fleet = load_fleet_for_run(config_file, overrides)
        else:
            cfg = load_run_config(config_file, overrides)
        # Before the stages' checks, which may write the demo's data: a run never writes into a registry.
        refuse_registry_folder(run_dir or "runs", "--run-dir" if run_dir else "The default run folder ./runs")
        PIPELINES[pipeline_name].check(cfg)  # e.g. a missing data file: before the run directory and any stage
        the_run = Run.create(PIPELINES[pipeline_name], cfg, run_dir)
        if keep_fleet:
            keep_fleet(the_run.run_dir)
    from pipeline.tracking import make_tracking

    from pipeline.report import write_report

    click.echo(f"run directory: {the_run.run_dir}")
    click.echo(f"log: {log_to_file(the_run.run_dir / 'pipeline.log')}")
    try:
        outputs = the_run.execute(tracking_factory=make_tracking)
    finally:
        try:
            click.echo(f"report: {write_report(the_run.run_dir)}")
        except Exception as exc:  # a report problem must not hide the run's own outcome
            logging.getLogger(__name__).warning("could not write the report: %s", exc)
    click.echo(f"pipeline {pipeline_name}: succeeded ({the_run.run_dir})")
    for stage, out in outputs.items():
        click.echo(f"  {stage}: " + ", ".join(f"{k}={v}" for k, v in out.items() if not isinstance(v, (dict, list))))


@main.command()
def stages():
    """List the known pipelines and their stages."""
    from pipeline.pipelines import PIPELINES

    for p in PIPELINES.values():
        click.echo(f"{p.name}: {p.description}")
        for i, s in enumerate(p.stages, 1):
            click.echo(f"  {i}. {s.name}: {s.description}")


@main.group()
def config():
    """Inspect configs."""


@config.command("show")
@CONFIG_OPTION
@OVERRIDES
def config_show(config_file, overrides):
    """Print the resolved config as YAML (checked as `pipeline run` checks it: a misspelt name fails here too)."""
    from pipeline.runner import load_run_config

    click.echo(load_run_config(config_file, overrides).to_yaml(), nl=False)


@main.group()
def runs():
    """Inspect pipeline runs (from their manifests)."""


@runs.command("list")
@click.option("--root", default="runs", show_default=True, help="Folder holding the run directories.")
def runs_list(root):
    """One line per run: id, pipeline, status, base -> adapter reward, published reference."""
    from pipeline.report import list_runs

    rows = list_runs(root)
    if not rows:
        click.echo(f"no runs under {root}/")
    for r in rows:
        rewards = f"{r['start_reward']:.3f} -> {r['adapter_reward']:.3f}" if r["adapter_reward"] is not None else "-"
        click.echo(f"{r['run_id']:<48} {r['pipeline']:<18} {r['status']:<12} reward {rewards:<16} {r['published_ref'] or '-'}")


@runs.command("show")
@click.argument("run")
@click.option("--root", default="runs", show_default=True)
def runs_show(run, root):
    """Show RUN (a run directory or a run id under --root): stages, before/after, timings, published ref."""
    from pathlib import Path

    from pipeline.report import render_text, summary

    run_dir = Path(run) if Path(run).is_dir() else Path(root) / run
    click.echo("\n".join(render_text(summary(run_dir))))


def cli_entry(args: list[str] | None = None) -> int:
    """Run the CLI; a PipelineError prints its message and exits 2, Ctrl-C exits 130."""
    try:
        main.main(args=args, standalone_mode=False)
    except PipelineError as exc:  # a URI in the message is shown without user-info or query, wherever it came from
        click.echo(f"error: {redact_text(str(exc))}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted; continue with --resume RUN_DIR", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


def main_entry() -> None:
    sys.exit(cli_entry())


# Commands defined in their own modules (kept light: heavy imports happen inside each command).
from stages.train.cli_algos import algorithms_cmd, data_group  # noqa: E402

main.add_command(data_group)

from pipeline.data_from_serving import from_serving_cmd  # noqa: E402

data_group.add_command(from_serving_cmd)
main.add_command(algorithms_cmd)

from registry.cli import registry_cli  # noqa: E402
from registry.cli_lifecycle import rollback_cmd  # noqa: E402

main.add_command(registry_cli)
main.add_command(rollback_cmd)

from serve.cli import serve_cmd  # noqa: E402

main.add_command(serve_cmd)

from pipeline.train_cli import train_command  # noqa: E402

main.add_command(train_command)

from pipeline.promote import promote_cmd  # noqa: E402

main.add_command(promote_cmd)
