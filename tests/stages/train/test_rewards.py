"""Reward scorers on realistic model outputs, dispatch by data_source, custom scorers and their error paths."""

from __future__ import annotations

import pytest

from config import Config
from ground.errors import ConfigError, RewardError
from stages.train.rewards import REWARD_SCORERS, RewardFunction, load_custom_scorer
from stages.train.rewards.scorers import extract_arithmetic_answer, last_boxed, math_equal


def score(name, solution, truth, extra=None):
    return REWARD_SCORERS[name].fn(solution, truth, extra or {})


# --------------------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("solution, strict, flexible", [
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72", 1.0, 1.0),
    ("She sold 48 + 24 = 72 clips in total.\n#### 72.", 1.0, 1.0),
    ("The total is $1,072.\n#### $1,072", 0.0, 0.0),  # wrong value (truth 72)
    ("48 + 24 = 72 clips, so the answer is 72", 0.0, 1.0),  # no marker: only flexible finds it
    ("#### 72\nWait, let me recheck: 48 + 24 = 70. #### 70", 0.0, 0.0),  # last marker counts
    ("I cannot solve this.", 0.0, 0.0),
])
def test_gsm8k_strict_and_flexible(solution, strict, flexible):
    assert score("gsm8k", solution, "72")["score"] == strict
    assert score("gsm8k_flexible", solution, "72")["score"] == flexible


def test_gsm8k_thousands_separator():
    assert score("gsm8k", "5 * 214.4 = 1,072\n#### 1,072", "1072") == {"score": 1.0, "acc": 1.0}


# ---------------------------------------------------------------------------------------------------- math


def test_last_boxed_handles_nesting_and_truncation():
    assert last_boxed("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert last_boxed("first \\boxed{3} then \\boxed{4}") == "4"
    assert last_boxed("\\boxed 5$ done") == "5"
    assert last_boxed("\\boxed{\\frac{1}{2") is None
    assert last_boxed("no box here") is None


@pytest.mark.parametrize("pred, truth, equal", [
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("x = 3", "3", True),
    ("10\\%", "10", True),
    ("90^\\circ", "90", True),
    ("\\text{(B)}", "(B)", True),
    ("\\left( 3, 4 \\right)", "(3,4)", True),
    ("3", "4", False),
    ("\\frac{1}{3}", "0.33", False),
])
def test_math_equivalence(pred, truth, equal):
    assert math_equal(pred, truth) is equal


def test_math_scorer_on_realistic_outputs():
    long = ("We need $x^2 = 4$ with $x > 0$. Taking square roots, $x = 2$. Checking: $2^2 = 4$. "
            "The answer is $\\boxed{2}$.")
    assert score("math", long, "2")["acc"] == 1.0
    # the ground truth may be a full MATH solution: its box is used
    assert score("math", long, "Since $x^2=4$ and $x>0$, $x=\\boxed{2}$.")["score"] == 1.0
    assert score("math", "The answer is 2.", "2")["score"] == 0.0  # no box: not accepted
    assert score("math", "\\boxed{3}", "2") == {"score": 0.0, "acc": 0.0}


# ---------------------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("solution, expected", [
    ("8", "8"),
    ("8.", "8"),
    ("3 + 5 = 8", "8"),
    ("The answer is 8. (3 + 5)", "8"),
    ("Let me think: 3 plus 5. 7, no wait, 8", "8"),
    ("Answer: **8**\n\nI hope this helps! Ask me 2 more questions.", "8"),
    ("\\boxed{8} because 3 + 5 = 8", "8"),
    ("3 - 5 = -2", "-2"),
    ("3-5", "5"),
    ("I don't know.", None),
])
def test_arithmetic_extraction_rule(solution, expected):
    assert extract_arithmetic_answer(solution) == expected


@pytest.mark.parametrize("solution, truth, reward", [
    ("8", "8", 1.0),
    ("3 + 5 = 8", "8", 1.0),
    ("The sum of 3 and 5 is 8.", "8", 1.0),
    ("8.0", "8", 1.0),
    ("8.5", "8", 0.0),
    ("3 + 5", "8", 0.0),
    ("The answer is 8. Or maybe 9", "8", 1.0),
    ("-2", "-2", 1.0),
    ("2", "-2", 0.0),
    ("", "8", 0.0),
])
def test_arithmetic_scorer(solution, truth, reward):
    assert score("arithmetic", solution, truth) == {"score": reward, "acc": reward}


