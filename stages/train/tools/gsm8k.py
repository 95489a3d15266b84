"""verl's GSM8K tool (`verl.tools.gsm8k_tool.Gsm8kTool`): the model submits its answer as a tool call and reads
whether it is right; the step reward discourages resubmitting an answer that is no better.

The ground truth comes from the row: `extra_info.tools_kwargs.calc_gsm8k_reward.create_kwargs.ground_truth`
(verl's GSM8K preprocessing writes it there).
"""

from __future__ import annotations

import uuid
from typing import Any

from stages.train.rewards.scorers import gsm8k_flexible
from stages.train.tools.base import BaseTool, ToolResponse


class Gsm8kTool(BaseTool):
    def __init__(self, config: dict, tool_schema: dict):
        super().__init__(config, tool_schema)
        self._instances: dict[str, dict] = {}

    async def create(self, instance_id: str | None = None, ground_truth: str | None = None, **kwargs) -> str:
        instance_id = instance_id or str(uuid.uuid4())
        self._instances[instance_id] = {"response": "", "ground_truth": ground_truth, "reward": 0.0}
        return instance_id

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[ToolResponse, float, dict]:
        state = self._instances[instance_id]
        answer = str(parameters.get("answer", ""))
        state["response"] = answer if answer.startswith("#### ") else f"#### {answer}"
        reward = await self.calc_reward(instance_id)
        step_reward = 0.0 if reward > state["reward"] else -0.05  # as verl: penalise a non-improving resubmission
        state["reward"] = reward
        return ToolResponse(f"Current parsed answer={answer!r} reward={reward}"), step_reward, {}

    async def calc_reward(self, instance_id: str, **kwargs) -> float:
        state = self._instances[instance_id]
        if state["ground_truth"] is None:
            return 0.0
        return float(gsm8k_flexible(state["response"], str(state["ground_truth"]), {})["score"])

    async def release(self, instance_id: str, **kwargs) -> None:
        self._instances.pop(instance_id, None)
