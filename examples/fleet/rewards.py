"""The example fleet's custom reward (examples/fleet/fleet.yaml): the `spell` member's answer must be the sum
spelled out as one English word ("seven"). 1.0 when the first word of the answer is it, else 0.0."""

import re


def spelled_score(data_source, solution_str, ground_truth, extra_info):
    words = re.findall(r"[a-z]+", solution_str.lower())
    right = float(bool(words) and words[0] == str(ground_truth).lower())
    return {"score": right, "acc": right}