def test_format_reward():
    good = "<think>3 plus 5 is 8</think>\n<answer>8</answer>"
    assert score("format", good, "8") == {"score": 1.0, "acc": None}
    assert score("format", "<answer>8</answer>", "8")["score"] == 0.0
    assert score("format", "8", "8", {"format_regex": r"-?\d+"})["score"] == 1.0
    assert score("format", "The answer is 8", "8", {"format_regex": r"-?\d+"})["score"] == 0.0


# ------------------------------------------------------------------------------------------ RewardFunction


def test_reward_function_dispatches_by_data_source():
    fn = RewardFunction(Config())
    out = fn(["arithmetic", "openai/gsm8k", "lighteval/MATH", "math"],
             ["3 + 5 = 8", "#### 72", "\\boxed{\\frac{1}{2}}", "\\boxed{7}"],
             ["8", "72", "0.5", "6"],
             [None, {"split": "test"}, {}, {}])
    assert [r["score"] for r in out] == [1.0, 1.0, 1.0, 0.0]
    assert [r["acc"] for r in out] == [1.0, 1.0, 1.0, 0.0]


def test_unknown_data_source_names_row_and_fix():
    with pytest.raises(RewardError) as err:
        RewardFunction(Config())(["arithmetic", "my/dataset"], ["1", "2"], ["1", "2"])
    msg = str(err.value)
    assert "row 1" in msg and "my/dataset" in msg and "custom_reward_function.path" in msg


def test_forced_scorer():
    cfg = Config()
    cfg.reward_model.scorer = "gsm8k_flexible"
    assert RewardFunction(cfg)(["openai/gsm8k"], ["it is 72"], ["72"])[0]["score"] == 1.0
    cfg.reward_model.scorer = "nope"
    with pytest.raises(ConfigError, match="reward_model.scorer='nope'"):
        RewardFunction(cfg)


# ---------------------------------------------------------------------------------------------- custom scorer

CUSTOM = '''
def compute_score(data_source, solution_str, ground_truth, extra_info):
    if "boom" in solution_str:
        raise ValueError("cannot parse")
    if "text" in solution_str:
        return "high"
    if "dict" in solution_str:
        return {"score": 0.5, "acc": True, "length": len(solution_str)}
    return float(len(solution_str) == int(ground_truth))

def other(data_source, solution_str, ground_truth, extra_info):
    return 2

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def custom_cfg(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(CUSTOM)
    cfg = Config()
    cfg.custom_reward_function.path = str(path)
    return cfg


def test_custom_scorer_float_and_dict(custom_cfg):
    fn = RewardFunction(custom_cfg)
    out = fn(["anything", "x"], ["abc", "a dict"], ["3", "0"], [{}, {}])
    assert out[0] == {"score": 1.0, "acc": None}
    assert out[1] == {"score": 0.5, "acc": 1.0, "length": 6}
    custom_cfg.custom_reward_function.name = "other"
    assert RewardFunction(custom_cfg)(["x"], ["y"], ["z"])[0]["score"] == 2.0


def test_custom_scorer_errors_name_scorer_and_row(custom_cfg):
    fn = RewardFunction(custom_cfg)
    with pytest.raises(RewardError) as err:
        fn(["a", "b", "c"], ["ok", "ok", "boom"], ["1", "1", "1"])
    msg = str(err.value)
    assert "compute_score" in msg and "row 2" in msg and "data_source='c'" in msg and "cannot parse" in msg
    with pytest.raises(RewardError, match=r"row 0 \(data_source='a'\) returned score 'high'"):
        fn(["a"], ["text"], ["1"])


def test_custom_scorer_load_errors(tmp_path, custom_cfg):
    with pytest.raises(ConfigError, match="no such file"):
        load_custom_scorer(str(tmp_path / "missing.py"))
    path = custom_cfg.custom_reward_function.path
    with pytest.raises(ConfigError, match="functions there: compute_score, other"):
        load_custom_scorer(path, "score_fn")
    with pytest.raises(ConfigError, match="not a function"):
        load_custom_scorer(path, "NOT_A_FUNCTION")
    broken = tmp_path / "broken.py"
    broken.write_text("def compute_score(:\n")
    with pytest.raises(ConfigError, match="failed to import: SyntaxError"):
        load_custom_scorer(str(broken))
