"""The calculator tool: what the model's <|python_start|> expr <|python_end|> calls evaluate to.

    calculate("48/2")            -> "24"          (raises CalculatorError when refused or failing)
    tool_output("1/0")           -> "error: division by zero"   (never raises: the Engine's view)

A restricted AST evaluator, not the sandbox (`nanochat.execution`): it runs in-process in ~15 us
where the sandbox starts an interpreter per call (~150 ms measured on the 2-core CPU machines,
paid once per tool call per row during RL rollouts), and it is safe by construction (it walks a
whitelist of nodes and bounds every intermediate value and the time spent) rather than by
containment. A failing call is still a tool call: its error comes back to the model as the
tool's output text, so a generation never ends because of what the model wrote.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import time
from typing import Any, Callable

MAX_CHARS = 256
MAX_STR = 1000  # longest string any step may produce
MAX_INT = 10**100  # largest integer magnitude any step may produce
MAX_EXPONENT = 256
TIME_LIMIT_S = 1.0  # a whole evaluation; every step is bounded (~15 us typical), this is the backstop
ERROR_PREFIX = "error: "
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_STR_METHODS = frozenset({"count", "find", "index", "upper", "lower", "strip", "lstrip", "rstrip",
                          "startswith", "endswith", "replace", "title", "capitalize"})


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why in a few words."""


def _round(number: Any, ndigits: int = 0) -> Any:
    if not isinstance(ndigits, int) or abs(ndigits) > 15:  # round(x, -10**100) would compute 10**(10**100)
        raise CalculatorError(f"round: ndigits must be an integer in [-15, 15], got {ndigits!r}")
    return round(number, ndigits)


_FUNCTIONS: dict[str, Callable[..., Any]] = {"len": len, "abs": abs, "round": _round, "min": min, "max": max}


def calculate(expression: str) -> str:
    """The result of `expression` as text, or CalculatorError saying why not.

    Allowed: int/float/str literals, + - * / // % ** and unary -, len abs round min max, and
    the string methods count find index upper lower strip lstrip rstrip startswith endswith
    replace title capitalize, indexing and slicing of strings: "48/2", "'strawberry'.count('r')".
    In an expression without quotes, a comma between a digit and exactly three more digits is a
    thousands separator ("1,000*3"). Integral floats print as integers (GSM8K writes 48/2 = 24);
    other floats are rounded to 6 decimals; a non-finite result (1e308*10) is an error.
    """
    expression = expression.strip()
    if "'" not in expression and '"' not in expression:
        expression = _THOUSANDS_COMMA.sub("", expression)
    if not expression or len(expression) > MAX_CHARS:
        raise CalculatorError(f"expected 1..{MAX_CHARS} characters, got {len(expression)}")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
        raise CalculatorError("invalid syntax") from None
    try:
        value = _Evaluator(time.perf_counter() + TIME_LIMIT_S).evaluate(tree.body)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("numeric overflow") from None
    except (ArithmeticError, ValueError, TypeError, IndexError, RecursionError) as e:
        raise CalculatorError(f"{type(e).__name__}: {e}"[:100]) from None
    return _format_result(value)


def tool_output(expression: str) -> str:
    """What the tool answers to a call: the result, or "error: <why>" (it never raises)."""
    try:
        return calculate(expression)
    except CalculatorError as e:
        return f"{ERROR_PREFIX}{e}"


def _format_result(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError(f"non-finite result {value}")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(round(value, 6))
    return str(value)


def _checked(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise CalculatorError("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"non-finite result {value}")
    if isinstance(value, str) and len(value) > MAX_STR:
        raise CalculatorError("string too long")
    if not isinstance(value, (int, float, str)):
        raise CalculatorError(f"unsupported result type {type(value).__name__}")
    return value


class _Evaluator:
    """One evaluation: the AST walk, with a deadline checked at every node."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def evaluate(self, node: ast.AST) -> Any:
        if time.perf_counter() > self.deadline:
            raise CalculatorError(f"timed out after {TIME_LIMIT_S} s")
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return _checked(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            operand = self.evaluate(node.operand)
            if isinstance(operand, str):
                raise CalculatorError("unary operator on a string")
            return _checked(_UNARY_OPS[type(node.op)](operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            return self._binary(type(node.op), self.evaluate(node.left), self.evaluate(node.right))
        if isinstance(node, ast.Call) and not node.keywords:
            args = [self.evaluate(arg) for arg in node.args]
            if isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
                return _checked(_FUNCTIONS[node.func.id](*args))
            if isinstance(node.func, ast.Attribute) and node.func.attr in _STR_METHODS:
                receiver = self.evaluate(node.func.value)
                if not isinstance(receiver, str) or not all(isinstance(arg, (str, int)) for arg in args):
                    raise CalculatorError("string methods take a string receiver and str/int arguments")
                return _checked(getattr(receiver, node.func.attr)(*args))
        if isinstance(node, ast.Subscript):
            return self._subscript(node)
        raise CalculatorError(f"unsupported syntax: {type(node).__name__}")

    def _binary(self, op: type, left: Any, right: Any) -> Any:
        if isinstance(left, str) or isinstance(right, str):
            allowed = (op is ast.Add and isinstance(left, str) and isinstance(right, str)) or (
                op is ast.Mult and isinstance(left, str) != isinstance(right, str))
            if not allowed:  # str % args would be formatting, str * str an error
                raise CalculatorError("unsupported string operation")
            if op is ast.Mult:
                text, times = (left, right) if isinstance(left, str) else (right, left)
                if not isinstance(times, int) or len(text) * max(times, 0) > MAX_STR:
                    raise CalculatorError("string repetition too long")
        if op is ast.Pow and abs(right) > MAX_EXPONENT:
            raise CalculatorError("exponent too large")
        return _checked(_BINARY_OPS[op](left, right))

    def _subscript(self, node: ast.Subscript) -> Any:
        target = self.evaluate(node.value)
        if not isinstance(target, str):
            raise CalculatorError("only strings can be indexed")
        if isinstance(node.slice, ast.Slice):
            bounds = [None if part is None else self.evaluate(part)
                      for part in (node.slice.lower, node.slice.upper, node.slice.step)]
            if not all(bound is None or isinstance(bound, int) for bound in bounds):
                raise CalculatorError("slice bounds must be integers")
            return target[slice(*bounds)]
        index = self.evaluate(node.slice)
        if not isinstance(index, int):
            raise CalculatorError("string index must be an integer")
        return target[index]
