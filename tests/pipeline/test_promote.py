"""`pipeline promote` and `pipeline rollback` on the local store and on a real MLflow server store.

The adapters are real: LoRAs on the tiny model fine-tuned to answer four held-out arithmetic questions right
(held-out reward 1.0 under greedy decoding) or each off by one (0.0), so the offline gate's figures come from a
real vLLM engine and the `arithmetic` scorer, not from numbers written into metadata. One engine serves the
whole module (its start is most of the module's time).

The loop, on each store: v1 (wrong) is prod; v2 (right) is published as a 10% canary and promoted; v3 (wrong) as
the next canary is refused with both figures in the message and nothing moves; `pipeline rollback NAME prod`
moves prod back to v1; the history holds every step, with the gate figures on the promotion.
"""

from __future__ import annotations

import pytest

from pipeline.cli import cli_entry
from pipeline.heldout import HeldoutEvaluator, heldout_data
from registry import open_registry
from tests.pipeline.answer_adapters import make_answer_adapter, write_val_data
from tests.registry_stores import store_uri  # noqa: F401  (the fixture: a local store, then the MLflow one)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NAME = "adder"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("answer-adapters")
    return {"right": make_answer_adapter(tiny_model_dir, root / "right", offset=0),
            "wrong": make_answer_adapter(tiny_model_dir, root / "wrong", offset=1),
            "val": write_val_data(root / "val.parquet")}


@pytest.fixture(scope="module")
def evaluator(tiny_model_dir):
    with HeldoutEvaluator(tiny_model_dir, max_rank=8, max_model_len=256) as ev:
        yield ev


class _Shared:
    """The module's evaluator, handed to the CLI in place of a new engine (closing it is the module's job)."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self.evaluator

    def __exit__(self, *exc):
        return None


def _publish(reg, folder, tiny_model_dir, val, alias):
    lineage = {"data_files": {"val": str(val)}, "base_model": str(tiny_model_dir), "max_response_length": 16,
               "reward": {"scorer": None, "custom_reward_function": None}}
    return reg.publish(folder, NAME, base_dir=tiny_model_dir, alias=alias, lineage=lineage)


def test_promote_gates_then_rollback_with_history(store_uri, adapters, evaluator, tiny_model_dir, monkeypatch,
                                                  capsys):
    monkeypatch.setattr("pipeline.heldout.HeldoutEvaluator", _Shared(evaluator))
    reg = open_registry(store_uri, mirror_mlflow=False)
    v1 = _publish(reg, adapters["wrong"], tiny_model_dir, adapters["val"], alias="prod")
    v2 = _publish(reg, adapters["right"], tiny_model_dir, adapters["val"], alias="canary")
    reg.set_route(NAME, {"prod": 90, "canary": 10}, reason="v2 as a 10% canary")

    # the adapters really differ on the held-out questions (measured in the same engine the gate uses)
    data = heldout_data(v2)
    right, wrong = evaluator.reward(v2, data)["reward"], evaluator.reward(v1, data)["reward"]
    assert right >= wrong + 0.75, (right, wrong)

    # v2 answers right, prod (v1) wrong: promoted, and the route goes
    assert cli_entry(["promote", NAME, "--candidate", "canary", "--to", "prod", "--registry", store_uri]) == 0
    out = capsys.readouterr().out
    assert f"candidate {NAME}@2: {right:.3f}" in out and f"target    {NAME}@1: {wrong:.3f}" in out, out
    assert "verdict: pass" in out and f"promoted: {NAME}@prod {NAME}@1 -> {NAME}@2" in out, out
    assert reg.aliases(NAME)["prod"] == v2.version
    assert reg.get_route(NAME) is None

    # v3 answers wrong: refused by more than the margin, both figures named, nothing moves
    v3 = _publish(reg, adapters["wrong"], tiny_model_dir, adapters["val"], alias="canary")
    reg.set_route(NAME, {"prod": 90, "canary": 10}, reason="v3 as a 10% canary")
    events_before = len(reg.history(NAME))
    code = cli_entry(["promote", NAME, "--candidate", "canary", "--to", "prod", "--margin", "0.5",
                      "--registry", store_uri])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    assert f"{NAME}@3's held-out reward {wrong:.3f}" in captured.err, captured.err
    assert f"{NAME}@2's {right:.3f}" in captured.err, captured.err
    assert "margin 0.5" in captured.err
    assert reg.aliases(NAME)["prod"] == v2.version
    assert reg.get_route(NAME) is not None
    assert len(reg.history(NAME)) == events_before  # a refusal writes nothing

    # rollback: prod goes back to the version it held before the promotion
    monkeypatch.setenv("PIPELINE_REGISTRY", store_uri)
    assert cli_entry(["rollback", NAME, "prod"]) == 0
    assert reg.aliases(NAME)["prod"] == v1.version

    history = reg.history(NAME)
    kinds = [e.kind for e in history]
    assert "route_set" in kinds and "route_clear" in kinds, kinds
    promote_at, rollback_at = kinds.index("promote"), kinds.index("rollback")
    assert promote_at < rollback_at
    promoted = history[promote_at]
    assert promoted.before == {"alias": "prod", "version": v1.version}
    assert promoted.after == {"alias": "prod", "version": v2.version}
    offline = promoted.figures["offline"]
    assert offline["candidate"]["reward"] == right and offline["target"]["reward"] == wrong
    assert promoted.user and promoted.host and promoted.time
    assert v3.version == 3


def test_promote_without_lineage_data_names_the_fix(tmp_path, adapters, evaluator, tiny_model_dir, monkeypatch,
                                                   capsys):
    """A version published by hand has no held-out data in its lineage: the message says to pass --data."""
    monkeypatch.setattr("pipeline.heldout.HeldoutEvaluator", _Shared(evaluator))
    uri = str(tmp_path / "store")
    reg = open_registry(uri, mirror_mlflow=False)
    reg.publish(adapters["wrong"], NAME, base_dir=tiny_model_dir, alias="prod")
    reg.publish(adapters["right"], NAME, base_dir=tiny_model_dir, alias="canary")
    args = ["promote", NAME, "--registry", uri, "--base", str(tiny_model_dir)]
    assert cli_entry(args) == 2
    assert "--data" in capsys.readouterr().err
    assert cli_entry(args + ["--data", str(adapters["val"])]) == 0
    assert reg.aliases(NAME)["prod"] == 2
