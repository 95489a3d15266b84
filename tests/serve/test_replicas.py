"""`pipeline serve --replicas 2` on Ray Serve (tiny model, vLLM CPU, 4 registry adapters), driven by `openai`.

One server for the whole module (two engines and a local Ray take ~1 min on 2 cores), started with the real
command and stopped with Ctrl-C, after which no replica process and none of its shared memory may remain.
The last test SIGKILLs a replica under load; it runs last because it costs a replica restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from registry import open_registry
from tests.serve.adapters import PROMPT, make_adapters
from tests.serve.cli_server import free_port, read_until_ready

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "replica-key-456"
MAX_TOKENS = 8
ADAPTERS = ["alpha@1", "alpha@2", "beta@1", "gamma@1"]
REPLICA_TITLE = "ServeReplica:lora-pipeline:LoraReplica"


def replica_pids() -> dict[int, str]:
    """Live replica actor processes on this host: {pid: cmdline} (Ray names them by deployment)."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if REPLICA_TITLE in cmdline:
            found[int(entry)] = cmdline
    return found


def _replica_segments() -> set[str]:
    """/dev/shm/psm_* segments that the replica processes and their engine processes have mapped now."""
    from ground.processes import child_pids, shm_segments_of

    pids = set(replica_pids())
    for pid in list(pids):
        pids |= child_pids(pid)
    return shm_segments_of(pids)


def start_replicated_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 420):
    import subprocess
    import sys

    pipeline_script = os.path.join(os.path.dirname(sys.executable), "pipeline")
    cli = subprocess.Popen([pipeline_script, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        return cli, read_until_ready(cli, timeout)
    except BaseException:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
        raise


def _poll_health(port: int, seen: list, stop: threading.Event) -> None:
    """Record (status, body) of GET /health until `stop` (None while nothing listens)."""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                seen.append((r.status, r.read().decode(errors="replace")))
        except urllib.error.HTTPError as exc:
            seen.append((exc.code, exc.read().decode(errors="replace")))
        except OSError:
            seen.append((None, ""))
        stop.wait(0.3)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    from tests.synthetic_lora import write_lora

    root = tmp_path_factory.mktemp("replicas")
    reg = open_registry(str(root / "registry"))
    dirs, answers = make_adapters(tiny_model_dir, root, seeds=[1, 2, 3, 4], max_new_tokens=MAX_TOKENS)
    expected = {"base": answers[None]}
    for seed, name in zip([1, 2, 3, 4], ["alpha", "alpha", "beta", "gamma"]):
        expected[reg.publish(dirs[seed], name, base_dir=tiny_model_dir).ref] = answers[seed]
    reg.set_alias("alpha", "prod", 1)
    # the single server's 422 cases: another base's adapter, weights changed after publish, shapes that do not fit
    reg.publish(write_lora(root / "foreign", seed=5), "foreign", base_fingerprint="0" * 64)
    reg.publish(write_lora(root / "flip", seed=6), "flip", base_dir=tiny_model_dir)
    reg.publish(write_lora(root / "wide", shapes={"self_attn.q_proj": (96, 64)}, targets=("q_proj",)), "wide")
    port = free_port()
    cli = None
    health, stop_polling = [], threading.Event()
    poller = threading.Thread(target=_poll_health, args=(port, health, stop_polling), daemon=True)
    try:
        poller.start()
        cli, output = start_replicated_cli(  # the host-memory tier is the default: sized from --lora-cache-gib
            ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port),
             "--replicas", "2", "--max-loras", "2", "--max-model-len", "256",
             "--kv-cache-gib", "0.0625", "--dtype", "float32", "--served-name", "tiny-base", "--alias-ttl", "1"],
            env={"PIPELINE_SERVE_API_KEY": API_KEY})
        stop_polling.set()
        poller.join()
        url = f"http://127.0.0.1:{port}/v1"
        started_with = _replica_segments()
        served = {"url": url, "registry": reg, "expected": expected, "base_dir": tiny_model_dir, "root": root,
                  "output": output, "health": health, "cli": cli,
                  "client": openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)}
        yield served
        if cli.poll() is None:  # the last test stops it under load; when it did not run, a plain Ctrl-C here
            mine = _replica_segments() | started_with  # only this server's: other engines may run on the machine
            assert mine, "the replicas' engines should map /dev/shm segments"
            cli.send_signal(signal.SIGINT)
            rest, _ = cli.communicate(timeout=180)
            assert cli.returncode == 0 and "stopping the server" in rest, output + rest
            deadline = time.monotonic() + 30
            while replica_pids() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert replica_pids() == {}
            assert not any(os.path.exists(s) for s in mine), f"left behind: {[s for s in mine if os.path.exists(s)]}"
    finally:
        stop_polling.set()
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()


