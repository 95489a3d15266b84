"""A calculator tool: arithmetic on numbers with + - * / // % ** and parentheses, evaluated on the `ast`.

Never `eval`: the expression is parsed and only number literals, the operators above and unary signs are
walked; anything else (names, calls, attributes) is refused. Exponents and results are bounded so `9**9**9`
cannot hang the rollout.
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction
from typing import Any

from stages.train.tools.base import BaseTool, ToolResponse

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
MAX_DIGITS = 100
MAX_LENGTH = 200  # characters of an expression


class CalculatorError(ValueError):
    pass


def _walk(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        value = _BINARY[type(node.op)](left, right)
        if len(str(abs(value.numerator))) > MAX_DIGITS:
            raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
        return value
    raise CalculatorError(f"only numbers and + - * / // % ** ( ) are allowed, not {ast.unparse(node)!r}")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text: an integer when whole, else a decimal (10 places)."""
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"the expression is over {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"{expression!r} is not an arithmetic expression") from None
    value = _walk(tree)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 37 * 48"}},
            "required": ["expression"],
        },
    },
}


class CalculatorTool(BaseTool):
    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[ToolResponse, float, dict]:
        expression = parameters.get("expression")
        if not isinstance(expression, str):
            return ToolResponse(f"Error: calculator needs a string `expression`, got {expression!r}"), 0.0, {"ok": 0}
        try:
            return ToolResponse(calculate(expression)), 0.0, {"ok": 1}
        except CalculatorError as exc:
            return ToolResponse(f"Error: {exc}"), 0.0, {"ok": 0}
