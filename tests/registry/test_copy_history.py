"""`pipeline registry copy` and history events: each source event is in the destination once, however often the
copy runs, also when the destination stores it in another shape than the current writer's (no `figures` key, as an
older writer, or another copy tool, wrote it)."""

from __future__ import annotations

import json

from registry import open_registry
from registry.copy import copy_registry
from tests.synthetic_lora import write_lora


def test_an_event_the_destination_holds_without_figures_is_not_appended_again(tmp_path):
    src = open_registry(str(tmp_path / "src"), mirror_mlflow=False)
    dst = open_registry(str(tmp_path / "dst"), mirror_mlflow=False)
    src.publish(write_lora(tmp_path / "lora", rank=4), "a")
    src.set_alias("a", "prod", 1, reason="first")
    assert copy_registry(src, dst).events == {"a": 1}
    older = {"time": "2026-01-02T03:04:05.000006Z", "user": "ann", "host": "h", "kind": "alias_set", "name": "a",
             "before": None, "after": {"alias": "prod", "version": 1}, "reason": "by hand"}  # no `figures` key
    for reg in (src, dst):  # the same event in both stores, as written before `figures` existed
        reg.store.append_event("a", json.dumps(older))
    assert copy_registry(src, dst).events == {"a": 0}
    assert copy_registry(src, dst).events == {"a": 0}
    assert [e.reason for e in dst.history("a") if e.user == "ann"] == ["by hand"]
