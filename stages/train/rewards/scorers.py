"""Rule-based reward scorers: GSM8K, math with \\boxed{}, the synthetic arithmetic task, and a format reward.

Each returns {"score": float, "acc": 1.0/0.0 or None}. Correct answers score 1.0, everything else 0.0: a
partial "format" credit would reward the model for the marker without the answer.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

from stages.train.rewards.registry import register_scorer

# A number as written in prose: optional minus, digits with optional thousands commas, optional decimals.
# The look-behind keeps "3-5" from reading as "3" and "-5", and "x2" or "1.5.3" from yielding stray pieces.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")


def parse_number(text: str) -> Optional[Fraction]:
    """'1,234', '$72', '-3.50', '8.' -> an exact Fraction; anything else -> None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_in(text: str) -> list[str]:
    return _NUMBER.findall(text)


def _result(correct: bool) -> dict:
    return {"score": 1.0 if correct else 0.0, "acc": 1.0 if correct else 0.0}


def _same_number(pred: Optional[str], truth: str) -> bool:
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(truth)
    return a is not None and a == b


# --------------------------------------------------------------------------------------------------- GSM8K

_GSM8K_MARKER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def extract_gsm8k_answer(solution: str, flexible: bool = False) -> Optional[str]:
    """Strict: the number after the last `####`. Flexible: the last number anywhere in the text."""
    if flexible:
        found = numbers_in(solution)
    else:
        found = _GSM8K_MARKER.findall(solution)
    return found[-1] if found else None


@register_scorer("gsm8k", data_sources=("openai/gsm8k",))
def gsm8k_strict(solution_str: str, ground_truth: str, extra_info: dict) -> dict:
    """GSM8K, strict: the number after the last `#### ` must equal the ground truth (commas, $ ignored)."""
    return _result(_same_number(extract_gsm8k_answer(solution_str), ground_truth))


@register_scorer("gsm8k_flexible")
def gsm8k_flexible(solution_str: str, ground_truth: str, extra_info: dict) -> dict:
    """GSM8K, flexible: the last number anywhere in the response must equal the ground truth."""
    return _result(_same_number(extract_gsm8k_answer(solution_str, flexible=True), ground_truth))


# ---------------------------------------------------------------------------------------------------- math


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; `\\boxed 5` form too; else None."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    if max(boxed, fbox) < 0:
        return None
    rest = text[boxed + len("\\boxed"):] if boxed > fbox else text[fbox + len("\\fbox"):]
    if rest.startswith(" "):  # "\boxed 5$": the answer runs to the next $ or whitespace
        return re.split(r"[\s$]", rest.strip())[0] or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the response was cut off inside the box


def _unwrap(text: str, command: str) -> str:
    """'\\text{cm}' -> 'cm' for a one-argument command (innermost braces only, repeated)."""
    pattern = re.compile(re.escape(command) + r"\{([^{}]*)\}")
    while True:
        new = pattern.sub(r"\1", text)
        if new == text:
            return text
        text = new


def normalize_math_answer(answer: str) -> str:
    """A canonical string for comparing final answers (in the spirit of Hendrycks et al.'s MATH grader)."""
    s = answer.strip().replace("\n", "").replace("\\!", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    for command in ("\\text", "\\mathrm", "\\textbf", "\\mbox"):
        s = _unwrap(s, command)
    s = s.replace(" ", "").rstrip(".")
    # "x=5" or "k=5": the value is the answer.
    if "=" in s and len(s.split("=")[0]) <= 2:
        s = s.split("=", 1)[1]
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d+/\d+", s):  # 1/2 -> \frac{1}{2}
        num, den = s.split("/")
        s = f"\\frac{{{num}}}{{{den}}}"
    if s.startswith("."):
        s = "0" + s
    return s


def _math_value(normalized: str) -> Optional[Fraction]:
    """The exact value of a plain number or a simple fraction, for 0.5 == \\frac{1}{2}."""
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", normalized)
    if frac:
        value = Fraction(int(frac.group(2)), int(frac.group(3))) if int(frac.group(3)) else None
        return -value if value is not None and frac.group(1) else value
    return parse_number(normalized) if re.fullmatch(r"-?[\d,]*\.?\d+", normalized) else None


def math_equal(pred: str, truth: str) -> bool:
    a, b = normalize_math_answer(pred), normalize_math_answer(truth)
    if a == b:
        return True
    va, vb = _math_value(a), _math_value(b)
    return va is not None and va == vb


@register_scorer("math", data_sources=("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval",
                                       "HuggingFaceH4/MATH-500"))
def math_boxed(solution_str: str, ground_truth: str, extra_info: dict) -> dict:
    """Math: the last \\boxed{} answer must equal the ground truth after LaTeX normalisation (0.5 == \\frac{1}{2})."""
    pred = last_boxed(solution_str)
    truth = last_boxed(ground_truth) or ground_truth  # a full MATH solution as ground truth: use its box
    return _result(pred is not None and math_equal(pred, truth))


# ---------------------------------------------------------------------------------------------- arithmetic

_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:|=)?\s*[:=]?\s*\**\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def extract_arithmetic_answer(solution: str) -> Optional[str]:
    """The final answer of a response to "What is a + b?", by the first rule that finds a number:

    1. the last `\\boxed{N}`; 2. the last "answer is N" / "answer: N"; 3. the last `#### N`;
    4. otherwise the last number in the response ("3 + 5 = 8" -> 8; "7, no wait, 8" -> 8).
    Explicit markers win over position, so "The answer is 8. (3 + 5)" reads 8, not 5.
    """
    boxed = last_boxed(solution)
    if boxed is not None and numbers_in(boxed):
        return numbers_in(boxed)[-1]
    phrase = _ANSWER_PHRASE.findall(solution)
    if phrase:
        return phrase[-1]
    marker = _GSM8K_MARKER.findall(solution)
    if marker:
        return marker[-1]
    found = numbers_in(solution)
    return found[-1] if found else None


@register_scorer("arithmetic")
def arithmetic(solution_str: str, ground_truth: str, extra_info: dict) -> dict:
    """Arithmetic: 1.0 when the response's final answer (boxed > "answer is" > #### > last number) equals the truth."""
    return _result(_same_number(extract_arithmetic_answer(solution_str), str(ground_truth)))


# -------------------------------------------------------------------------------------------------- format

DEFAULT_FORMAT_REGEX = r"<think>.*?</think>\s*<answer>.*?</answer>"


@register_scorer("format")
def format_reward(solution_str: str, ground_truth: str, extra_info: dict) -> dict:
    """Format: 1.0 when the whole response matches extra_info['format_regex'] (default <think>..</think><answer>..</answer>)."""
    pattern = (extra_info or {}).get("format_regex") or DEFAULT_FORMAT_REGEX
    matched = re.fullmatch(pattern, solution_str.strip(), flags=re.DOTALL) is not None
    return {"score": 1.0 if matched else 0.0, "acc": None}
