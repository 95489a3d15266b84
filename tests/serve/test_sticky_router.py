"""The sticky adapter router's ranking (serve/replicas/sticky_router.py), without a cluster: the live routing
is checked by tests/serve/test_replicas.py, where Serve runs it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serve.replicas.sticky_router import StickyAdapterRouter, home_order, rank_for_model, rendezvous_score

ADAPTERS = [f"adapter-{i}@1" for i in range(2000)]


def _homes(replica_ids: list[str]) -> dict[str, str]:
    return {a: home_order(a, replica_ids)[0] for a in ADAPTERS}


def test_homes_are_stable_balanced_and_move_little_when_a_replica_joins_or_leaves():
    assert rendezvous_score("alpha@1", "r1") == rendezvous_score("alpha@1", "r1")  # not Python's salted hash
    four = [f"replica-{i}" for i in range(4)]
    homes = _homes(four)
    assert homes == _homes(list(reversed(four)))  # the replicas' order does not matter
    per_replica = [sum(1 for h in homes.values() if h == r) for r in four]
    assert all(400 <= n <= 600 for n in per_replica), per_replica  # ~500 each
    grown = _homes(four + ["replica-4"])
    moved = [a for a in ADAPTERS if grown[a] != homes[a]]
    assert all(grown[a] == "replica-4" for a in moved)  # only onto the newcomer...
    assert 300 <= len(moved) <= 500, len(moved)  # ...about 1/5 of them
    shrunk = _homes(four[1:])
    assert all(shrunk[a] == homes[a] for a in ADAPTERS if homes[a] != "replica-0")  # only replica-0's move


def _replica(name: str, holds: set[str] = frozenset()):
    # the two attributes of Serve's RunningReplica the ranking reads
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), multiplexed_model_ids=set(holds))


def test_ranks_home_first_then_holders_then_the_rest():
    replicas = [_replica("a"), _replica("b", {"alpha@1"}), _replica("c"), _replica("d", {"alpha@1"})]
    order = home_order("alpha@1", ["a", "b", "c", "d"])
    ranks = rank_for_model("alpha@1", replicas)
    names = [[r.replica_id.unique_id for r in rank] for rank in ranks]
    home = order[0]
    assert names[0] == names[1] == [home]
    holders = [n for n in order[1:] if n in ("b", "d")]
    rest = [n for n in order[1:] if n not in ("b", "d")]
    assert names[2:] == [rank for rank in (holders, rest) if rank]
    assert rank_for_model("alpha@1", [_replica("solo")])[0][0].replica_id.unique_id == "solo"


def test_base_requests_get_two_random_choices():
    router = object.__new__(StickyAdapterRouter)  # choose_replicas reads no router state
    replicas = [_replica(n) for n in "abcd"]
    request = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=""))
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert len(ranks) == 1 and len(ranks[0]) == 2 and len({id(r) for r in ranks[0]}) == 2
    assert asyncio.run(router.choose_replicas([], request)) == []
    adapter = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id="beta@3"))
    home = home_order("beta@3", list("abcd"))[0]
    assert asyncio.run(router.choose_replicas(replicas, adapter))[0][0].replica_id.unique_id == home


def test_base_requests_between_two_idle_replicas_are_not_all_sent_to_the_first():
    """Serve picks the first of equal queues in a rank; with two replicas the rank's order must be random, or every
    base request of a lightly loaded deployment goes to one replica (seen: 16 of 16 in tests/serve/test_replicas.py)."""
    router = object.__new__(StickyAdapterRouter)
    replicas = [_replica("a"), _replica("b")]
    request = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=""))
    firsts = [asyncio.run(router.choose_replicas(replicas, request))[0][0].replica_id.unique_id for _ in range(200)]
    assert 60 <= firsts.count("a") <= 140, firsts.count("a")  # ~100; a fixed order gives 200
    assert asyncio.run(router.choose_replicas(replicas[:1], request)) == [replicas[:1]]
