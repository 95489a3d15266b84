"""The base of every config section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # forbid: a typo is an error, never a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
