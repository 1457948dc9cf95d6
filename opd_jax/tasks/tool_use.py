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
canonical decimal). The character-level tokenizer (:func:`build_tokenizer`) follows the
arithmetic task's construction with this task's alphabet.
"""

from __future__ import annotations

import dataclasses
import fractions
import pathlib
import re
import types
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import rollouts
from opd_jax.rollouts import RolloutFn
from opd_jax.sampling import Rollout, SamplingConfig, generate, score
from opd_jax.tasks.base import Evaluator, TaskSetup

__all__ = [
    "ALPHABET",
    "ASSETS_DIR",
    "ANSWER_MARKER",
    "KINDS",
    "LOOKUP_TABLE",
    "SPECIAL_TOKENS",
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

ANSWER_MARKER = ">"
CALL_OPEN, CALL_CLOSE, CALL_SEP, RESULT_MARKER = "[", "]", ":", "="
#: Every character a prompt, a call, a tool output or an answer may contain.
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz[]:=,*+-.?> "
#: Special tokens at ids 0, 1, 2; the characters of :data:`ALPHABET` follow from id 3.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
KINDS = ("calc", "look", "look2", "conv")
TOOLS = ("calc", "look", "conv")
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "tool_use"

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
#: The conversions problems ask for (larger to smaller unit, so answers are integers).
CONVERSIONS = (("km", "m"), ("m", "cm"), ("m", "mm"), ("cm", "mm"), ("kg", "g"), ("h", "min"), ("min", "s"), ("h", "s"))

_INTEGER = re.compile(r"0|[1-9][0-9]*")
_CALC = re.compile(r"(0|[1-9][0-9]{0,5})([-+*])(0|[1-9][0-9]{0,5})")
_CALL = re.compile(r"\[([a-z]+):([^\[\]]*)\]")
_SPLITS = (None, "train", "test")


# --------------------------------------------------------------------------------------------
# Tools and the checker


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


def execute_call(turn_text: str) -> str:
    """Run the call a model turn ends with and return the tool's output (without ``=``).

    ``turn_text`` is everything the model wrote in the turn, which must be exactly one call
    ``[name:args]``. Never raises: a turn that is not one call gives ``"err:form"``, an unknown
    tool ``"err:tool"``, bad arguments ``"err:args"``.

    >>> execute_call("[calc:12*7]"), execute_call("[look:a]"), execute_call("[conv:5,m,km]")
    ('84', '21', '0.005')
    """
    match = _CALL.fullmatch(turn_text) if isinstance(turn_text, str) else None
    if not match:
        return ERROR_FORM
    tool = _TOOL_FUNCTIONS.get(match[1])
    return ERROR_TOOL if tool is None else tool(match[2])


def tool_output(turn_text: str) -> str:
    """The text the environment appends after a turn ending with ``]``: ``=`` + :func:`execute_call`."""
    return RESULT_MARKER + execute_call(turn_text)


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
        output = execute_call(turn)
        match = _CALL.fullmatch(turn)
        expected = RESULT_MARKER + output
        if not match or not text.startswith(expected, close + 1):
            well_formed = False
            break
        calls.append(Call(match[1], match[2], output))
        position = close + 1 + len(expected)
    _, marker, answer = text.partition(ANSWER_MARKER)
    tail = text[position:]
    well_formed = well_formed and tail.startswith(ANSWER_MARKER) and _is_canonical_number(tail[1:])
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


def _is_canonical_number(text: str) -> bool:
    return bool(_INTEGER.fullmatch(text[1:] if text.startswith("-") and text != "-0" else text))


# --------------------------------------------------------------------------------------------
# Problems


@dataclasses.dataclass(frozen=True)
class ToolUseProblem:
    """One question with its reference solution.

    Attributes:
      kind: one of :data:`KINDS`.
      prompt: the question, e.g. ``"k*7?"``.
      calls: the reference calls in order, e.g. ``("[look:k]", "[calc:35*7]")``.
      solution: the reference transcript (calls, tool outputs, ``>answer``; no EOS).
      answer: the exact integer answer.
    """

    kind: str
    prompt: str
    calls: tuple[str, ...]
    solution: str
    answer: int


@dataclasses.dataclass(frozen=True)
class ToolUseTask:
    """Generated tool-use questions.

    Attributes:
      kinds: a non-empty subset of :data:`KINDS`, sampled uniformly:
        ``calc`` ``A op B?`` (two-digit operands, one ``calc`` call);
        ``look`` ``k op N?`` (one ``look`` then one ``calc``);
        ``look2`` ``k op q?`` (two ``look`` then one ``calc``);
        ``conv`` ``N<unit> in <unit>?`` (one ``conv`` call).
        ``op`` is ``+``, ``-`` or ``*`` (``-`` only where the answer is non-negative).
      test_fraction: share of the question space held out; the split is a fixed hash of the prompt.
    """

    kinds: tuple[str, ...] = KINDS
    test_fraction: float = 0.1

    def __post_init__(self):
        if isinstance(self.kinds, str):
            raise ValueError(f"kinds must be a tuple of kind names, not the string {self.kinds!r}")
        kinds = tuple(self.kinds)
        if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct names from {KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")

    @property
    def max_prompt_length(self) -> int:
        """The longest prompt in characters (= tokens): ``99min in s?``."""
        return 11

    @property
    def max_response_length(self) -> int:
        """The longest reference transcript in tokens, tool outputs and EOS included."""
        # look2 with '*': [look:x]=99 twice, [calc:99*99]=9801, >9801, EOS.
        return 2 * len("[look:x]=99") + len("[calc:99*99]=9801") + len(">9801") + 1

    def to_dict(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds), "test_fraction": self.test_fraction}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ToolUseTask:
        return cls(kinds=tuple(values["kinds"]), test_fraction=float(values["test_fraction"]))

    def split_of(self, prompt: str) -> str:
        """``"test"`` or ``"train"``: the fixed held-out partition (a hash of the prompt)."""
        bucket = zlib.crc32(prompt.encode()) % 1_000_000
        return "test" if bucket < self.test_fraction * 1_000_000 else "train"

    def sample_problems(self, rng_or_seed: int | np.random.Generator, n: int, *, split: str | None = None) -> list[ToolUseProblem]:
        """``n`` questions drawn uniformly over kinds (with replacement).

        Args:
          rng_or_seed: integer seed or a NumPy ``Generator`` (advanced in place).
          n: how many (>= 0).
          split: ``None``, ``"train"`` or ``"test"`` (see ``test_fraction``).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
        rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
        problems: list[ToolUseProblem] = []
        misses = 0
        while len(problems) < n:
            problem = self._draw(rng)
            if split is None or self.split_of(problem.prompt) == split:
                problems.append(problem)
                misses = 0
            else:
                misses += 1
                if misses > 100_000:
                    raise ValueError(f"the {split!r} split of {self} looks empty")
        return problems

    def _draw(self, rng: np.random.Generator) -> ToolUseProblem:
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        keys = list(LOOKUP_TABLE)
        if kind == "conv":
            source, target = CONVERSIONS[int(rng.integers(len(CONVERSIONS)))]
            return self.make_problem("conv", int(rng.integers(1, 100)), source, target)
        op = "+-*"[int(rng.integers(3))]
        if kind == "calc":
            a, b = (int(v) for v in rng.integers(10, 100, 2))
        elif kind == "look":
            a, b = keys[int(rng.integers(26))], int(rng.integers(1, 100))
        else:
            a, b = (keys[int(i)] for i in rng.integers(26, size=2))
        if op == "-" and _value(a) < _value(b):
            op = "+"
        return self.make_problem(kind, a, op, b)

    def make_problem(self, kind: str, *args) -> ToolUseProblem:
        """The question of ``kind`` with its reference solution.

        ``make_problem("calc", 23, "*", 47)``, ``make_problem("look", "k", "*", 7)``,
        ``make_problem("look2", "k", "+", "q")``, ``make_problem("conv", 5, "km", "m")``.

        Raises:
          ValueError: an unknown kind or arguments the kind does not take.
        """
        if kind == "conv":
            amount, source, target = args
            if (source, target) not in CONVERSIONS or not 0 <= amount < 10**6:
                raise ValueError(f"conv problems take an amount and one of {CONVERSIONS}, got {args!r}")
            prompt = f"{amount}{source} in {target}?"
            steps = [f"[conv:{amount},{source},{target}]"]
        elif kind in ("calc", "look", "look2"):
            a, op, b = args
            if op not in "+-*" or len(op) != 1:
                raise ValueError(f"unknown operation {op!r}")
            expected = {"calc": (int, int), "look": (str, int), "look2": (str, str)}[kind]
            if not (isinstance(a, expected[0]) and isinstance(b, expected[1])):
                raise ValueError(f"{kind} problems take operands of types {expected}, got {args!r}")
            if any(isinstance(v, str) and v not in LOOKUP_TABLE for v in (a, b)):
                raise ValueError(f"lookup keys are single lowercase letters, got {args!r}")
            if op == "-" and _value(a) < _value(b):
                raise ValueError(f"subtraction needs a non-negative answer, got {args!r}")
            prompt = f"{a}{op}{b}?"
            steps = [f"[look:{v}]" for v in (a, b) if isinstance(v, str)]
            steps.append(f"[calc:{_value(a)}{op}{_value(b)}]")
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        outputs = [execute_call(step) for step in steps]
        answer = int(outputs[-1])
        solution = "".join(f"{s}{RESULT_MARKER}{o}" for s, o in zip(steps, outputs)) + f"{ANSWER_MARKER}{answer}"
        return ToolUseProblem(kind=kind, prompt=prompt, calls=tuple(steps), solution=solution, answer=answer)


