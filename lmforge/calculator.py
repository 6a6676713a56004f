"""The calculator tool: a safe arithmetic evaluator (no `eval`) for `<|tool|>expr<|/tool|>` calls.

Only numbers, + - * / // % **, unary signs and parentheses are accepted, read from Python's own
parse tree; names, calls, attributes, strings, comparisons and everything else are refused.
Sizes are bounded so that no expression can take long or much memory: the expression's length,
its nesting, exponents and the digits of every intermediate result.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 200
MAX_DEPTH = 30
MAX_EXPONENT = 1000
MAX_DIGITS = 100

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not arithmetic, too large, or undefined (division by zero)."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text: integers exactly, other numbers to 12
    significant digits ("7", "0.333333333333"); CalculatorError for anything else."""
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError("not an arithmetic expression") from None
    value = _value(tree.body, 0)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def _value(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise CalculatorError("expression nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, depth + 1), _value(node.right, depth + 1)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent over {MAX_EXPONENT}")
        if isinstance(node.op, ast.Pow) and isinstance(right, int) and right >= 0 and left != 0 \
                and right * math.log10(abs(left)) > MAX_DIGITS:
            raise CalculatorError(f"result over {MAX_DIGITS} digits")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
        if isinstance(result, complex):
            raise CalculatorError("not a real number")
        return _checked(result)
    raise CalculatorError(f"{type(node).__name__} is not arithmetic")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int) and len(str(abs(value))) > MAX_DIGITS:
        raise CalculatorError(f"result over {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result not finite")
    return value