def _complete(client, model: str, max_tokens: int = MAX_TOKENS):
    """(response, replica that answered)"""
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                                      temperature=0, extra_body={"return_token_ids": True})
    return raw.parse(), raw.headers.get("x-served-by-replica")


def _until_eos(ids, eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


def _metrics(url: str, key: str | None = API_KEY) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url.removesuffix("/v1") + "/metrics", headers=headers)
    return urllib.request.urlopen(request, timeout=30).read().decode()


def test_each_adapter_answers_with_its_own_weights(served):
    client, expected = served["client"], served["expected"]
    eos = json.loads((served["base_dir"] / "generation_config.json").read_text())["eos_token_id"]
    for model, key in [("tiny-base", "base"), ("alpha@1", "alpha@1"), ("alpha@2", "alpha@2"), ("alpha", "alpha@2"),
                       ("alpha@prod", "alpha@1"), ("beta", "beta@1"), ("gamma@1", "gamma@1")]:
        resp, replica = _complete(client, model)
        ids = _until_eos(resp.choices[0].model_extra["token_ids"], eos)
        assert ids == _until_eos(expected[key], eos), f"{model}: replica {replica} {ids} != PEFT {expected[key]}"
        assert resp.model == ("tiny-base" if key == "base" else key)
        assert replica, "the response must name the replica that answered"


def test_chat_and_streaming(served):
    client = served["client"]
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "beta@1" and chat.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=4, temperature=0, stream=True))
    assert len(chunks) >= 2 and {c.model for c in chunks} == {"gamma@1"}
    text = list(client.completions.create(model="alpha@prod", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert text and {c.model for c in text} == {"alpha@1"}


def test_models_404_401_and_metrics_contract(served):
    client, url = served["client"], served["url"]
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny-base" and {"alpha@1", "alpha@2", "alpha", "alpha@prod", "beta", "gamma@1"} <= set(ids)
    with pytest.raises(openai.NotFoundError, match="`nope` does not exist"):
        _complete(client, "nope")
    with pytest.raises(openai.NotFoundError, match="versions of `alpha`: 1-2"):
        _complete(client, "alpha@99")
    with pytest.raises(openai.BadRequestError, match="Invalid adapter name"):
        _complete(client, "../etc")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).completions.create(
            model="alpha", prompt=PROMPT, max_tokens=2)
    assert urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30).status == 200
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        _metrics(url, key=None)
    assert anonymous.value.code == 401
    assert re.search(r'pipeline_adapter_loads_total\{replica="[^"]+"\} [1-9]', _metrics(url))


def test_alias_move_is_followed_without_restart(served):
    client, reg = served["client"], served["registry"]
    assert _complete(client, "alpha@prod")[0].model == "alpha@1"
    reg.set_alias("alpha", "prod", 2)
    try:
        deadline = time.monotonic() + 10
        while _complete(client, "alpha@prod")[0].model != "alpha@2":
            assert time.monotonic() < deadline, "the alias move never reached the replicas"
            time.sleep(0.5)
    finally:
        reg.set_alias("alpha", "prod", 1)


def test_serving_line_shows_the_host_memory_tier_and_health_waited_for_the_replicas(served):
    line = served["output"].strip().splitlines()[-1]
    # 1 GiB over a few-KiB adapter: capped, as the single server does
    assert re.search(r"host-memory adapter tier per replica: max_cpu_loras=1024 \(adapter cache budget 1 GiB / "
                     r"largest of 6 registry adapter\(s\) on this base: [0-9.]+ MiB .* capped at 1024\)", line), line
    statuses = [status for status, _ in served["health"]]
    before_ready = served["health"][:statuses.index(200)] if 200 in statuses else served["health"]
    assert any(status == 503 and "no replica is ready yet" in body for status, body in before_ready), \
        f"/health should answer 503 while the engines start: {sorted(set(statuses), key=str)}"


def test_refusals_are_422_as_in_the_single_server(served):
    client, reg = served["client"], served["registry"]
    with pytest.raises(openai.UnprocessableEntityError) as foreign:
        _complete(client, "foreign")
    assert foreign.value.status_code == 422 and "0" * 16 in str(foreign.value) and "tiny-base" in str(foreign.value)
    weights = reg.resolve("flip@1").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(openai.UnprocessableEntityError) as flipped:
        _complete(client, "flip@1")
    assert "flip@1" in str(flipped.value) and "pipeline registry verify" in str(flipped.value)
    with pytest.raises(openai.UnprocessableEntityError, match=r"wide@1 does not fit.*96 -> 64"):
        _complete(client, "wide@1")
    assert _complete(client, "beta@1")[0].model == "beta@1"  # the replicas stay up


