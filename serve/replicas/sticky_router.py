"""Sticky adapter routing, plugged into Ray Serve as the replicas' request router (`RequestRouterConfig`).

Why: Serve's own multiplexed routing (its power-of-two router with `MultiplexMixin`) prefers replicas that have
*reported* holding a model id. Reports arrive after the load, so the first burst of requests for an adapter
spreads over replicas and loads it on each, and every new burst can do it again. What we want is that an
adapter has one home, known before anything is loaded, so each adapter is loaded on one replica only.

How: each multiplexed model id (the pinned `NAME@V`) gets a home replica by rendezvous (highest-random-weight)
hashing: every replica scores `hash(model id, replica id)` and the highest score wins. Nothing is stored or
shared, every router process (one per ingress) computes the same home, and when a replica is added or removed
only the adapters whose home changes move (about 1/N of them). `choose_replicas` returns ranks, best first:

    [home], [home], [other replicas that already hold the id], [everyone else]

Serve itself still does the rest: it probes each rank's queue lengths, skips a replica whose queue is at
`max_ongoing_requests` (a saturated or dead home spills over to the next rank instead of queueing), backs off,
retries and dispatches. The home is ranked twice because Serve doubles the probe's deadline (0.1 s at first)
from one rank to the next: on a busy host a home whose answer was merely slow gets a second, longer chance
before its adapter is loaded somewhere else. Requests without a model id (the base model) get Serve's usual
power-of-two choice, in random order (Serve breaks ties between equal queues by order).
"""

from __future__ import annotations

import hashlib
import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous_score(model_id: str, replica_id: str) -> int:
    """A stable 64-bit score (the same in every process, unlike Python's salted `hash`)."""
    digest = hashlib.blake2b(f"{model_id}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def home_order(model_id: str, replica_ids: List[str]) -> List[str]:
    """`replica_ids` by preference for `model_id`, home first (highest rendezvous score)."""
    return sorted(replica_ids, key=lambda rid: rendezvous_score(model_id, rid), reverse=True)


def rank_for_model(model_id: str, replicas: List[RunningReplica]) -> List[List[RunningReplica]]:
    """[[home], [home], [replicas holding `model_id`], [the rest]], without empty ranks."""
    by_id = {r.replica_id.unique_id: r for r in replicas}
    ordered = [by_id[rid] for rid in home_order(model_id, list(by_id))]
    home, others = ordered[0], ordered[1:]
    holders = [r for r in others if model_id in r.multiplexed_model_ids]
    rest = [r for r in others if model_id not in r.multiplexed_model_ids]
    return [rank for rank in ([home], [home], holders, rest) if rank]


class StickyAdapterRouter(RequestRouter):
    """Serve request router: a home replica per multiplexed model id, power of two choices without one."""

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if model_id:
            return rank_for_model(model_id, list(candidate_replicas))
        # Two at random, in random order: Serve takes the shorter queue of the rank and, on a tie, the first
        # listed, so a fixed order would send every request of a lightly loaded deployment to one replica.
        return [random.sample(list(candidate_replicas), min(2, len(candidate_replicas)))]
