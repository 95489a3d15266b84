"""`tools` / `tool_choice` in chat requests reach vLLM unchanged through the registry middleware (which rewrites
only `model`), on a real server started with vLLM's tool parser flags and driven by the official `openai` client.

A named `tool_choice` makes vLLM force a hermes call of that tool: the answer starts with it only if vLLM
received both fields intact (the random tiny model writes nothing like it unforced). `tool_choice="auto"` is refused by
vLLM unless the server runs with `--enable-auto-tool-choice --tool-call-parser hermes`; here it is accepted.
"""

from __future__ import annotations

import json

import openai
import pytest

from registry import open_registry
from serve.server import start_server
from tests.serve.adapters import make_adapters
from tests.serve.cli_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TOOL_PARSER_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
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
    handle = start_server(tiny_model_dir, registry_uri=str(root / "registry"), port=free_port(), max_loras=1,
                          max_model_len=512, kv_cache_gib=0.0625, dtype="float32", base_name="tiny-base",
                          extra_args=TOOL_PARSER_FLAGS)
    try:
        yield openai.OpenAI(base_url=handle.url, api_key="unused", max_retries=0, timeout=120)
    finally:
        handle.stop()


@pytest.mark.parametrize("model", ["calc@prod", "tiny-base"])  # rewritten by the middleware, and passed as is
def test_a_named_tool_choice_comes_back_as_a_call_of_that_tool(server, model):
    reply = server.chat.completions.create(
        model=model, messages=MESSAGES, tools=[CALCULATOR], max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "calculator"}})
    message = reply.choices[0].message
    # vLLM forces the hermes call of the named tool, then the arguments under the schema; the random tiny model
    # may not close the JSON within max_tokens (then the parser leaves the text as content), but the forced
    # call of `calculator` is there either way: vLLM got the tool and the choice
    if message.tool_calls:
        assert message.tool_calls[0].function.name == "calculator"
        assert json.loads(message.tool_calls[0].function.arguments) == {"expression": "12 * 34"}
    else:
        assert message.content.startswith('<tool_call>{"name": "calculator", "arguments": '), message
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
