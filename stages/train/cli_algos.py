"""CLI commands: `pipeline data make-arithmetic` and `pipeline algorithms` (registered in pipeline/cli.py)."""

from __future__ import annotations

import click


@click.group("data")
def data_group():
    """Make and inspect training data."""


@data_group.command("make-arithmetic")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for train.parquet and test.parquet.")
@click.option("--train-size", default=1024, show_default=True, help="Train questions.")
@click.option("--test-size", default=64, show_default=True, help="Test questions (disjoint from train).")
@click.option("--low", default=0, show_default=True, help="Smallest operand.")
@click.option("--high", default=9, show_default=True, help="Largest operand.")
@click.option("--ops", default="+-", show_default=True, help="Operations to draw from, any of + - *.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--force", is_flag=True, help="Replace train.parquet / test.parquet if they exist (default: refuse).")
def make_arithmetic_cmd(out_dir, train_size, test_size, low, high, ops, seed, force):
    """Write single-operation arithmetic questions (the default demo's task) in verl's parquet format."""
    from stages.train.arithmetic import make_arithmetic

    paths = make_arithmetic(out_dir, n_train=train_size, n_test=test_size, low=low, high=high, ops=tuple(ops),
                            seed=seed, replace=force)
    for path in paths:
        click.echo(f"wrote {path}")


@click.command("algorithms")
def algorithms_cmd():
    """List the registered advantage estimators, policy losses, aggregation modes, KL estimators and scorers."""
    from stages.train import core_algos as ca
    from stages.train.rewards import REWARD_SCORERS

    def section(title: str, key: str, entries: list[tuple[str, str]]) -> None:
        click.echo(f"{title} ({key}):")
        width = max(len(name) for name, _ in entries)
        for name, text in entries:
            click.echo(f"  {name:<{width}}  {text}")

    recipes = {est: [r for r, e in ca.RECIPE_ESTIMATORS.items() if e == est] for est in ca.ADV_ESTIMATORS}
    section("advantage estimators", "algorithm.adv_estimator",
            [(name + (f" (= {', '.join(recipes[name])})" if recipes[name] else ""), ca.describe(fn))
             for name, fn in ca.ADV_ESTIMATORS.items()])
    section("policy losses", "actor_rollout_ref.actor.policy_loss.loss_mode",
            [(name, ca.describe(fn)) for name, fn in ca.POLICY_LOSSES.items()])
    section("loss aggregation modes", "actor_rollout_ref.actor.loss_agg_mode",
            [(name, ca.describe(fn)) for name, fn in ca.LOSS_AGG_MODES.items()])
    canonical = list(ca.KL_ESTIMATORS)
    aliases = {name: [a for a, c in ca.KL_ESTIMATORS.aliases.items() if c == name] for name in canonical}
    section("KL estimators", "actor.kl_loss_type, algorithm.kl_penalty",
            [(name + (f" (= {', '.join(aliases[name])})" if aliases[name] else ""), ca.describe(ca.KL_ESTIMATORS[name]))
             for name in canonical])
    section("reward scorers", "by each row's data_source, or reward_model.scorer",
            [(s.name, s.description + (f" [data_source: {', '.join(s.data_sources)}]" if s.data_sources else ""))
             for s in REWARD_SCORERS.values()])
