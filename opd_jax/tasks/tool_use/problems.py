"""The tool-use task's questions: their kinds, the generator with its fixed train / test split, and
the reference solutions (calls, tool outputs, answer).

    23*47?        ->  [calc:23*47]=1081>1081
    k*7?          ->  [look:k]=35[calc:35*7]=245>245
    k+q?          ->  [look:k]=35[look:q]=79[calc:35+79]=114>114
    5km in m?     ->  [conv:5,km,m]=5000>5000
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from opd_jax.tasks.base import distinct_choices, held_out_split
from opd_jax.tasks.tool_use.tools import ANSWER_MARKER, LOOKUP_TABLE, RESULT_MARKER, execute_call

__all__ = ["CONVERSIONS", "KINDS", "ToolUseProblem", "ToolUseTask", "transcript_segments"]

KINDS = ("calc", "look", "look2", "conv")
#: The conversions problems ask for (larger to smaller unit, so answers are integers).
CONVERSIONS = (("km", "m"), ("m", "cm"), ("m", "mm"), ("cm", "mm"), ("kg", "g"), ("h", "min"), ("min", "s"), ("h", "s"))

_SPLITS = (None, "train", "test")


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
        object.__setattr__(self, "kinds", distinct_choices(self.kinds, KINDS, name="kinds", noun="kind names"))
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
        return held_out_split(prompt, self.test_fraction)

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
