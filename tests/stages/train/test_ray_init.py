"""init_ray never joins the cluster a stale `ray_current_cluster` record names (stages/train/recipe.py).

Ray's `ray.init()` without an address joins whatever `<ray temp dir>/ray_current_cluster` names, even the record
a SIGKILLed run left behind, and then refuses the num_cpus a training run passes. The record here lives in a temp
dir of this test's own (RAY_TMPDIR moves Ray's default temp dir there), so a real /tmp/ray record that another
process uses is never touched. The call runs in a child process: Ray is process-global, and a test module that
already initialised it must not be disturbed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ground.ports import free_port

REPO = Path(__file__).resolve().parents[3]

CHILD = """
import json, sys
from types import SimpleNamespace
import ray
from config.schema import RayInitConfig
from stages.train.recipe import init_ray

cfg = SimpleNamespace(ray_init=RayInitConfig(num_cpus=1))
started = init_ray(cfg, bundles=[])
try:
    print(json.dumps({"started": started, "gcs": ray.get_runtime_context().gcs_address,
                      "cpus": ray.cluster_resources().get("CPU")}))
finally:
    ray.shutdown()
"""


def test_a_stale_cluster_record_is_not_joined():
    # a short path: Ray's unix sockets live under it and a socket path may not exceed 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayinit-", dir="/tmp"))
    try:
        stale = f"127.0.0.1:{free_port()}"  # nothing listens there: the record of a cluster that died
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(stale + "\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["started"] is True  # this run started Ray, so it also shuts it down
        assert result["gcs"] != stale
        assert result["cpus"] == 1  # its own num_cpus, which joining a cluster would have refused
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
