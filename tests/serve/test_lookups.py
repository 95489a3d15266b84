"""Registry lookups for requests (serve/lookups.py, serve/catalog.py) without a server: a local registry whose
`resolve` can be made to hang or fail as an unreachable MLflow server does. The real thing, a stopped MLflow server
under `pipeline serve`, is tests/serve/test_server_mlflow.py::test_a_stopped_registry_holds_up_nothing_already_resolved.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ground.errors import NotFoundError, RegistryError
from ground.model_files import fingerprint
from registry import open_registry
from registry.mlflow_http import ServerUnavailableError
from serve.catalog import AdapterCatalog, RegistryUnavailableError
from serve.lookups import RequestLookups
from serve.verified import CorruptVersionError
from tests.synthetic_lora import write_lora

TIMEOUT_S = 0.5


class FlakyRegistry:
    """A real registry whose `resolve` waits while `hang` is set, or raises `fail`; counts the calls."""

    def __init__(self, registry):
        self.registry = registry
        self.hang = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.registry, name)

    def resolve(self, ref):
        self.calls += 1
        if self.hang.is_set():
            self.release.wait(30)
        if self.fail is not None:
            raise self.fail
        return self.registry.resolve(ref)


@pytest.fixture
def flaky(tmp_path, tiny_model_dir):
    reg = open_registry(str(tmp_path / "reg"))
    reg.publish(write_lora(tmp_path / "a1", seed=1), "alpha", base_dir=tiny_model_dir, alias="prod")
    reg.publish(write_lora(tmp_path / "a2", seed=2), "alpha", base_dir=tiny_model_dir)
    flaky = FlakyRegistry(reg)
    yield flaky, AdapterCatalog(flaky, fingerprint(tiny_model_dir), "tiny", ttl_s=0.1)
    flaky.release.set()


def test_a_hung_registry_costs_a_503_after_the_deadline_and_blocks_nothing_known(flaky):
    registry, catalog = flaky

    async def scenario():
        lookups = RequestLookups(catalog, TIMEOUT_S)
        assert (await lookups.pin("alpha@prod")).ref == "alpha@1"
        assert (await lookups.pin("alpha@2")).ref == "alpha@2"
        await asyncio.sleep(0.15)  # alpha@prod's answer expires
        registry.hang.set()
        ticks = []

        async def ticker():  # the event loop keeps running while lookups hang
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        tick_task = asyncio.create_task(ticker())
        started = time.monotonic()
        ghosts = await asyncio.gather(*(lookups.pin("ghost") for _ in range(20)), return_exceptions=True)
        waited = time.monotonic() - started
        assert all(isinstance(g, RegistryUnavailableError) for g in ghosts), ghosts
        assert "did not answer within 0.5 s" in str(ghosts[0]) and "--lookup-timeout" in str(ghosts[0])
        assert TIMEOUT_S - 0.05 < waited < TIMEOUT_S + 1.0, waited
        assert registry.calls == 3, "20 requests for one name share one lookup"  # + the two before
        assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.3, "the event loop stalled"

        # known answers while the registry is down: at once, without asking it
        started = time.monotonic()
        assert (await lookups.pin("alpha@prod")).ref == "alpha@1"  # the expired alias answer, stale
        assert (await lookups.pin("alpha@2")).ref == "alpha@2"  # pinned: never changes
        assert time.monotonic() - started < 0.2
        tick_task.cancel()

        registry.hang.clear()
        registry.release.set()  # the registry answers again: the next lookups reach it
        await asyncio.sleep(0.1)
        with pytest.raises(NotFoundError, match="ghost"):
            await lookups.pin("ghost")
        registry.registry.set_alias("alpha", "prod", 2)
        await asyncio.sleep(0.15)
        assert (await lookups.pin("alpha@prod")).ref == "alpha@2"

    asyncio.run(scenario())


def test_a_failing_registry_is_503_unless_the_answer_is_known(flaky):
    registry, catalog = flaky

    async def scenario():
        lookups = RequestLookups(catalog, TIMEOUT_S)
        assert (await lookups.pin("alpha")).ref == "alpha@2"
        await asyncio.sleep(0.15)
        registry.fail = ServerUnavailableError("MLflow server http://x failed (HTTP 500)")
        assert (await lookups.pin("alpha")).ref == "alpha@2"  # stale
        with pytest.raises(RegistryUnavailableError, match="HTTP 500"):
            await lookups.pin("alpha@prod")  # never resolved here

    asyncio.run(scenario())


def test_listing_is_stale_while_the_registry_hangs(flaky):
    registry, catalog = flaky

    async def scenario():
        lookups = RequestLookups(catalog, TIMEOUT_S)
        first = await lookups.servable()
        original = registry.registry.list_adapters
        gate = threading.Event()
        registry.list_adapters = lambda: (gate.wait(30), original())[1]
        try:
            assert await lookups.servable() == first
        finally:
            gate.set()
            del registry.list_adapters

    asyncio.run(scenario())


def test_store_errors_keep_their_status_whatever_the_store(flaky):
    """What an MLflow store raises as plain RegistryError for a version whose files or tags were changed on the
    server is a CorruptVersionError (422) here, naming `pipeline registry verify`; a failing server is 503."""
    from serve.resolver import error_status

    registry, catalog = flaky
    registry.fail = RegistryError("alpha@1 on mlflow+http://x: adapter_model.safetensors does not match its manifest")
    with pytest.raises(CorruptVersionError, match="pipeline registry verify alpha@1") as caught:
        catalog.lookup("alpha@1")
    assert error_status(caught.value) == 422
    registry.fail = ServerUnavailableError("MLflow server http://x is unreachable")
    with pytest.raises(RegistryUnavailableError) as caught:
        catalog.lookup("alpha@1")
    assert error_status(caught.value) == 503
    registry.fail = NotFoundError("`alpha@1` does not exist")
    with pytest.raises(NotFoundError):
        catalog.lookup("alpha@1")


def test_a_version_past_any_registry_is_404_without_asking_for_it(flaky):
    registry, catalog = flaky
    with pytest.raises(NotFoundError, match=r"`alpha@999999999999999999` does not exist; versions of `alpha`: 1-2"):
        catalog.lookup("alpha@999999999999999999")  # 18 digits: the most a version may have
    with pytest.raises(NotFoundError, match="alpha"):  # names what exists
        catalog.lookup("nosuch@999999999999999999")
    assert registry.calls == 1  # only the listing of adapters for `nosuch`, never the version itself
    with pytest.raises(RegistryError, match="more than 18 digits"):  # refused by the reference's own check
        catalog.lookup("alpha@" + "9" * 20)
    with pytest.raises(RegistryError, match="5002 characters"):  # was a ValueError from int(): a 500
        catalog.lookup("alpha@" + "9" * 4996)
    assert registry.calls == 1
