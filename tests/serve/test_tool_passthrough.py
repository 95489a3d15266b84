"""`tools` / `tool_choice` in chat requests reach vLLM unchanged through the registry middleware (which rewrites
only `model`), on a real server started by `pipeline serve --tool-call-parser hermes` and driven by the official
`openai` client.

A named `tool_choice` makes vLLM force a hermes call of that tool: the answer starts with it only if vLLM
received both fields intact (the random tiny model writes nothing like it unforced). vLLM refuses `tool_choice="auto"`
(and a named one) unless the server runs with a tool-call parser: accepted here and by the shared `--replicas 2`
server of tests/serve/conftest.py (started with `--tool-call-parser hermes` too), refused by the shared single
server, which runs without one.
"""

from __future__ import annotations

import json
import os
import signal

import openai
import pytest

from registry import open_registry
from tests.serve.adapters import make_adapters
from tests.serve.cli_server import free_port, start_cli

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    # an enum keeps the random tiny model's constrained answer short and checkable
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "enum": ["12 * 34"]}},
                   "required": ["expression"], "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is 12 * 34?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("tools-serve")
    reg = open_registry(str(root / "registry"))
    dirs, _ = make_adapters(tiny_model_dir, root, seeds=[1], max_new_tokens=1)
    reg.publish(dirs[1], "calc", base_dir=tiny_model_dir, alias="prod")
    port = free_port()
    cli, _, output = start_cli(
        ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port), "--max-loras", "1",
         "--max-model-len", "512", "--kv-cache-gib", "0.0625", "--dtype", "float32", "--served-name", "tiny-base",
         "--tool-call-parser", "hermes"])
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        cli.send_signal(signal.SIGINT)  # Ctrl-C: the command stops its server and engine
        rest, _ = cli.communicate(timeout=90)
        assert cli.returncode == 0 and "stopping the server" in rest, output + rest
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()


def _assert_forced_calculator_call(message):
    # vLLM forces the hermes call of the named tool, then the arguments under the schema; the random tiny model
    # may not close the JSON within max_tokens (then the parser leaves the text as content), but the forced
    # call of `calculator` is there either way: vLLM got the tool and the choice
    if message.tool_calls:
        assert message.tool_calls[0].function.name == "calculator"
        assert json.loads(message.tool_calls[0].function.arguments) == {"expression": "12 * 34"}
    else:
        assert message.content.startswith('<tool_call>{"name": "calculator", "arguments": '), message


@pytest.mark.parametrize("model", ["calc@prod", "tiny-base"])  # rewritten by the middleware, and passed as is
def test_a_named_tool_choice_comes_back_as_a_call_of_that_tool(server, model):
    reply = server.chat.completions.create(
        model=model, messages=MESSAGES, tools=[CALCULATOR], max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "calculator"}})
    _assert_forced_calculator_call(reply.choices[0].message)
    if model == "calc@prod":
        assert reply.model == "calc@1"  # the middleware pinned it, and left the tool fields alone


def test_auto_tool_choice_and_a_tool_conversation_are_accepted(server):
    reply = server.chat.completions.create(model="calc@prod", messages=MESSAGES, tools=[CALCULATOR],
                                           tool_choice="auto", max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the turn after a call: the assistant's tool_calls and the tool's answer as messages
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": "12 * 34"})}}
    history = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "408"}]
    reply = server.chat.completions.create(model="calc@prod", messages=history, tools=[CALCULATOR],
                                           max_tokens=8, temperature=0)
    assert reply.model == "calc@1" and reply.choices[0].message.content is not None


@pytest.mark.parametrize("choice", ["auto", {"type": "function", "function": {"name": "calculator"}}])
def test_tool_choice_is_refused_by_a_server_without_a_parser(shared_server, choice):
    """The same requests on the shared `pipeline serve` (no --tool-call-parser): vLLM answers 400 naming the flag."""
    client = shared_server.ensure_started().client()
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        client.chat.completions.create(model="tiny-base", messages=MESSAGES, tools=[CALCULATOR], tool_choice=choice,
                                       max_tokens=8, temperature=0)


def test_the_replicas_parse_tool_calls_with_the_flag(shared_replicated_server):
    """`--replicas 2 --tool-call-parser hermes`: each replica's engine got the parser (serve/replicas/replica.py)."""
    client = shared_replicated_server.ensure_started().client(timeout=120)
    reply = client.chat.completions.create(
        model="tiny-base", messages=MESSAGES, tools=[CALCULATOR], max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "calculator"}})
    _assert_forced_calculator_call(reply.choices[0].message)
    reply = client.chat.completions.create(model="tiny-base", messages=MESSAGES, tools=[CALCULATOR],
                                           tool_choice="auto", max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