def transcript_segments(problem: ToolUseProblem) -> list[tuple[str, bool]]:
    """The reference transcript as ``(text, written_by_model)`` pieces, in order (no EOS).

    Calls and the ``>answer`` are the model's; each ``=output`` is the environment's. Supervised
    training puts its loss on the model's pieces only.
    """
    segments = []
    for call in problem.calls:
        segments += [(call, True), (RESULT_MARKER + execute_call(call), False)]
    return segments + [(f"{ANSWER_MARKER}{problem.answer}", True)]


def _value(operand: int | str) -> int:
    return LOOKUP_TABLE[operand] if isinstance(operand, str) else operand


# --------------------------------------------------------------------------------------------
# Tokenizer and vocabulary


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The task's character-level ids, for the environment (no tokenizer call per turn).

    ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then :data:`ALPHABET` from id 3 — the same ids as
    :func:`build_tokenizer` (checked by the tests).
    """

    alphabet: str = ALPHABET

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    @property
    def close_id(self) -> int:
        """The id of ``]``, which ends a model turn."""
        return self.encode(CALL_CLOSE)[0]

    def __len__(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        offset = len(SPECIAL_TOKENS)
        return [offset + self.alphabet.index(c) if c in self.alphabet else self.unk_id for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Characters for alphabet ids; special tokens as their names (so they break the format)."""
        offset = len(SPECIAL_TOKENS)
        return "".join(self.alphabet[i - offset] if i >= offset else SPECIAL_TOKENS[i] for i in map(int, ids))