def _replica_names(client) -> set[str]:
    """Both replicas' names, from base requests (no model id: Serve spreads them by power of two choices)."""
    with ThreadPoolExecutor(4) as pool:
        return {r for _, r in pool.map(lambda _: _complete(client, "tiny-base", max_tokens=1), range(16))}


def test_each_adapter_is_served_by_its_home_replica_only(served):
    """Sticky routing (serve/replicas/sticky_router.py, Serve's request-router plug-in): from the first request on,
    every adapter goes to its rendezvous-hash home, so with the default host tier each is loaded exactly once."""
    from serve.replicas.sticky_router import home_order

    client = served["client"]
    names = sorted(_replica_names(client))
    assert len(names) == 2, names
    with ThreadPoolExecutor(4) as pool:
        answered = list(pool.map(lambda ref: (ref, _complete(client, ref, max_tokens=2)[1]), ADAPTERS * 5))
    by_adapter = {ref: {r for a, r in answered if a == ref} for ref in ADAPTERS}
    assert by_adapter == {ref: {home_order(ref, names)[0]} for ref in ADAPTERS}
    metrics = _metrics(served["url"])
    loads = [int(n) for n in re.findall(r'pipeline_adapter_loads_total\{replica="[^"]+"\} (\d+)', metrics)]
    assert sum(loads) == len(ADAPTERS), f"each adapter loaded once over both replicas, got {loads}"


def test_sigkill_of_a_replica_costs_no_request(served):
    """100 non-streamed requests at concurrency 8; one replica process is SIGKILLed once 10 have answered: none
    fails (the ingress sends the dead replica's requests again), Serve starts a new replica, and the dead
    engine's processes and /dev/shm segments are gone (the new replica sweeps them when it starts)."""
    from ground.processes import child_pids, pid_alive, shm_segments_of

    client = served["client"]
    before = replica_pids()
    assert len(before) == 2, before
    with ThreadPoolExecutor(4) as pool:  # the names of both replicas, from base requests Serve spreads over them
        original = {r for _, r in pool.map(lambda _: _complete(client, "tiny-base", max_tokens=1), range(16))}
    assert len(original) == 2, original
    victim = sorted(before)[0]
    engine = child_pids(victim)
    segments = shm_segments_of(engine | {victim})
    assert segments, "the replica's engine should map /dev/shm segments"
    models = ADAPTERS + ["tiny-base"]
    answered, failed, killed, killed_at = [], [], threading.Event(), []

    def one(i: int):
        try:
            resp, replica = _complete(client, models[i % len(models)], max_tokens=32)
            answered.append((resp.model, replica))
        except Exception as exc:  # any failure fails the test, reported below
            failed.append(repr(exc))
        if len(answered) >= 10 and not killed.is_set():
            killed.set()
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(100)))
    assert killed.is_set()
    assert not failed, failed[:3]
    assert len(answered) == 100
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = replica_pids()
        if len(now) == 2 and victim not in now and not any(os.path.exists(s) for s in segments):
            break
        time.sleep(1)
    now = replica_pids()
    assert len(now) == 2 and victim not in now, f"the replica did not come back: {now}"
    assert not any(pid_alive(p) for p in engine), "the dead replica's engine processes still run"
    assert not any(os.path.exists(s) for s in segments), f"left in /dev/shm: {[s for s in segments if os.path.exists(s)]}"
    load_done = time.monotonic()
    # the replica is back when a replica that is neither of the first two answers (base requests are spread)
    newcomer = set()
    while not newcomer and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            newcomer = {r for _, r in pool.map(lambda _: _complete(client, "tiny-base", max_tokens=1), range(8))}
        newcomer -= original
    assert newcomer, "no new replica answered"
    retries = int(re.search(r"pipeline_request_retries_total (\d+)", _metrics(served["url"])).group(1))
    print(f"\nSIGKILL under load: 100 requests answered {load_done - killed_at[0]:.1f} s after the kill, "
          f"{retries} retried; a new replica answered {time.monotonic() - killed_at[0]:.1f} s after the kill")


