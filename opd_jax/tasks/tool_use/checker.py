"""The tool-use task's checker: parse a response transcript, re-run its calls, check its answer.

A transcript is well formed when it is exactly ``([call]=output)* >answer`` with every output equal
to what the tool returns (:func:`~opd_jax.tasks.tool_use.tools.execute_call`). Reported per response:
the calls are *valid* (well formed, at least one call, no call returned an error), the calls are
*exact* (the same calls, with the same arguments, in the same order as the reference solution), and
the final answer is correct (the text after the first ``>`` is the answer in canonical decimal).
"""

from __future__ import annotations

import dataclasses

from opd_jax.tasks.tool_use.problems import ToolUseProblem
from opd_jax.tasks.tool_use.tools import (
    ANSWER_MARKER,
    CALL_CLOSE,
    CALL_OPEN,
    RESULT_MARKER,
    Call,
    execute_call,
    is_canonical_number,
    parse_call,
)

__all__ = ["ResponseCheck", "check_response"]


@dataclasses.dataclass(frozen=True)
class ResponseCheck:
    """What :func:`check_response` found in one transcript.

    Attributes:
      calls: the calls in order (as far as the transcript parses).
      well_formed: the transcript is exactly ``([call]=output)* >answer`` with executor outputs.
      calls_valid: well formed, at least one call, and no call returned an error.
      calls_exact: ``calls_valid`` and the calls (names and arguments) equal the reference ones.
      answer: the final answer text after the first ``>`` (``None`` without a marker).
      answer_correct: the answer is the reference answer in canonical decimal.
    """

    calls: tuple[Call, ...]
    well_formed: bool
    calls_valid: bool
    calls_exact: bool
    answer: str | None
    answer_correct: bool


def check_response(problem: ToolUseProblem, transcript: str) -> ResponseCheck:
    """Check a response transcript (model text and tool outputs, EOS removed) against ``problem``.

    The tool outputs in the transcript are re-derived with :func:`execute_call`, so a transcript
    whose outputs do not match the tools is not well formed. Never raises.
    """
    text = transcript if isinstance(transcript, str) else ""
    calls: list[Call] = []
    position, well_formed = 0, True
    while position < len(text) and text[position] == CALL_OPEN:
        close = text.find(CALL_CLOSE, position)
        if close < 0:
            well_formed = False
            break
        turn = text[position : close + 1]
        call, output = parse_call(turn), execute_call(turn)
        expected = RESULT_MARKER + output
        if call is None or not text.startswith(expected, close + 1):
            well_formed = False
            break
        calls.append(Call(*call, output))
        position = close + 1 + len(expected)
    _, marker, answer = text.partition(ANSWER_MARKER)
    tail = text[position:]
    well_formed = well_formed and tail.startswith(ANSWER_MARKER) and is_canonical_number(tail[1:])
    calls_valid = well_formed and bool(calls) and all(call.ok for call in calls)
    calls_exact = calls_valid and tuple(c.text for c in calls) == problem.calls
    answer = answer if marker else None
    return ResponseCheck(
        calls=tuple(calls),
        well_formed=well_formed,
        calls_valid=calls_valid,
        calls_exact=calls_exact,
        answer=answer,
        answer_correct=answer is not None and answer == str(problem.answer),
    )