def build_tokenizer():
    """The task's character-level ``transformers`` fast tokenizer (see :class:`Vocabulary` for ids).

    No BOS, no chat template: one id per character; decoding concatenates the tokens.
    """
    import tokenizers

    from opd_jax.tokenization import import_transformers

    transformers = import_transformers()  # without the "PyTorch was not found" banner

    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, model_max_length=1024,
    )


def encode_prompts(problems: Sequence[ToolUseProblem], max_length: int, vocabulary: Vocabulary = Vocabulary()) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids ``[N, max_length]`` int32 and mask ``[N, max_length]`` bool."""
    tokens = np.full((len(problems), max_length), vocabulary.pad_id, np.int32)
    mask = np.zeros((len(problems), max_length), bool)
    for row, problem in enumerate(problems):
        ids = vocabulary.encode(problem.prompt)
        if len(ids) > max_length:
            raise ValueError(f"prompt {problem.prompt!r} has {len(ids)} tokens, more than {max_length}")
        tokens[row, max_length - len(ids) :] = ids
        mask[row, max_length - len(ids) :] = True
    return tokens, mask


# --------------------------------------------------------------------------------------------
# Multi-turn rollouts


@dataclasses.dataclass(frozen=True)
class ToolEnvironment:
    """The task's :class:`opd_jax.rollouts.Environment`: ``]`` ends a model turn, and the answer is
    ``=`` and the tool's output (:func:`tool_output`, errors included); EOS ends the episode."""

    vocabulary: Vocabulary = Vocabulary()

    @property
    def turn_stop_ids(self) -> tuple[int, ...]:
        return (self.vocabulary.close_id,)

    @property
    def episode_stop_ids(self) -> tuple[int, ...]:
        return (self.vocabulary.eos_id,)

    def respond(self, turn_T: np.ndarray, context_C: np.ndarray) -> list[int]:
        """The ids of ``=`` and the output of the call that the turn ``turn_T`` (``]`` last) makes; the
        tools keep no state, so ``context_C`` is not read."""
        return self.vocabulary.encode(tool_output(self.vocabulary.decode(turn_T)))


