"""Retention (`gc`) on both stores, and the lifecycle CLI: route set/show/clear, history, gc (dry run unless
--yes) and the top-level `pipeline rollback`, in-process through cli_entry."""

from __future__ import annotations

import json

import pytest

from ground.errors import RegistryError
from pipeline.cli import cli_entry
from tests.synthetic_lora import write_lora

# `reg` (tests/registry/conftest.py) is the local store and a real MLflow server in turn

PARENTS = {6: 4, 10: "ad@6", 9: "other@1"}  # version -> parent_version at publish


@pytest.fixture
def ten_versions(reg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lora = write_lora(tmp_path / "lora", rank=4, alpha=8)
    for v in range(1, 11):
        reg.publish(lora, "ad", parent_version=PARENTS.get(v))
    reg.set_alias("ad", "prod", 2)
    reg.set_alias("ad", "canary", 5)
    reg.set_route("ad", {"prod": 80, "canary": 10, "3": 10}, mirror="7")
    return reg


def test_gc_keeps_aliased_routed_mirrored_and_parent_versions(ten_versions):
    reg = ten_versions
    # kept: 9-10 (newest two), 2 and 5 (aliases), 3 (route target), 7 (mirror), 6 and 4 (10's parent, then 6's)
    assert reg.gc("ad", 2) == [1, 8]
    assert reg.store.version_numbers("ad") == list(range(1, 11))  # a plan deletes nothing
    assert reg.gc("ad", 2, drop_parents=True) == [1, 4, 6, 8]
    assert reg.gc("ad", 2, delete=True) == [1, 8]
    assert reg.store.version_numbers("ad") == [2, 3, 4, 5, 6, 7, 9, 10]
    reg.clear_route("ad")
    assert reg.gc("ad", 0) == [3, 4, 6, 7, 9, 10]  # with no route and no newest kept, only aliases and parents stay
    assert reg.store.version_numbers("ad") == [2, 3, 4, 5, 6, 7, 9, 10]  # again a plan only
    with pytest.raises(RegistryError, match="--keep-last -1 must be a whole number"):
        reg.gc("ad", -1)


def test_a_routed_version_cannot_be_deleted(ten_versions):
    with pytest.raises(RegistryError, match=r"`ad@3` is a target of the route of `ad` \(prod=80 canary=10 3=10 "
                                            r"\(mirror 7\)\); change it first"):
        ten_versions.delete_version("ad", 3, force=True)
    with pytest.raises(RegistryError, match="target of the route"):
        ten_versions.delete_version("ad", 7)
    assert 3 in ten_versions.store.version_numbers("ad")


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli_entry(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_gc_deletes_nothing_without_yes(ten_versions, capsys):
    uri = ten_versions.uri
    code, out, err = run(capsys, "registry", "--registry", uri, "gc", "ad", "--keep-last", "2")
    assert code == 0, err
    assert "would delete 2 version(s): ad@1, ad@8" in out and "add --yes" in out
    assert ten_versions.store.version_numbers("ad") == list(range(1, 11))
    code, out, err = run(capsys, "registry", "--registry", uri, "gc", "ad", "--keep-last", "2", "--yes")
    assert code == 0, err
    assert "deleted 2 version(s): ad@1, ad@8" in out
    assert ten_versions.store.version_numbers("ad") == [2, 3, 4, 5, 6, 7, 9, 10]


def test_cli_route_history_rollback(ten_versions, capsys):
    uri = ten_versions.uri
    reg = ten_versions
    code, out, err = run(capsys, "registry", "--registry", uri, "route", "show", "ad")
    assert code == 0, err
    assert "revision 1" in out and "80%  prod" in out and "-> ad@2" in out and "mirror 7" in out
    code, out, err = run(capsys, "registry", "--registry", uri, "route", "set", "ad", "prod=90", "canary=20")
    assert code == 2 and "sum to 110 (prod=90 canary=20), not 100" in err and "Traceback" not in err
    code, out, err = run(capsys, "registry", "--registry", uri, "route", "set", "ad", "prod=90", "canary=ten")
    assert code == 2 and "weight 'ten' of target 'canary' is not an integer" in err
    code, out, err = run(capsys, "registry", "--registry", uri, "route", "set", "ad", "prod=90", "beta=10")
    assert code == 2 and "Route target `beta` of `ad`" in err and "alias set ad beta VERSION" in err
    code, out, err = run(capsys, "registry", "--registry", uri, "route", "set", "ad", "prod=50", "canary=50",
                         "--reason", "half")
    assert code == 0, err
    assert "route of ad (revision 2): prod=50 canary=50" in out
    code, out, _ = run(capsys, "registry", "--registry", uri, "route", "show", "ad", "--json")
    assert json.loads(out)["targets"] == {"prod": 50, "canary": 50} and json.loads(out)["versions"] == {
        "prod": 2, "canary": 5}
    code, out, err = run(capsys, "registry", "--registry", uri, "route", "clear", "ad")
    assert code == 0 and "cleared the route of ad (prod=50 canary=50)" in out
    code, out, _ = run(capsys, "registry", "--registry", uri, "route", "show", "ad")
    assert "no route" in out and "ad@10" in out

    assert run(capsys, "registry", "--registry", uri, "alias", "set", "ad", "prod", "9")[0] == 0
    code, out, err = run(capsys, "rollback", "ad", "prod", "--registry", uri, "--reason", "v9 is bad")
    assert code == 0, err
    assert "rolled back ad@prod: 9 -> 2" in out and reg.aliases("ad")["prod"] == 2
    code, out, err = run(capsys, "rollback", "ad", "nope", "--registry", uri)
    assert code == 2 and "no move of alias `nope`" in err

    code, out, _ = run(capsys, "registry", "--registry", uri, "history", "ad")
    lines = out.splitlines()
    kinds = [line.split()[1] for line in lines]
    assert kinds == ["alias_set", "alias_set", "route_set", "route_set", "route_clear", "alias_set", "rollback"]
    assert "prod=50 canary=50" in lines[3] and "(half)" in lines[3]
    assert "prod->9  =>  prod->2" in lines[-1] and "(v9 is bad)" in lines[-1]
    code, out, _ = run(capsys, "registry", "--registry", uri, "history", "ad", "--json")
    events = json.loads(out)
    assert events[-1]["kind"] == "rollback" and events[-1]["before"] == {"alias": "prod", "version": 9}
