"""Opening the registry once per `pipeline registry ...` command (shared by registry/cli.py and cli_lifecycle.py)."""

from __future__ import annotations

import click


def open_from_context(ctx: click.Context):
    """Open the registry once per command, with the group's --registry / --config / --mlflow-tracking-uri."""
    if "registry" not in ctx.obj:
        from registry import open_registry

        uri, tracking = ctx.obj["uri"], ctx.obj["tracking"]
        if ctx.obj["config"]:
            from config import load_config

            cfg = load_config(ctx.obj["config"], [])
            uri = uri or cfg.registry.uri
            tracking = tracking or cfg.trainer.mlflow_tracking_uri
        ctx.obj["registry"] = open_registry(uri, mlflow_tracking_uri=tracking)
    return ctx.obj["registry"]
