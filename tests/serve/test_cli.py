"""`pipeline serve` as a user runs it: starts, answers, and Ctrl-C leaves no process or shared memory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from registry import open_registry
from registry.synthetic import write_lora
from serve.server import session_pids, shm_segments_of
from tests.serve.test_server import _free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_serve_command_answers_then_ctrl_c_cleans_up(tmp_path, tiny_model_dir):
    reg = open_registry(str(tmp_path / "registry"))
    reg.publish(write_lora(tmp_path / "src"), "demo", base_dir=tiny_model_dir, alias="prod")
    port = _free_port()
    pipeline_script = os.path.join(os.path.dirname(sys.executable), "pipeline")
    cmd = [pipeline_script, "serve", "--registry", str(tmp_path / "registry"),
           "--base", str(tiny_model_dir), "--port", str(port), "--max-model-len", "256", "--kv-cache-gib", "0.0625",
           "--dtype", "float32", "--served-name", "tiny"]
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env={**os.environ, "PIPELINE_SERVE_API_KEY": "k"})
    server_sid, segments, output = None, set(), []
    try:
        for line in cli.stdout:  # the command prints one line when the server is ready
            output.append(line)
            if line.startswith("serving "):
                break
        assert cli.poll() is None, "".join(output)
        children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == cli.pid]
        server_sid = int(children[0])
        segments = shm_segments_of(session_pids(server_sid))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert client.completions.create(model="demo@prod", prompt="hi", max_tokens=3).model == "demo@1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="no", max_retries=0).models.list()

        cli.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal delivers to the command
        rest, _ = cli.communicate(timeout=60)
        assert cli.returncode == 0, "".join(output) + rest
        assert "stopping the server" in rest
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    deadline = time.monotonic() + 10
    while server_sid and session_pids(server_sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_sid is not None and session_pids(server_sid) == []
    assert segments, "the server mapped no /dev/shm/psm_* segment: nothing was checked"
    assert [s for s in segments if os.path.exists(s)] == []


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
