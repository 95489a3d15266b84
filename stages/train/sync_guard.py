"""The stale-adapter guard: after a weight sync, check that the rollout engine really has the new weights.

A sync that silently does nothing (the engine keeps sampling from the old adapter: a reload that hit a cache,
an in-place load under the wrong id, a path that was not re-read) leaves every metric looking normal while the
run trains on samples from a policy that no longer exists. So on a check step the trainer scores a few fixed
tokens (the first response it sampled, kept for the whole run) twice on each side:

    before the update: engine e0, actor a0        after the sync: engine e1, actor a1

The actor moved by da = a1 - a0, the engine by de = e1 - e0. If the actor moved (mean |da| above `MIN_MOVE`)
the engine must have moved too, by at least `MIN_SCALE` of the actor's move (norms). A stale engine scores the
probe exactly as before (de = 0) and fails. The direction (cosine of de and da, `sync/check_cosine`) is logged
but not enforced: a bf16 engine under merged sync rounds W + dW to bf16, so on a few tokens its move is
dominated by rounding. Measured on the default demo (bf16 engine, float32 actor), step 2: the actor's probe
log-probs moved 0.039 on average, the engine's 0.065, cosine -0.10; in float32 the two moves are equal.

`trainer.sync_check_freq` runs it every N steps (1: every step, 0: never); the cost is one engine scoring call
and one actor forward on one short sequence, twice, logged as `timing/sync_check`.
"""

from __future__ import annotations

import time

import torch

from ground.errors import StageError

MIN_MOVE = 1e-3  # mean |log-prob change| of the actor below which a sync cannot be told from rounding noise
MIN_SCALE = 0.1
PROBE_TOKENS = 8  # response tokens scored; the prompt is kept whole


class SyncGuard:
    """`before(...)` before the actor's update on a check step, `after(...)` once the sync has returned."""

    def __init__(self, every: int, score_on_engine, score_on_actor):
        """score_on_engine(prompt, response) / score_on_actor(prompt, response) -> per-token log-probs [n]."""
        self.every = every
        self._engine, self._actor = score_on_engine, score_on_actor
        self.probe: tuple[list[int], list[int]] | None = None
        self._before: tuple[torch.Tensor, torch.Tensor] | None = None
        self._seconds = 0.0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def _score(self) -> tuple[torch.Tensor, torch.Tensor]:
        prompt, response = self.probe
        t0 = time.perf_counter()
        engine = torch.tensor(self._engine(prompt, response), dtype=torch.float64)
        actor = torch.tensor(self._actor(prompt, response), dtype=torch.float64)
        self._seconds += time.perf_counter() - t0
        return engine, actor

    def before(self, step: int, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> None:
        """On a check step, with this step's rollout: fix the probe (first time) and score it under the old
        weights."""
        self._before, self._seconds = None, 0.0
        if not self.due(step):
            return
        if self.probe is None:
            rows = [i for i, resp in enumerate(response_ids) if resp]
            if not rows:
                return  # nothing sampled yet to probe with; the next check step tries again
            self.probe = (list(prompt_ids[rows[0]]), list(response_ids[rows[0]][:PROBE_TOKENS]))
        self._before = self._score()

    def after(self, step: int) -> dict:
        """After the sync: raise StageError naming `step` when the engine did not follow the actor."""
        if self._before is None:
            return {}
        (e0, a0), (e1, a1) = self._before, self._score()
        self._before = None
        da, de = a1 - a0, e1 - e0
        actor_move = da.abs().mean().item()
        metrics = {"sync/check_actor_move": actor_move, "sync/check_engine_move": de.abs().mean().item(),
                   "timing/sync_check": self._seconds}
        if actor_move < MIN_MOVE:
            return metrics  # the update barely changed the policy: nothing to tell apart
        cosine = torch.nn.functional.cosine_similarity(de, da, dim=0).item() if de.norm() > 0 else 0.0
        scale = (de.norm() / da.norm()).item()
        metrics["sync/check_cosine"] = cosine
        if scale < MIN_SCALE:
            raise StageError(
                f"step {step}: the rollout engine did not take the new weights. On fixed probe tokens the actor's "
                f"log-probs moved by {actor_move:.3g} on average and the engine's by {de.abs().mean().item():.3g} "
                f"(size ratio {scale:.2f}, below {MIN_SCALE}; a working sync moves the engine about as much as the actor). The engine "
                "is sampling from a stale adapter. Check the weight sync (actor_rollout_ref.rollout.lora_sync); "
                "trainer.sync_check_freq=0 turns this check off."
            )
        return metrics
