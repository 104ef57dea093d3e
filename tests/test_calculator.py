"""The calculator tool: what it evaluates, what it refuses, and that every failure is an error
text (never an exception) for the Engine."""

from __future__ import annotations

import re

import pytest

from nanochat import calculator
from nanochat.calculator import CalculatorError, calculate, tool_output


@pytest.mark.parametrize("expression,result", [
    ("2+3", "5"), ("48/2", "24"), ("10/4", "2.5"), ("1/3", "0.333333"), ("1,000*3", "3000"), ("2**10", "1024"),
    ("-7//2", "-4"), ("(1.5+2)*2", "7"), ("'strawberry'.count('r')", "3"), ("'abc'.upper()", "ABC"),
    ("len('hello')", "5"), ("'hello'[::-1]", "olleh"), ("max(3, 9, 4)", "9"), ("round(2.567, 2)", "2.57"), ("'a,b,c'.count(',')", "2"),
    ("  7 * 6 ", "42"), ("1e15", "1000000000000000.0"),
])
def test_calculator_evaluates_arithmetic_and_string_ops(expression, result):
    assert calculate(expression) == result
    assert tool_output(expression) == result


@pytest.mark.parametrize("expression,reason", [
    ("__import__('os').system('ls')", "unsupported syntax"), ("open('/etc/passwd').read()", "unsupported syntax"),
    ("(1).__class__", "unsupported syntax"), ("x + 1", "unsupported syntax"), ("[1, 2]", "unsupported syntax"),
    ("lambda: 1", "unsupported syntax"), ("'abc'.format(1)", "unsupported syntax"),
    ("1/0", "division by zero"), ("5 % 0", "division by zero"),
    ("2**100000", "exponent too large"), ("10**200", "integer too large"), ("'a' * 10**9", "string repetition too long"),
    ("'%s' % 5", "unsupported string operation"), ("", "expected 1..256 characters, got 0"),
    ("1" * 300, "expected 1..256 characters, got 300"), ("round(10**99, -10**99)", "ndigits must be an integer"),
    ("(-8) ** 0.5", "unsupported result type complex"), ("'a'.replace('', 'b' * 999) * 2", "string too long"),
    ("1e308*10", "non-finite result inf"), ("1e999", "non-finite result inf"), ("1e308 + 1e308", "non-finite result inf"),
    ("1e200**2", "numeric overflow"), ("2+*3", "invalid syntax"), ("((1)", "invalid syntax"),
    ("'abc'[10]", "IndexError"), ("'abc'.index('z')", "ValueError"), ("1\x00", "invalid syntax"),
])
def test_calculator_refuses_everything_else_with_a_reason(expression, reason):
    with pytest.raises(CalculatorError, match=re.escape(reason)):
        calculate(expression)
    assert tool_output(expression).startswith("error: ") and reason in tool_output(expression)


def test_calculator_deep_nesting_evaluates_or_is_an_error_not_a_crash():
    assert tool_output("-" * 255 + "1") == "-1"
    assert tool_output("(" * 127 + "1" + ")" * 127) == "1"
    assert tool_output("~" * 255 + "1") == "error: unsupported syntax: UnaryOp"


def test_calculator_time_limit_is_an_error(monkeypatch):
    monkeypatch.setattr(calculator, "TIME_LIMIT_S", -1.0)  # every evaluation is already past its deadline
    assert tool_output("2+3") == "error: timed out after -1.0 s"