def make_rollout_fn(vocabulary: Vocabulary = Vocabulary(), *, generate_fn: RolloutFn = generate) -> RolloutFn:
    """The task's multi-turn ``rollout_fn`` for :func:`opd_jax.train.train` (and :func:`evaluate`).

    :func:`opd_jax.rollouts.multi_turn_rollout` with a :class:`ToolEnvironment`: ``rollout_fn(model,
    prompt_tokens_BxP, prompt_mask_BxP, key, sampling_config) -> Rollout`` ``[B, P + N]``, where
    ``N = sampling_config.max_new_tokens`` holds model tokens and tool outputs together; tool outputs
    are in ``token_mask``, not in ``response_mask``. ``generate_fn`` replaces
    :func:`opd_jax.sampling.generate` for one turn (tests script a policy with it).
    """
    return rollouts.make_rollout_fn(ToolEnvironment(vocabulary), generate_fn=generate_fn)


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class ToolUseEvalResult:
    """What :func:`evaluate` measured over ``n`` questions (a response counts only if it ended with EOS).

    Attributes:
      accuracy: share with the correct final answer.
      call_validity: share whose calls are valid (see :class:`ResponseCheck`).
      call_exactness: share whose calls equal the reference calls.
      mean_response_length: mean model tokens per response (EOS included, tool outputs excluded).
      mean_transcript_length: mean tokens per response including tool outputs.
      teacher_kl: ``KL(π‖q)`` per model token on temperature-1 rollouts (``None`` without teacher).
      checks: the per-response :class:`ResponseCheck`.
      finished: ``[n]`` bool, the response ended with EOS.
      transcripts: the decoded transcripts (EOS removed).
    """

    accuracy: float
    call_validity: float
    call_exactness: float
    mean_response_length: float
    mean_transcript_length: float
    teacher_kl: float | None
    checks: tuple[ResponseCheck, ...]
    finished: np.ndarray
    transcripts: tuple[str, ...]

    def metrics(self) -> dict[str, float]:
        """The scalar metrics, with the demo's key names (``accuracy``, ``response_length``, …)."""
        values = {
            "accuracy": self.accuracy, "call_validity": self.call_validity, "call_exactness": self.call_exactness,
            "response_length": self.mean_response_length, "transcript_length": self.mean_transcript_length,
        }
        if self.teacher_kl is not None:
            values["teacher_kl"] = self.teacher_kl
        return values


