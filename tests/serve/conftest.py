"""Fixtures of the serve tests: the real `pipeline serve` servers that several modules share
(tests/serve/shared_server.py: one single server, one `--replicas 2`, one registry), since starting a server
costs 30-60 s of a CI run on 2 cores.

A server is started for the first test that needs it and stopped (Ctrl-C, which must end it cleanly) after the
last one of a run of such tests; the modules that use them run one after the other (collection order below), so
each starts once. The modules share `alpha` (published once, every route on it cleared by the module that set
it) and otherwise use their own adapter names. Counters they read are global to a server (vLLM's, the
per-version ones), which is safe because pytest runs one test at a time and each test waits for its own
requests.
"""

from __future__ import annotations

import pytest

from tests.serve.shared_server import SharedServers

SINGLE, REPLICATED = "shared_server", "shared_replicated_server"
_holder: list[SharedServers] = []


@pytest.fixture(scope="session")
def shared_servers(tmp_path_factory, tiny_model_dir) -> SharedServers:
    if not _holder:
        _holder.append(SharedServers(tmp_path_factory.mktemp("shared-serve"), tiny_model_dir))
    yield _holder[0]
    _holder[0].single.stop()
    _holder[0].replicated.stop()


@pytest.fixture(scope="session")
def shared_server(shared_servers):
    """The shared single server; a module fixture calls `ensure_started()` and never stops it."""
    return shared_servers.single


@pytest.fixture(scope="session")
def shared_replicated_server(shared_servers):
    """The shared `--replicas 2` server; a module fixture calls `ensure_started()` and never stops it."""
    return shared_servers.replicated


def _uses(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Run the tests that use a shared server together, where the first of them was: those of the single server
    alone, then those of both, then those of the replicated one alone (module order kept within each), so each
    server starts once. Every other test keeps its place and order."""
    group = {}
    for item in items:
        single, replicated = _uses(item, SINGLE), _uses(item, REPLICATED)
        if single or replicated:
            group[item] = 0 if not replicated else 1 if single else 2
    if not group:
        return
    first = next(i for i, item in enumerate(items) if item in group)
    users = sorted(group, key=lambda item: group[item])  # stable: module order stays within a group
    rest = [item for item in items if item not in group]
    items[:] = rest[:first] + users + rest[first:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After the module fixtures of the last test of a run that used a shared server: stop it, so it holds no
    memory or cores while the rest of the suite runs. A later user would start it again (`ensure_started`)."""
    if not _holder:
        return
    due = [server for fixture, server in ((SINGLE, _holder[0].single), (REPLICATED, _holder[0].replicated))
           if _uses(item, fixture) and (nextitem is None or not _uses(nextitem, fixture))]
    failed = None
    for server in due:  # each one stopped, even when the one before did not stop cleanly
        try:
            server.stop()
        except BaseException as exc:
            failed = failed or exc
    if failed is not None:
        raise failed
