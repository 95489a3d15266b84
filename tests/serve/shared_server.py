"""The real `pipeline serve` servers that several test modules share (fixtures and lifetimes:
tests/serve/conftest.py): one single server and one `--replicas 2`, over one registry.

Their flags are the union of what those modules need: three adapter slots and a 1 s alias TTL (test_routes*.py),
`--auto-rollback` on the single server, which acts only on a route whose candidate fails (test_version_metrics.py;
no route of the other modules has one), and `--max-n 3` on both (test_same_answers.py, whose requests ask for one
answer otherwise).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai

from tests.serve.adapters import make_adapters
from tests.serve.cli_server import free_port, ppid, read_until_ready
from tests.serve.route_checks import MAX_TOKENS  # the greedy answers that tell the `alpha` versions apart

API_KEY = "shared-serve-key-41"
ALIAS_TTL_S = 1.0
MAX_N = 3
# what test_version_metrics.py judges a candidate on: 5 answers in a 30 s window, error rate above 0.2; its
# latency limit is out of reach (1000x), since the tiny model's timings on a loaded 2-core machine prove nothing
ROLLOUT_WINDOW_S, ROLLOUT_MIN_REQUESTS, ROLLOUT_MAX_ERROR_RATE = 30.0, 5, 0.2
COMMON = ["--max-loras", "3", "--max-model-len", "256", "--kv-cache-gib", "0.0625", "--dtype", "float32",
          "--served-name", "tiny-base", "--alias-ttl", str(ALIAS_TTL_S), "--max-n", str(MAX_N)]
SINGLE = ["--auto-rollback", "--rollout-window-s", str(ROLLOUT_WINDOW_S), "--rollout-min-requests",
          str(ROLLOUT_MIN_REQUESTS), "--rollout-max-error-rate", str(ROLLOUT_MAX_ERROR_RATE),
          "--rollout-max-latency-ratio", "1000"]
# the replicas parse hermes tool calls, the single server parses none: test_tool_passthrough.py checks both modes
REPLICATED = ["--replicas", "2", "--tool-call-parser", "hermes"]


def our_replica_pids(cli_pid: int) -> set[int]:
    """The replica processes below the command `cli_pid` (other servers' replicas may run on the same machine)."""
    from tests.serve.test_replicas import replica_pids

    ours = set()
    for pid in replica_pids():
        ancestor = pid
        while ancestor not in (None, 0, 1) and ancestor != cli_pid:
            ancestor = ppid(ancestor)
        if ancestor == cli_pid:
            ours.add(pid)
    return ours


class SharedServer:
    """`pipeline serve` over `registry_dir`, started on first use; `stop()` is its Ctrl-C and checks the exit."""

    def __init__(self, registry_dir, base_dir, args: list[str], replicated: bool):
        self.registry_dir, self.base_dir, self.args, self.replicated = registry_dir, base_dir, args, replicated
        self.api_key = API_KEY
        self.cli = None
        self.replica_exit_s = 30.0  # how long its replicas may take to go once the command has exited

    @property
    def running(self) -> bool:
        return self.cli is not None

    def launch(self) -> None:
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        script = os.path.join(os.path.dirname(sys.executable), "pipeline")
        self.cli = subprocess.Popen(
            [script, "serve", "--registry", str(self.registry_dir), "--base", str(self.base_dir), "--port",
             str(self.port), *COMMON, *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "PIPELINE_SERVE_API_KEY": API_KEY})
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.url = self.base_url + "/v1"

    def wait_ready(self) -> None:
        try:
            self.output = read_until_ready(self.cli, 420 if self.replicated else 300)
        except BaseException:
            os.killpg(self.cli.pid, signal.SIGKILL)
            self.cli.wait()
            self.cli = None
            raise
        found = re.search(r"\(log: (\S+)\)", self.output)
        self.log = found.group(1) if found else None

    def ensure_started(self) -> "SharedServer":
        start_together(self)
        return self

    def client(self, timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=API_KEY, max_retries=0, timeout=timeout)

    def stop(self) -> None:
        cli, self.cli = self.cli, None
        if cli is None:
            return
        try:
            # this server's replicas, taken while they still descend from the command (its exit orphans them);
            # other servers' replicas on the machine (other sessions, other modules) are none of its business
            ours = our_replica_pids(cli.pid) if self.replicated else set()
            cli.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal delivers to the command
            rest, _ = cli.communicate(timeout=180 if self.replicated else 90)
            assert cli.returncode == 0 and "stopping the server" in rest, self.output + rest
            if self.replicated:  # and none of its replicas outlives the command
                from tests.serve.test_replicas import replica_pids

                deadline = time.monotonic() + self.replica_exit_s
                while ours & set(replica_pids()) and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert not ours & set(replica_pids()), f"replicas {sorted(ours & set(replica_pids()))} outlived it"
        finally:
            if cli.poll() is None:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait()


def start_together(*servers: SharedServer) -> None:
    """Start those not running at once (their start-ups overlap), then wait until every one answers."""
    starting = [server for server in servers if not server.running]
    for server in starting:
        server.launch()
    for server in starting:
        server.wait_ready()


class SharedServers:
    """The session's shared servers and their registry. `alpha` there (see `alpha()`) is every module's."""

    def __init__(self, root, base_dir):
        self.root, self.base_dir = root, base_dir
        self.registry_dir = root / "registry"
        self.single = SharedServer(self.registry_dir, base_dir, SINGLE, replicated=False)
        self.replicated = SharedServer(self.registry_dir, base_dir, REPLICATED, replicated=True)
        self._alpha = None

    def alpha(self) -> dict[str, list[int]]:
        """alpha 1 (alias prod), 2 (alias canary), 3 (latest), three PEFT adapters with different greedy answers,
        published once; {ref: its greedy token ids for tests.serve.adapters.PROMPT}. Modules that route `alpha`
        clear its route when they are done."""
        if self._alpha is None:
            from registry import open_registry

            reg = open_registry(str(self.registry_dir))
            dirs, answers = make_adapters(self.base_dir, self.root / "alpha", seeds=[1, 2, 3],
                                          max_new_tokens=MAX_TOKENS)
            expected = {reg.publish(dirs[seed], "alpha", base_dir=self.base_dir).ref: answers[seed]
                        for seed in (1, 2, 3)}
            assert len({tuple(ids[:2]) for ids in expected.values()}) == 3, "the three versions must answer differently"
            reg.set_alias("alpha", "prod", 1)
            reg.set_alias("alpha", "canary", 2)
            self._alpha = expected
        return self._alpha