class _ShmWatch:
    """Samples, every `every_s` while a server runs: the processes below its command (Ray, the replicas, their
    engines), the /dev/shm segments they map and the replicas' owner records. A record that disappears while
    one of its segments still exists is a violation: nothing could attribute that segment any more."""

    def __init__(self, cli_pid: int, every_s: float = 0.5):
        self.cli_pid, self.every_s = cli_pid, every_s
        self.pids: dict[int, int | None] = {}  # pid -> start time (a recycled pid is not ours)
        self.segments: set[str] = set()
        self.records: dict = {}  # path -> record, for records of our replicas seen at the last sample
        self.violations: list = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        from ground.processes import child_pids, shm_segments_of
        from serve.replicas.leftovers import OWNERS_DIR
        from serve.shm_owners import start_ticks

        pids = child_pids(self.cli_pid)
        for pid in pids:
            self.pids.setdefault(pid, start_ticks(pid))
        self.segments |= shm_segments_of(pids)
        now = {}
        for path in OWNERS_DIR.glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if int(data["owner"][0]) in self.pids:
                now[path] = data
                self.segments |= set(data["segments"])
        for path, data in self.records.items():
            if path not in now and not path.exists():
                early = [s for s in data["segments"] if os.path.exists(s)]
                if early:
                    self.violations.append(f"{path.name} deleted while {early} existed")
        self.records = now

    def _loop(self) -> None:
        while not self._done.wait(self.every_s):
            self.sample()

    def alive(self) -> list[int]:
        from ground.processes import pid_alive
        from serve.shm_owners import start_ticks

        return [p for p, ticks in self.pids.items() if pid_alive(p) and start_ticks(p) == ticks]

    def __enter__(self) -> "_ShmWatch":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.sample()


def _engine_core_of(replica: int) -> int:
    from ground.processes import child_pids

    for pid in child_pids(replica):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"EngineCore" in f.read():
                    return pid
        except OSError:
            continue
    raise AssertionError(f"no EngineCore process below replica {replica}")


def _sizes(paths) -> str:
    return ", ".join(f"{p} ({os.path.getsize(p) / 2**20:.0f} MiB)" for p in sorted(paths) if os.path.exists(p))


def test_ctrl_c_under_load_after_an_engine_kill_leaves_no_shared_memory(served):
    """Runs last: it stops the module's server. One replica's engine core is SIGKILLed (its segments stay, and
    Serve replaces the replica after the failed health check); once the replacement runs, Ctrl-C while 8
    clients keep the engines busy (vLLM force-kills an engine core still busy 5 s after SIGTERM, which leaves its
    segments too). Then no segment that the server's processes mapped may remain, no owner record of its replicas
    either, and no record may ever have been deleted while one of its segments still existed."""
    from ground.processes import child_pids, shm_segments_of
    from serve.replicas.leftovers import OWNERS_DIR

    cli, client = served["cli"], served["client"]
    assert cli.poll() is None, "the server stopped before the last test"
    with _ShmWatch(cli.pid) as watch:
        ours = sorted(p for p in replica_pids() if p in watch.pids)
        assert len(ours) == 2, f"the replicas should run below the command: {ours}, {replica_pids()}"
        victim = ours[0]
        killed_engine = _engine_core_of(victim)
        killed_segments = shm_segments_of(child_pids(victim))
        assert killed_segments, "the replica's engine should map /dev/shm segments"
        os.kill(killed_engine, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 300
        # Serve's health check (every 5 s) finds the dead engine and replaces the replica
        while time.monotonic() < deadline:
            now = [p for p in replica_pids() if p in watch.pids]
            if victim not in now and len(now) == 2 and all(watch.records.get(OWNERS_DIR / f"{p}.json", {}).get(
                    "segments") for p in now):  # the replacement's engine is up
                break
            time.sleep(1)
        assert victim not in replica_pids(), "Serve did not replace the replica whose engine was killed"
        replaced_s = time.monotonic() - killed_at

        answered, busy = [], threading.Event()

        def load():
            while not busy.is_set():
                try:
                    client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=128,
                                              extra_body={"ignore_eos": True})
                    answered.append(1)
                except Exception:  # the replacement may still warm up, and the stop cuts requests off
                    time.sleep(0.2)

        clients = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 120
        while len(answered) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the engines are mid-batch now
        mapped = watch.segments | killed_segments
        sigint_at = time.monotonic()
        cli.send_signal(signal.SIGINT)
        rest, _ = cli.communicate(timeout=240)
        stop_s = time.monotonic() - sigint_at
        busy.set()
        assert cli.returncode == 0 and "stopping the server" in rest, rest[-3000:]
        deadline = time.monotonic() + 30
        while watch.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
    mapped |= watch.segments
    left = [s for s in mapped if os.path.exists(s)]
    print(f"\nengine kill + Ctrl-C under load: replica replaced {replaced_s:.1f} s after the engine kill, "
          f"{len(answered)} requests answered before the stop, stop took {stop_s:.1f} s; "
          f"{len(mapped)} segment(s) mapped during the test, {len(left)} left: {_sizes(left)}")
    assert not watch.alive(), f"processes of the server still run after the stop: {watch.alive()}"
    assert not left, f"left in /dev/shm: {_sizes(left)}"
    assert not watch.violations, watch.violations
    assert not watch.records, f"owner records left behind: {sorted(p.name for p in watch.records)}"
