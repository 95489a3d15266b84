"""The append-only history on both stores: every alias move, route change and rollback, with before/after; two
processes writing at once lose no event; rollback restores the previous version."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from ground.errors import NotFoundError, RegistryError
from tests.synthetic_lora import write_lora

ROOT = Path(__file__).resolve().parents[2]

# `reg` (tests/registry/conftest.py) is the local store and a real MLflow server in turn


@pytest.fixture
def lora(tmp_path):
    return write_lora(tmp_path / "lora", rank=4, alpha=8)


def _moves(reg, name):
    return [(e.kind, e.before, e.after) for e in reg.history(name)]


def test_every_alias_move_and_route_change_is_recorded(reg, lora):
    reg.publish(lora, "ad", alias="prod")
    reg.publish(lora, "ad")
    reg.set_alias("ad", "canary", 2, reason="candidate")
    reg.set_route("ad", {"prod": 90, "canary": 10}, reason="10% canary")
    reg.set_route("ad", {"prod": 100, "canary": 0}, kind="auto_rollback", reason="error rate",
                  figures={"error_rate": 1.0, "requests": 20})
    reg.set_alias("ad", "prod", 2, kind="promote", figures={"reward": [0.5, 0.6]})
    reg.clear_route("ad", reason="promoted")
    reg.delete_alias("ad", "canary")
    event = reg.record_event("ad", "promote", before={"x": 1}, after={"x": 2}, reason="gate", figures={"n": 3})

    history = reg.history("ad")
    assert [(e.kind, e.before, e.after) for e in history][:3] == [
        ("alias_set", {"alias": "prod", "version": None}, {"alias": "prod", "version": 1}),
        ("alias_set", {"alias": "canary", "version": None}, {"alias": "canary", "version": 2}),
        ("route_set", None, {"targets": {"prod": 90, "canary": 10}, "mirror": None, "revision": 1,
                             "updated_at": history[2].after["updated_at"]}),
    ]
    assert history[0].reason == "published ad@1" and history[1].reason == "candidate"
    auto = history[3]
    assert auto.kind == "auto_rollback" and auto.before["targets"] == {"prod": 90, "canary": 10}
    assert auto.after["targets"] == {"prod": 100, "canary": 0} and auto.figures == {"error_rate": 1.0, "requests": 20}
    assert (history[4].kind, history[4].before, history[4].after, history[4].figures) == (
        "promote", {"alias": "prod", "version": 1}, {"alias": "prod", "version": 2}, {"reward": [0.5, 0.6]})
    assert history[5].kind == "route_clear" and history[5].after is None and history[5].reason == "promoted"
    assert (history[6].kind, history[6].before, history[6].after) == (
        "alias_delete", {"alias": "canary", "version": 2}, {"alias": "canary", "version": None})
    assert history[7] == event and len(history) == 8
    for e in history:
        assert e.user == getpass.getuser() and e.host == socket.gethostname() and e.name == "ad"
        assert datetime.fromisoformat(e.time).utcoffset().total_seconds() == 0
    assert [e.time for e in history] == sorted(e.time for e in history)


def test_refused_events_and_moves_record_nothing(reg, lora):
    reg.publish(lora, "ad")
    with pytest.raises(RegistryError, match="kind 'moved' is unknown"):
        reg.record_event("ad", "moved", before=None, after=None)
    with pytest.raises(RegistryError, match="JSON cannot store"):
        reg.set_alias("ad", "prod", 1, figures={"x": object()})
    assert reg.aliases("ad") == {}
    with pytest.raises(NotFoundError):
        reg.record_event("nobody", "promote", before=None, after=None)
    assert reg.history("ad") == []
    with pytest.raises(NotFoundError, match=r"Adapter `nobody` does not exist .*it holds: ad"):
        reg.history("nobody")


def test_rollback_restores_the_previous_version(reg, lora):
    for _ in range(3):
        reg.publish(lora, "ad")
    with pytest.raises(RegistryError, match="no move of alias `prod`"):
        reg.rollback("ad", "prod")
    reg.set_alias("ad", "prod", 1)
    with pytest.raises(RegistryError, match="did not exist before"):
        reg.rollback("ad", "prod")
    reg.set_alias("ad", "prod", 2)
    reg.set_alias("ad", "prod", 3, kind="promote")
    assert reg.rollback("ad", "prod", reason="v3 is bad") == (3, 2)
    assert reg.aliases("ad")["prod"] == 2
    last = reg.history("ad")[-1]
    assert (last.kind, last.before, last.after, last.reason) == (
        "rollback", {"alias": "prod", "version": 3}, {"alias": "prod", "version": 2}, "v3 is bad")
    assert reg.rollback("ad", "prod") == (2, 1)  # a second rollback goes further back, not forth again
    assert reg.resolve("ad@prod").version == 1
    # a move recorded twice (alias_set, then a promote event explaining it) counts once: two rollbacks go two
    # moves back, not one move back and then nowhere
    reg.set_alias("ad", "prod", 3)
    reg.set_alias("ad", "prod", 2, reason="promote")
    reg.record_event("ad", "promote", before={"alias": "prod", "version": 3}, after={"alias": "prod", "version": 2})
    assert reg.rollback("ad", "prod") == (2, 3)
    assert reg.rollback("ad", "prod") == (3, 1)


WRITER = textwrap.dedent("""
    import sys
    from registry import open_registry
    reg = open_registry(sys.argv[1], mirror_mlflow=False)
    who, n = sys.argv[2], int(sys.argv[3])
    for i in range(n):
        if who == "routes":
            reg.set_route("ad", {"prod": 100 - i % 2, "canary": i % 2}, reason=f"{who} {i}")
        else:
            reg.set_alias("ad", "canary", 1 + i % 2, reason=f"{who} {i}")
""")


def test_two_processes_lose_no_event(reg, lora, tmp_path):
    reg.publish(lora, "ad", alias="prod")
    reg.publish(lora, "ad", alias="canary")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    n = 15
    env_path = {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), reg.uri, who, str(n)], env={**os.environ, **env_path},
                              stderr=subprocess.PIPE, text=True) for who in ("routes", "aliases")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    reasons = [e.reason for e in reg.history("ad")]
    for who in ("routes", "aliases"):
        assert [r for r in reasons if r.startswith(who)] == [f"{who} {i}" for i in range(n)]
    # the route's revision counted every change (on a local store the lock orders them; see docs for MLflow)
    if reg.uri.startswith("file:"):
        assert reg.get_route("ad").revision == n
    assert json.loads(reg.history("ad")[-1].to_json())["name"] == "ad"
