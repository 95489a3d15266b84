"""The stale-adapter guard's decision (stages/train/sync_guard.py) on log-probs given by hand.

The real engine and workers, with a sync broken on purpose, are in test_sync_guard_training.py.
"""

from __future__ import annotations

import pytest

from ground.errors import StageError
from stages.train.sync_guard import SyncGuard


class Scores:
    """Per-token log-probs of the probe, returned in turn (before the update, then after the sync)."""

    def __init__(self, *rows):
        self.rows = list(rows)

    def __call__(self, prompt, response):
        assert len(response) == 3
        return self.rows.pop(0)


PROMPTS, RESPONSES = [[1, 2], [3, 4]], [[], [5, 6, 7]]


def _guard(engine_rows, actor_rows, every=1):
    return SyncGuard(every, Scores(*engine_rows), Scores(*actor_rows))


def test_an_engine_that_follows_the_actor_passes_and_the_probe_is_the_first_sampled_response():
    guard = _guard([[-1.0, -2.0, -3.0], [-0.81, -2.2, -2.9]], [[-1.0, -2.0, -3.0], [-0.8, -2.2, -2.9]])
    guard.before(1, PROMPTS, RESPONSES)
    assert guard.probe == ([3, 4], [5, 6, 7])  # row 0's response is empty
    metrics = guard.after(1)
    assert metrics["sync/check_cosine"] > 0.99 and metrics["timing/sync_check"] >= 0


def test_an_engine_that_kept_the_old_weights_fails_naming_the_step():
    same = [-1.0, -2.0, -3.0]
    guard = _guard([same, same], [same, [-0.8, -2.2, -2.9]])
    guard.before(7, PROMPTS, RESPONSES)
    with pytest.raises(StageError, match=r"^step 7: the rollout engine did not take the new weights"):
        guard.after(7)


def test_an_engine_that_barely_moved_fails():
    guard = _guard([[-1.0, -2.0, -3.0], [-0.99, -2.01, -3.0]], [[-1.0, -2.0, -3.0], [-0.8, -2.2, -2.9]])
    guard.before(2, PROMPTS, RESPONSES)
    with pytest.raises(StageError, match="step 2"):
        guard.after(2)


def test_an_engine_whose_move_is_rounding_noise_in_direction_passes():
    # the demo's bf16 engine at step 2: it moved more than the actor, in a direction the rounding decided
    guard = _guard([[-1.0, -2.0, -3.0], [-1.2, -1.8, -3.1]], [[-1.0, -2.0, -3.0], [-0.8, -2.2, -2.9]])
    guard.before(2, PROMPTS, RESPONSES)
    assert guard.after(2)["sync/check_cosine"] < 0


def test_an_engine_that_shows_part_of_the_move_with_rounding_noise_passes():
    # a bf16 engine under merged sync: a third of the actor's move, one token off in direction
    guard = _guard([[-1.0, -2.0, -3.0], [-0.93, -2.03, -3.04]], [[-1.0, -2.0, -3.0], [-0.8, -2.2, -2.9]])
    guard.before(3, PROMPTS, RESPONSES)
    assert 0 < guard.after(3)["sync/check_cosine"] < 0.9


def test_no_actor_move_means_nothing_to_check():
    same = [-1.0, -2.0, -3.0]
    guard = _guard([same, same], [same, same])
    guard.before(1, PROMPTS, RESPONSES)
    assert "sync/check_cosine" not in guard.after(1)


def test_every_n_steps_and_off():
    every3 = _guard([], [], every=3)
    assert [s for s in range(1, 10) if every3.due(s)] == [3, 6, 9]
    off = _guard([], [], every=0)
    off.before(1, PROMPTS, RESPONSES)  # scores nothing: the empty Scores would fail
    assert off.after(1) == {} and off.probe is None
