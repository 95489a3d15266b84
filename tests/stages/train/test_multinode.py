"""Real training (tiny model, 2 CPU workers over gloo, real vLLM engine) across a 2-node Ray cluster on this host.

`ray_init.address` joins the cluster; `trainer.placement_strategy=SPREAD` puts one rank on each node; rank 0
publishes its node's address and a port free there, and rank 1 joins from the other node.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_two_ranks_train_on_two_nodes(tiny_model_dir, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from config import load_config
    from stages.train import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        cfg = load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=1, extra={
            "ray_init.address": cluster.address,
            "trainer.placement_strategy": "SPREAD",
            "trainer.val_before_train": False,
            "trainer.logger": "[console]",
        }))
        outputs = train(cfg, str(tiny_model_dir), "fp", out_dir=str(tmp_path / "out"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    placement = outputs["placement"]
    assert [p["rank"] for p in placement] == [0, 1]
    assert len({p["node_id"] for p in placement}) == 2, placement  # one rank per node
    assert outputs["steps"] == 1 and (Path(outputs["adapter_dir"]) / "adapter_model.safetensors").is_file()
    steps = [json.loads(line) for line in Path(outputs["history_path"]).read_text().splitlines()]
    step = next(h for h in steps if "actor/pg_loss" in h)
    assert math.isfinite(step["actor/pg_loss"]) and math.isfinite(step["actor/grad_norm"])
    assert {"engine", "workers", "data", "total"} <= set(outputs["startup_seconds"])
