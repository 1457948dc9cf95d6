"""A toy tool-use task: questions answered through calls to small deterministic tools.

A prompt is a short question; the response calls tools in a structured format, the environment
appends each call's result to the context, and the response ends with the answer after ``>``::

    23*47?        ->  [calc:23*47]=1081>1081
    k*7?          ->  [look:k]=35[calc:35*7]=245>245
    k+q?          ->  [look:k]=35[look:q]=79[calc:35+79]=114>114
    5km in m?     ->  [conv:5,km,m]=5000>5000

**Call format.** A call is ``[name:args]``. The closing ``]`` ends the model's turn; the
environment executes the call and appends ``=`` and the result (or an error, see below), then the
model continues. A turn that ends with ``]`` must be exactly one call (``[``, a name, ``:``,
arguments, ``]``); anything else in it is a format error. A response ends with EOS.

**Tools** (:func:`execute_call`): ``calc`` takes ``A op B`` with canonical non-negative integers and
``op`` in ``+ - *``; ``look`` takes one lowercase letter and returns its value in the fixed table
:data:`LOOKUP_TABLE`; ``conv`` takes ``N,from,to`` with a canonical non-negative integer ``N`` and
two units of the same dimension from :data:`UNITS` (the result is an integer or a decimal with
trailing zeros removed).

**Errors are context, not exceptions.** An unknown tool gives ``=err:tool``, bad arguments
``=err:args``, a turn that is not exactly one call ``=err:form``. The model sees the error and may
try again; nothing raises.

**Masking.** In a rollout (:func:`make_rollout_fn`: :mod:`opd_jax.rollouts` with the task's
:class:`ToolEnvironment`) the tokens the environment appends are real tokens (in ``token_mask``, so
the student and the teacher both condition on them) but not response tokens (out of
``response_mask``), so they get no advantage and no gradient.

**Checking** (:func:`check_response`): a transcript is well formed when it is exactly
``([call]=output)* >answer`` with every output equal to what the executor returns. Reported per
response: the calls are *valid* (well formed, at least one call, no call returned an error), the
calls are *exact* (the same calls, with the same arguments, in the same order as the reference
solution), and the final answer is correct (the text after the first ``>`` is the answer in
canonical decimal). The character-level tokenizer (:func:`build_tokenizer`) is the arithmetic
task's construction (:mod:`opd_jax.tasks.characters`) with this task's alphabet.

**Modules.** :mod:`~opd_jax.tasks.tool_use.tools` (call format, tools, executor),
:mod:`~opd_jax.tasks.tool_use.problems` (questions and reference solutions),
:mod:`~opd_jax.tasks.tool_use.checker`, :mod:`~opd_jax.tasks.tool_use.vocabulary` (ids, tokenizer,
prompt encoding), :mod:`~opd_jax.tasks.tool_use.environment` (multi-turn rollouts),
:mod:`~opd_jax.tasks.tool_use.evaluation`, :mod:`~opd_jax.tasks.tool_use.task` (the shipped models,
the registered task and its demo settings). Every public name is re-exported here.
"""

from opd_jax.tasks.characters import SPECIAL_TOKENS
from opd_jax.tasks.tool_use.checker import ResponseCheck, check_response
from opd_jax.tasks.tool_use.environment import ToolEnvironment, make_rollout_fn
from opd_jax.tasks.tool_use.evaluation import ToolUseEvalResult, evaluate
from opd_jax.tasks.tool_use.problems import CONVERSIONS, KINDS, ToolUseProblem, ToolUseTask, transcript_segments
from opd_jax.tasks.tool_use.task import ASSETS_DIR, DEMO, VLLM_ASSETS_DIR, ToyToolUse, toy_model_path, toy_task
from opd_jax.tasks.tool_use.tools import (
    ANSWER_MARKER,
    CALL_CLOSE,
    CALL_OPEN,
    CALL_SEP,
    ERROR_ARGS,
    ERROR_FORM,
    ERROR_TOOL,
    LOOKUP_TABLE,
    RESULT_MARKER,
    TOOLS,
    UNITS,
    Call,
    execute_call,
    tool_output,
)
from opd_jax.tasks.tool_use.vocabulary import ALPHABET, Vocabulary, build_tokenizer, encode_prompts

__all__ = [
    "ALPHABET",
    "ASSETS_DIR",
    "ANSWER_MARKER",
    "CALL_CLOSE",
    "CALL_OPEN",
    "CALL_SEP",
    "CONVERSIONS",
    "DEMO",
    "ERROR_ARGS",
    "ERROR_FORM",
    "ERROR_TOOL",
    "KINDS",
    "LOOKUP_TABLE",
    "RESULT_MARKER",
    "SPECIAL_TOKENS",
    "TOOLS",
    "UNITS",
    "Call",
    "ResponseCheck",
    "ToolEnvironment",
    "ToolUseEvalResult",
    "ToolUseProblem",
    "ToolUseTask",
    "ToyToolUse",
    "Vocabulary",
    "build_tokenizer",
    "check_response",
    "encode_prompts",
    "evaluate",
    "execute_call",
    "make_rollout_fn",
    "tool_output",
    "transcript_segments",
    "toy_model_path",
    "toy_task",
]