def evaluate(
    model,
    problems: Sequence[ToolUseProblem],
    *,
    teacher=None,
    max_new_tokens: int | None = None,
    batch_size: int = 128,
    key=None,
    temperature: float = 0.0,
    vocabulary: Vocabulary = Vocabulary(),
) -> ToolUseEvalResult:
    """Run multi-turn rollouts on ``problems`` and check them.

    Calls, accuracy and lengths come from rollouts at ``temperature`` (0: greedy). With a
    ``teacher``, also the per-token ``KL(π‖q)`` on one temperature-1 rollout per question:
    ``Σ (log π − log q) / Σ 1`` over model tokens, the teacher scoring the same tokens (tool outputs
    included as context). Batches of ``batch_size`` rows (the last filled up with copies).

    Args:
      model: an :class:`opd_jax.models.Decoder` with this task's vocabulary.
      problems: the questions (non-empty).
      teacher: optional teacher decoder for the KL.
      max_new_tokens: the response budget (default the task's longest solution + 4).
      batch_size, key, temperature: batching, PRNG key (default ``jax.random.key(0)``), sampling.
      vocabulary: the task's ids.

    Returns:
      :class:`ToolUseEvalResult`.
    """
    problems = list(problems)
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = max_new_tokens or ToolUseTask().max_response_length + 4
    prompt_length = max(len(p.prompt) for p in problems)
    rollout_fn = make_rollout_fn(vocabulary)
    key = jax.random.key(0) if key is None else key
    batch_size = min(batch_size, len(problems))
    config = SamplingConfig(max_new_tokens=budget, temperature=temperature, stop_ids=(vocabulary.eos_id,),
                            pad_id=vocabulary.pad_id)
    responses: list[_Response] = []
    kl_sum, kl_count = 0.0, 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        tokens_BxP, mask_BxP = encode_prompts(chunk + [chunk[-1]] * (batch_size - len(chunk)), prompt_length, vocabulary)
        key, greedy_key, sample_key = jax.random.split(key, 3)
        rollout = rollout_fn(model, tokens_BxP, mask_BxP, greedy_key, config)
        responses += _responses(rollout, len(chunk), prompt_length, vocabulary)
        if teacher is not None:
            sampled = rollout_fn(model, tokens_BxP, mask_BxP, sample_key, dataclasses.replace(config, temperature=1.0))
            gap_sum, gap_count = _teacher_gap(sampled, teacher, len(chunk))
            kl_sum, kl_count = kl_sum + gap_sum, kl_count + gap_count
    return _eval_result(problems, responses, kl_sum / max(kl_count, 1) if teacher is not None else None)


@dataclasses.dataclass(frozen=True)
class _Response:
    """One decoded response: transcript (EOS removed), ended with EOS, tokens with and without tool outputs."""

    transcript: str
    finished: bool
    length: int
    model_length: int


def _responses(rollout: Rollout, rows: int, prompt_length: int, vocabulary: Vocabulary) -> list[_Response]:
    """The first ``rows`` responses of ``rollout``, decoded."""
    tokens_RxN = np.asarray(rollout.tokens[:rows, prompt_length:])
    in_transcript_RxN = np.asarray(rollout.token_mask[:rows, prompt_length:])
    by_model_RxN = np.asarray(rollout.response_mask[:rows, prompt_length:])
    responses = []
    for ids, real, by_model in zip(tokens_RxN, in_transcript_RxN, by_model_RxN):
        ids = ids[real].tolist()
        stopped = bool(ids) and ids[-1] == vocabulary.eos_id
        responses.append(_Response(vocabulary.decode(ids[:-1] if stopped else ids), stopped, len(ids), int(by_model.sum())))
    return responses


def _teacher_gap(rollout: Rollout, teacher, rows: int) -> tuple[float, int]:
    """``Σ (log π − log q)`` and the number of model tokens over the first ``rows`` rows of ``rollout``."""
    teacher_logp_BxL = score(teacher, rollout.tokens, rollout.token_mask)
    in_response_BxL = rollout.response_mask & (jnp.arange(rollout.tokens.shape[0]) < rows)[:, None]
    gap_BxL = jnp.where(in_response_BxL, rollout.sampling_logp - teacher_logp_BxL, 0.0)
    return float(jnp.sum(gap_BxL)), int(jnp.sum(in_response_BxL))


def _eval_result(problems: Sequence[ToolUseProblem], responses: Sequence[_Response], teacher_kl: float | None) -> ToolUseEvalResult:
    finished = np.asarray([r.finished for r in responses], bool)
    checks = tuple(check_response(p, r.transcript) for p, r in zip(problems, responses))

    def share(attribute):
        return float(np.mean([getattr(c, attribute) and f for c, f in zip(checks, finished)]))

    return ToolUseEvalResult(
        accuracy=share("answer_correct"),
        call_validity=share("calls_valid"),
        call_exactness=share("calls_exact"),
        mean_response_length=float(np.mean([r.model_length for r in responses])),
        mean_transcript_length=float(np.mean([r.length for r in responses])),
        teacher_kl=teacher_kl,
        checks=checks,
        finished=finished,
        transcripts=tuple(r.transcript for r in responses),
    )


