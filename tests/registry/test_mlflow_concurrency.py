"""Real publisher processes against a real `mlflow server`: concurrent numbering, SIGKILLs at random moments,
and the server itself stopping in the middle of an upload."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry import open_registry
from registry.mlflow_layout import CREATE_GRACE_S, CREATING_TAG, EXPERIMENT, STATE_TAG
from tests.synthetic_lora import write_lora
from tests.mlflow_server import wipe
from tests.registry.test_concurrency import PUBLISHER, _wait_ready

REPO = Path(__file__).resolve().parents[2]
PIPELINE = str(Path(sys.executable).parent / "pipeline")


def _spawn(cache: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_REGISTRY_CACHE": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staging_runs(reg, name: str, view: str = "ACTIVE_ONLY") -> list[dict]:
    """Upload runs of `name` never marked finished: ACTIVE_ONLY those still there, ALL with those removed."""
    server = reg.store.server
    exp = server.get("experiments/get-by-name", "test", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
    return server.post("runs/search", "test", {
        "experiment_ids": [exp], "max_results": 1000, "run_view_type": view,
        "filter": f"tags.`{STATE_TAG}` = 'staging' and tags.`pipeline.adapter` = '{name}'"}).get("runs", [])


@pytest.mark.slow
def test_concurrent_publishers_get_1_to_200(mlflow_reg, tmp_path):
    reg = mlflow_reg
    lora = write_lora(tmp_path / "lora", rank=2)
    go = tmp_path / "go"
    # each publisher its own cache folder: as on separate machines
    procs = [_spawn(tmp_path / f"cache-{i}", reg.uri, lora, "shared", 25, go) for i in range(8)]
    for p in procs:
        _wait_ready(p)
    t0 = time.monotonic()
    go.touch()  # all eight start publishing at the same moment
    got = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        got += [int(x) for x in out.split()]
    elapsed = time.monotonic() - t0
    assert sorted(got) == list(range(1, 201))  # every publisher got distinct numbers; none lost, none skipped
    versions = reg.list_versions("shared")
    assert [v.version for v in versions] == list(range(1, 201))
    assert {(v.metadata["tags"]["pid"], v.metadata["tags"]["i"]) for v in versions} == {
        (str(p.pid), str(i)) for p in procs for i in range(25)}
    assert _staging_runs(reg, "shared") == []  # every upload finished
    for av in random.Random(0).sample(versions, 10):  # files of any version arrive whole and verified
        assert reg.store.verify_version(av.ref, av.name, av.version) == []
    print(f"200 publishes by 8 processes in {elapsed:.1f} s")


@pytest.mark.slow
def test_sigkilled_publishers_leave_no_visible_partial_version(mlflow_reg, tmp_path):
    reg = mlflow_reg
    # ~2 MB of tensors: most of a publisher's life is spent uploading and verifying, where the kills land
    lora = write_lora(tmp_path / "lora", rank=64, layers=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"))
    go = tmp_path / "go"
    go.touch()
    rng = random.Random(4321)
    kills, reported, interrupted = 0, [], 0
    # at least 20 kills; more (up to 60) while fewer than 5 have landed inside an upload: on a loaded machine
    # a publisher's time splits differently between uploading and the rest, and the count must not rest on luck
    while kills < 20 or (interrupted < 5 and kills < 60):
        procs = [_spawn(tmp_path / f"cache-{kills + i}", reg.uri, lora, "crashy", -1, go) for i in range(4)]
        for p in procs:
            _wait_ready(p)
        for p in procs:
            time.sleep(rng.uniform(0.05, 0.6))
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        for p in procs:
            out, _ = p.communicate(timeout=30)
            assert p.returncode == -signal.SIGKILL
            reported += [int(x) for x in out.split()]
            kills += 1
        # between rounds, every visible version is whole
        numbers = reg.store.version_numbers("crashy")
        assert numbers == list(range(1, len(numbers) + 1)), "a killed publisher left a gap or a duplicate"
        interrupted = len(_staging_runs(reg, "crashy", "ALL"))
    # kills inside an upload leave a staging run (later publishers' cleanup removes those of dead writers)
    remaining = len(_staging_runs(reg, "crashy"))
    assert interrupted >= 5, f"only {interrupted} of {kills} kills landed inside an upload; the test did not exercise it"

    numbers = [v.version for v in reg.list_versions("crashy")]
    assert numbers == list(range(1, len(numbers) + 1))
    assert set(reported) <= set(numbers)  # every version a publisher reported exists
    report = reg.verify()  # downloads every version afresh and re-hashes it
    assert report.ok, report.problems[:5]
    prod = reg.aliases("crashy").get("prod")
    assert prod is None or prod in numbers

    lines = reg.cleanup()  # the writers are gone (same host, dead pids): their uploads go
    assert len(lines) == remaining and all("never became a version" in ln or "marked finished" in ln
                                             or "left for a cleanup" in ln for ln in lines), lines
    # those killed just after asking for their version stay (the server may still create it) until the grace ends
    assert len(_staging_runs(reg, "crashy")) == sum("left for a cleanup" in ln for ln in lines)
    new = reg.publish(lora, "crashy", alias="prod")
    assert new.version == len(numbers) + 1 and reg.resolve("crashy@prod").version == new.version
    print(f"{kills} kills, {interrupted} inside an upload, {len(numbers)} versions survived")


def test_cleanup_keeps_the_files_of_a_dead_writer_whose_version_may_still_appear(mlflow_reg, tmp_path):
    """A publisher killed right after sending create_model_version: the server may still create the version.
    Cleanup must not remove its files in that window (a version without files would be visible), and once the
    version exists, cleanup marks the upload finished."""
    reg, store = mlflow_reg, mlflow_reg.store
    lora = write_lora(tmp_path / "lora", rank=2)
    first = reg.publish(lora, "late")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid of this host that is no longer alive: the killed writer
    run_id, art = store._start_upload("late")
    staged = first.path
    store._upload_verified(staged, art, "late")
    for key, value in {"pipeline.pid": str(dead.pid), CREATING_TAG: f"{time.time():.3f}"}.items():
        store.server.post("runs/set-tag", "test", {"run_id": run_id, "key": key, "value": value})
    lines = store.cleanup()
    assert any(run_id in ln and "left for a cleanup" in ln for ln in lines), lines
    # the server now finishes the dead writer's request
    tags = {t["key"]: t["value"] for t in store.server.get("model-versions/get", "test", name="late",
                                                            version="1")["model_version"]["tags"]}
    assert store._create_version("late", run_id, art, tags, "") == 2
    assert store.verify_version("late@2", "late", 2) == []  # its files are all there
    assert any(run_id in ln and "marked finished" in ln for ln in store.cleanup())
    assert _staging_runs(reg, "late") == []
    # past the grace, a dead writer's upload that never became a version goes
    run_id, art = store._start_upload("late")
    store._upload_verified(staged, art, "late")
    for key, value in {"pipeline.pid": str(dead.pid), CREATING_TAG: f"{time.time() - CREATE_GRACE_S - 1:.3f}"}.items():
        store.server.post("runs/set-tag", "test", {"run_id": run_id, "key": key, "value": value})
    assert any(run_id in ln and "never became a version" in ln for ln in store.cleanup())
    assert reg.verify().ok


@pytest.mark.slow
def test_server_stopped_mid_upload_publishes_nothing(mlflow_server, tmp_path):
    """The server dies (SIGKILL) while a real `pipeline registry publish` uploads: the command fails with a
    message naming the server, no traceback; after a restart nothing is visible and cleanup removes the rest."""
    wipe(mlflow_server)
    big = write_lora(tmp_path / "big", rank=256, layers=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"))
    env = {**os.environ, "PIPELINE_REGISTRY_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    before = set(mlflow_server.artifacts.rglob("adapter_model.safetensors"))  # earlier tests' uploads
    cli = subprocess.Popen([PIPELINE, "registry", "--registry", mlflow_server.uri, "publish", str(big), "--name", "big"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a loaded machine can take a minute to start the CLI
        # wait until the upload is under way: the adapter's weights file is arriving in the artifact store
        while time.monotonic() < deadline and not set(mlflow_server.artifacts.rglob("adapter_model.safetensors")) - before:
            time.sleep(0.005)
        arrived = bool(set(mlflow_server.artifacts.rglob("adapter_model.safetensors")) - before)
        mlflow_server.stop(signal.SIGKILL)
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
        mlflow_server.start()  # same port, same database: the session's server is back
    assert arrived, "the upload never started within 300 s; the test did not exercise a cut-off upload"
    assert cli.returncode == 2, (out, err)
    assert mlflow_server.url in err and "Traceback" not in err, err
    reg = open_registry(mlflow_server.uri, cache_dir=tmp_path / "cache")
    assert "big" not in reg.list_adapters() and reg.store.version_numbers("big") == []
    lines = reg.cleanup()
    assert any("never became a version" in ln for ln in lines), lines
    assert _staging_runs(reg, "big") == []
    assert reg.publish(big, "big").version == 1  # the number was never taken
