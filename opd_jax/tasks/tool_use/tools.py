"""The tool-use task's tools: the call format, the three deterministic tools and their executor.

A call is ``[name:args]``; the environment answers a model turn that ends with ``]`` with ``=`` and
the tool's output (:func:`tool_output`). Errors are outputs, never exceptions: ``err:form`` for a
turn that is not exactly one call, ``err:tool`` for an unknown tool, ``err:args`` for arguments the
tool does not take. See :mod:`opd_jax.tasks.tool_use` for the task as a whole.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
import types

__all__ = [
    "ANSWER_MARKER",
    "CALL_CLOSE",
    "CALL_OPEN",
    "CALL_SEP",
    "ERROR_ARGS",
    "ERROR_FORM",
    "ERROR_TOOL",
    "LOOKUP_TABLE",
    "RESULT_MARKER",
    "TOOLS",
    "UNITS",
    "Call",
    "execute_call",
    "is_canonical_number",
    "parse_call",
    "tool_output",
]

ANSWER_MARKER = ">"
CALL_OPEN, CALL_CLOSE, CALL_SEP, RESULT_MARKER = "[", "]", ":", "="
TOOLS = ("calc", "look", "conv")

ERROR_FORM, ERROR_TOOL, ERROR_ARGS = "err:form", "err:tool", "err:args"

#: The ``look`` tool's table: each lowercase letter to a distinct two-digit value (37 is invertible
#: mod 89, so the values are distinct, and neighbouring keys get distant values).
LOOKUP_TABLE = types.MappingProxyType(
    {letter: 10 + (37 * i + 11) % 89 for i, letter in enumerate("abcdefghijklmnopqrstuvwxyz")}
)
#: ``conv`` units: name -> (dimension, size in the dimension's base unit).
UNITS = types.MappingProxyType({
    "km": ("length", 1000), "m": ("length", 1), "cm": ("length", fractions.Fraction(1, 100)),
    "mm": ("length", fractions.Fraction(1, 1000)),
    "kg": ("mass", 1000), "g": ("mass", 1),
    "h": ("time", 3600), "min": ("time", 60), "s": ("time", 1),
})

_INTEGER = re.compile(r"0|[1-9][0-9]*")
_CALC = re.compile(r"(0|[1-9][0-9]{0,5})([-+*])(0|[1-9][0-9]{0,5})")
_CALL = re.compile(r"\[([a-z]+):([^\[\]]*)\]")


@dataclasses.dataclass(frozen=True)
class Call:
    """One tool call: ``[name:args]`` and the output the environment returned (without ``=``)."""

    name: str
    args: str
    output: str

    @property
    def text(self) -> str:
        return f"{CALL_OPEN}{self.name}{CALL_SEP}{self.args}{CALL_CLOSE}"

    @property
    def ok(self) -> bool:
        return not self.output.startswith("err:")


def _format_number(value: fractions.Fraction) -> str:
    """Integers as canonical decimal, other values as a decimal with trailing zeros removed."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    value = abs(value)
    whole, rest = divmod(value.numerator, value.denominator)
    digits = []
    # Every unit factor is a power of ten, so the expansion terminates within a few digits.
    while rest and len(digits) < 6:
        rest *= 10
        digit, rest = divmod(rest, value.denominator)
        digits.append(str(digit))
    return f"{sign}{whole}.{''.join(digits)}"


def _calc(args: str) -> str:
    match = _CALC.fullmatch(args)
    if not match:
        return ERROR_ARGS
    a, op, b = int(match[1]), match[2], int(match[3])
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _look(args: str) -> str:
    value = LOOKUP_TABLE.get(args)
    return ERROR_ARGS if value is None else str(value)


def _conv(args: str) -> str:
    parts = args.split(",")
    if len(parts) != 3 or not _INTEGER.fullmatch(parts[0]) or len(parts[0]) > 6:
        return ERROR_ARGS
    source, target = UNITS.get(parts[1]), UNITS.get(parts[2])
    if source is None or target is None or source[0] != target[0]:
        return ERROR_ARGS
    return _format_number(fractions.Fraction(int(parts[0])) * source[1] / target[1])


_TOOL_FUNCTIONS = types.MappingProxyType({"calc": _calc, "look": _look, "conv": _conv})


def parse_call(turn_text: str) -> tuple[str, str] | None:
    """``(name, args)`` when ``turn_text`` is exactly one call ``[name:args]``, else ``None`` (never raises)."""
    match = _CALL.fullmatch(turn_text) if isinstance(turn_text, str) else None
    return (match[1], match[2]) if match else None


def execute_call(turn_text: str) -> str:
    """Run the call a model turn ends with and return the tool's output (without ``=``).

    ``turn_text`` is everything the model wrote in the turn, which must be exactly one call
    ``[name:args]``. Never raises: a turn that is not one call gives ``"err:form"``, an unknown
    tool ``"err:tool"``, bad arguments ``"err:args"``.

    >>> execute_call("[calc:12*7]"), execute_call("[look:a]"), execute_call("[conv:5,m,km]")
    ('84', '21', '0.005')
    """
    call = parse_call(turn_text)
    if call is None:
        return ERROR_FORM
    name, args = call
    tool = _TOOL_FUNCTIONS.get(name)
    return ERROR_TOOL if tool is None else tool(args)


def tool_output(turn_text: str) -> str:
    """The text the environment appends after a turn ending with ``]``: ``=`` + :func:`execute_call`."""
    return RESULT_MARKER + execute_call(turn_text)


def is_canonical_number(text: str) -> bool:
    """Whether ``text`` is an integer in canonical decimal: optional ``-`` (not on 0), no leading zeros."""
    return bool(_INTEGER.fullmatch(text[1:] if text.startswith("-") and text != "-0" else text))