def _check_tokenizer(tokenizer, vocabulary: Vocabulary) -> None:
    probe = ALPHABET
    ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if ids != vocabulary.encode(probe) or tokenizer.eos_token_id != vocabulary.eos_id or tokenizer.pad_token_id != vocabulary.pad_id:
        raise ValueError("the tokenizer does not match the tool-use task's character vocabulary")


# --------------------------------------------------------------------------------------------
# Shipped models and the Task


def toy_model_path(role: str) -> pathlib.Path:
    """The folder of the shipped tool-use ``"teacher"`` or ``"student"``.

    Raises:
      ValueError: another role.
      FileNotFoundError: missing assets (regenerate with ``experiments/make_tool_use_models.py``).
    """
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    folder = ASSETS_DIR / role
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no tool-use {role} in {folder}; regenerate it with `python experiments/make_tool_use_models.py`")
    return folder


def toy_task() -> ToolUseTask:
    """The :class:`ToolUseTask` the shipped models were trained on (from ``metadata.json``)."""
    import json

    metadata = ASSETS_DIR / "metadata.json"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} is missing; regenerate it with `python experiments/make_tool_use_models.py`")
    return ToolUseTask.from_dict(json.loads(metadata.read_text())["task"])


@dataclasses.dataclass(frozen=True)
class ToyToolUse:
    """The toy tool-use task with its shipped teacher and student (a :class:`~opd_jax.tasks.base.Task`).

    Problems come from :func:`toy_task`, the checker is the final answer of :func:`check_response`,
    rollouts are multi-turn (:func:`make_rollout_fn`), the budget (model tokens and tool outputs
    together) is the longest reference transcript + 4 tokens.
    """

    name = "tool_use"

    def problems(self, split: str, n: int, seed: int) -> list[ToolUseProblem]:
        return toy_task().sample_problems(seed, n, split=split)

    def check(self, problem: ToolUseProblem, response_text: str) -> bool:
        return check_response(problem, response_text).answer_correct

    def tokenizer(self):
        """The character tokenizer of the shipped student (checked against :class:`Vocabulary`)."""
        from opd_jax import tokenization

        tokenizer = tokenization.load_tokenizer(toy_model_path("student"))
        _check_tokenizer(tokenizer, Vocabulary())
        return tokenizer

    def model_path(self, role: str) -> pathlib.Path:
        return toy_model_path(role)

    def evaluator(self, tokenizer=None, teacher=None, *, eval_problems: int = 512, seed: int = 0,
                  batch_size: int = 128) -> Evaluator:
        """``model -> {accuracy, call_validity, call_exactness, response_length, transcript_length[, teacher_kl]}``.

        Greedy rollouts for the calls, the answers and the lengths, one temperature-1 rollout per
        question for the teacher-KL (see :func:`evaluate`). ``tokenizer`` is only checked to match
        :class:`Vocabulary`.
        """
        vocabulary = Vocabulary()
        if tokenizer is not None:
            _check_tokenizer(tokenizer, vocabulary)
        held_out = self.problems("test", eval_problems, seed + 1)

        def evaluate_model(model) -> dict[str, float]:
            return evaluate(model, held_out, teacher=teacher, batch_size=batch_size, key=jax.random.key(seed),
                            vocabulary=vocabulary).metrics()

        return evaluate_model

    def setup(self, *, train_problems: int = 4096, eval_problems: int = 512, seed: int = 0) -> TaskSetup:
        from opd_jax import models
        from opd_jax.train import PromptSet

        task, tokenizer, vocabulary = toy_task(), self.tokenizer(), Vocabulary()
        teacher, _ = models.from_pretrained(toy_model_path("teacher"))
        student, student_config = models.from_pretrained(toy_model_path("student"))
        tokens_NxP, mask_NxP = encode_prompts(self.problems("train", train_problems, seed), task.max_prompt_length,
                                              vocabulary)
        return TaskSetup(
            name=self.name, tokenizer=tokenizer, teacher=teacher, student=student, student_config=student_config,
            prompts=PromptSet(tokens_NxP, mask_NxP),
            evaluate=self.evaluator(tokenizer, teacher, eval_problems=eval_problems, seed=seed),
            stop_ids=(vocabulary.eos_id,), pad_id=vocabulary.pad_id, rollout_fn=make_rollout_fn(vocabulary),
            max_new_tokens=task.max_response_length + 4,
        )
