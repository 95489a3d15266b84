"""Running one tool call so that nothing it does can fail the rollout step.

Each call runs on a daemon thread with its own event loop, awaited with the tool's `timeout`: a tool that
blocks (a sync `time.sleep`, a busy loop) times out like one that awaits. A raise or a timeout becomes an
error text the model reads as the tool's answer; the thread of a timed-out call is left to finish on its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from dataclasses import dataclass, field

from stages.train.tools.base import BaseTool
from stages.train.tools.hermes import ToolCall

log = logging.getLogger(__name__)


@dataclass
class ToolResult:
    text: str
    reward: float = 0.0
    metrics: dict = field(default_factory=dict)
    error: bool = False


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


def _on_thread(make_coro) -> asyncio.Future:
    """The result of `make_coro()` run on a new daemon thread, as a future of the calling loop."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(result, exc):
        if not future.done():  # cancelled by a timeout meanwhile
            future.set_exception(exc) if exc is not None else future.set_result(result)

    def target():
        try:
            result, exc = asyncio.run(make_coro()), None
        except BaseException as caught:  # noqa: BLE001 - handed to the awaiting loop
            result, exc = None, caught
        try:
            loop.call_soon_threadsafe(deliver, result, exc)
        except RuntimeError:  # the rollout's loop is gone: nobody waits for this answer any more
            pass

    threading.Thread(target=target, name="tool-call", daemon=True).start()
    return future


async def run_tool_call(tools: dict[str, BaseTool], instance_ids: dict[str, str], call: ToolCall,
                        **kwargs) -> ToolResult:
    """Execute `call` with the sample's tool instance; every failure is an error text, never an exception."""
    if call.error:
        return ToolResult(call.error, error=True)
    tool = tools.get(call.name)
    if tool is None:
        return ToolResult(f"Error: there is no tool named {call.name!r}; tools: {', '.join(tools) or 'none'}.",
                          error=True)
    try:
        response, reward, metrics = await asyncio.wait_for(
            _on_thread(lambda: _maybe_await(tool.execute(instance_ids[call.name], call.arguments, **kwargs))),
            timeout=tool.timeout)
    except asyncio.TimeoutError:
        return ToolResult(f"Error: tool {call.name!r} timed out after {tool.timeout:g} s.", error=True)
    except Exception as exc:  # noqa: BLE001 - a tool's bug must not fail the step
        log.debug("tool %s raised", call.name, exc_info=True)
        return ToolResult(f"Error: tool {call.name!r} raised {type(exc).__name__}: {exc}", error=True)
    text = getattr(response, "text", response)
    return ToolResult(str(text if text is not None else ""), float(reward or 0.0), dict(metrics or {}))
