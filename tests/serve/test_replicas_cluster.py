"""The replicated mode on a 2-node Ray cluster started on this host: one replica on each node, one endpoint.

It runs with `routing="round_robin"` (no multiplexed id), so the plain-routing path is exercised too
(test_replicas.py covers multiplexed routing)."""

from __future__ import annotations

import json
import os

import openai
import pytest

from registry import open_registry
from tests.serve.adapters import PROMPT, make_adapters
from tests.serve.cli_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_replicas_on_two_nodes_answer_behind_one_endpoint(tiny_model_dir, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from ground.processes import child_pids, shm_segments_of
    from serve.replicas.app import start_replicated

    # Ray workers run in the driver's working directory (the test's tmp_path) with it first on sys.path: a folder
    # there named like one of our packages (`registry`) would shadow it as a namespace package in an editable install
    store = tmp_path / "adapter-store"
    reg = open_registry(str(store))
    dirs, answers = make_adapters(tiny_model_dir, tmp_path, seeds=[1, 2], max_new_tokens=4)
    for seed, name in [(1, "alpha"), (2, "beta")]:
        reg.publish(dirs[seed], name, base_dir=tiny_model_dir)
    eos = json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    server, mine = None, set()
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        server = start_replicated(tiny_model_dir, str(store), replicas=2,
                                  ray_address=cluster.address, port=free_port(), max_loras=2, max_model_len=256,
                                  kv_cache_gib=0.0625, dtype="float32", base_name="tiny-base",
                                  max_replicas_per_node=1, routing="round_robin")
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                    if a.class_name.endswith("LoraReplica")]
        assert len({a.node_id for a in replicas}) == 2, [(a.class_name, a.node_id) for a in replicas]
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        served_by = set()
        # plain routing picks between idle replicas at random: 30 requests all on one would be a 2**-29 chance
        for model, seed in [("alpha", 1), ("beta", 2), ("tiny-base", None)] * 10:
            raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=4,
                                                              temperature=0, extra_body={"return_token_ids": True})
            resp = raw.parse()
            served_by.add(raw.headers["x-served-by-replica"])
            ids = list(resp.choices[0].model_extra["token_ids"])
            assert _until_eos(ids, eos) == _until_eos(answers[seed], eos), model
        assert len(served_by) == 2, f"both nodes' replicas should answer: {served_by}"
        pids = {a.pid for a in replicas}
        mine = shm_segments_of(pids.union(*(child_pids(p) for p in pids)))  # this test's engines only
        assert mine
    finally:
        if server is not None:
            server.stop()
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    left = [s for s in mine if os.path.exists(s)]
    assert not left, f"left in /dev/shm: {left}"


def _until_eos(ids, eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids
