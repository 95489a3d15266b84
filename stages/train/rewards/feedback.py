"""`feedback_match`: the users' own judgement as the reward, for rows built by `pipeline data from-serving`.

Each such row's ground truth is JSON naming the answers the endpoint gave to that prompt and the feedback
score each received (`{"answers": [{"completion": "...", "score": 0.8, "request_id": "req-..."}, ...]}`; a
`good` label counts 1.0, `bad` 0.0). A response that matches a captured answer gets that answer's score
(several matching answers: their mean); one that matches none gets 0.0, the same as an answer users rejected,
since nobody vouched for it. "Matches" means equal after normalising: surrounding whitespace removed, every
run of whitespace made one space, case folded.
"""

from __future__ import annotations

import json

from stages.train.rewards.registry import register_scorer

UNMATCHED_SCORE = 0.0


def normalised(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def scored_answers(ground_truth) -> list[tuple[str, float]]:
    """(normalised completion, score) for each captured answer with feedback in a from-serving ground truth."""
    data = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
        raise ValueError("the ground truth is not a from-serving answer list (JSON with an `answers` list); "
                         "build the rows with `pipeline data from-serving`, or score them with another scorer")
    return [(normalised(a["completion"]), float(a["score"])) for a in data["answers"] if a.get("score") is not None]


@register_scorer("feedback_match")
def feedback_match(solution_str: str, ground_truth: str, extra_info: dict) -> dict:
    """Users' feedback: the score of the captured answer the response equals (normalised text), else 0.0."""
    response = normalised(solution_str)
    scores = [score for answer, score in scored_answers(ground_truth) if answer == response]
    return {"score": sum(scores) / len(scores) if scores else UNMATCHED_SCORE, "acc": None}
