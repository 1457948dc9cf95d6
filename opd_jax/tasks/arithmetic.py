"""A toy math-reasoning task: multi-digit addition and subtraction with a digit-by-digit solution.

A problem is a prompt such as ``57+68=``; its worked solution (the response a model should write)
goes through the columns from the least significant digit, writing each column's operation with
the incoming carry (borrow for subtraction) and the two-digit result ``carry digit``, then the
answer after the marker ``>``::

    57+68=   ->   7+8+0=15,5+6+1=12>125
    52-38=   ->   2-8-0=14,5-3-1=01>14

In a subtraction column ``x-y-c=bd`` the result digit is ``d = (x − y − c) mod 10`` and ``b`` is 1
when the column borrowed. Subtraction problems have ``a ≥ b``, so answers are never negative; the
answer is written in canonical decimal (no leading zeros). With ``d``-digit operands a response has
at most ``10·d + 1`` characters (22 tokens with EOS for ``d = 2``).

Only the final answer is checked (:func:`is_correct`): exactly, in canonical form, and a malformed
response is simply wrong. The tokenizer (:func:`build_tokenizer`) is character level, one token per
character of :data:`ALPHABET`, and saves in the Hugging Face format, so the shipped toy teacher and
student load with the same loaders as real checkpoints (:func:`opd_jax.tokenization.load_tokenizer`,
:func:`opd_jax.models.from_pretrained`; see :func:`toy_model_path`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from opd_jax.tasks import characters
from opd_jax.tasks.base import (
    DemoSettings,
    Evaluator,
    TaskSetup,
    distinct_choices,
    held_out_split,
    read_task_metadata,
    shipped_model_folder,
    teacher_kl,
)
from opd_jax.tasks.characters import SPECIAL_TOKENS

__all__ = [
    "ALPHABET",
    "ASSETS_DIR",
    "VLLM_ASSETS_DIR",
    "ANSWER_MARKER",
    "ArithmeticTask",
    "EvalResult",
    "Problem",
    "SPECIAL_TOKENS",
    "ToyArithmetic",
    "build_digit_pair_tokenizer",
    "build_tokenizer",
    "evaluate",
    "extract_answer",
    "is_correct",
    "toy_model_path",
    "toy_task",
]

ANSWER_MARKER = ">"
#: Every character a prompt or a worked solution may contain, plus space and newline. Their ids follow
#: :data:`SPECIAL_TOKENS` from id 3 in this order: the shipped models' ids, so the order is fixed.
ALPHABET = "0123456789+-=,> \n"
OPERATIONS = ("+", "-")
#: The shipped toy checkpoints: ``teacher/`` and ``student/`` (config, safetensors, tokenizer).
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
#: The same task's models with attention heads of size 32 (vLLM's CPU attention rejects 12 and 24).
VLLM_ASSETS_DIR = ASSETS_DIR / "vllm"

#: The experiment that trains the shipped models (named in the errors about missing assets).
_MAKE_MODELS = "experiments/make_toy_models.py"
_ANSWER = re.compile(r"0|[1-9][0-9]*")
_SPLITS = (None, "train", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One arithmetic problem.

    Attributes:
      a, op, b: the operands and the operation (``"+"`` or ``"-"``).
      prompt: what the model is given, e.g. ``"57+68="``.
      solution: the worked solution ending with the answer, e.g. ``"7+8+0=15,5+6+1=12>125"``
        (no EOS).
      answer: the exact integer result.
    """

    a: int
    op: str
    b: int
    prompt: str
    solution: str
    answer: int


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Generated ``digits``-digit addition / subtraction problems.

    Attributes:
      digits: digits of each operand (exactly: ``10..99`` for 2; ``0..9`` for 1); >= 1.
      operations: a non-empty subset of ``("+", "-")``, sampled uniformly.
      test_fraction: share of the problem space reserved for held-out evaluation. A problem's split
        is a fixed hash of its prompt, so ``split="train"`` and ``split="test"`` samples never share
        a problem, whatever the seeds.
    """

    digits: int = 2
    operations: tuple[str, ...] = OPERATIONS
    test_fraction: float = 0.1

    def __post_init__(self):
        if isinstance(self.digits, bool) or not isinstance(self.digits, (int, np.integer)) or self.digits < 1:
            raise ValueError(f"digits must be an integer >= 1, got {self.digits!r}")
        operations = distinct_choices(self.operations, OPERATIONS, name="operations", noun="operation symbols")
        object.__setattr__(self, "operations", operations)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")

    @property
    def max_prompt_length(self) -> int:
        """The longest prompt, in characters (= tokens)."""
        return 2 * self.digits + 2

    @property
    def max_response_length(self) -> int:
        """The longest worked solution in tokens, including the EOS token."""
        return 10 * self.digits + 2

    def to_dict(self) -> dict[str, Any]:
        return {"digits": self.digits, "operations": list(self.operations), "test_fraction": self.test_fraction}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ArithmeticTask:
        return cls(
            digits=int(values["digits"]),
            operations=tuple(values["operations"]),
            test_fraction=float(values["test_fraction"]),
        )

    def make_problem(self, a: int, op: str, b: int) -> Problem:
        """The problem ``a op b`` with its worked solution (any non-negative operands).

        Raises:
          ValueError: an unknown operation, a negative operand, or ``a < b`` for subtraction.
        """
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")
        if a < 0 or b < 0:
            raise ValueError(f"operands must be non-negative, got {a} and {b}")
        if op == "-" and a < b:
            raise ValueError(f"subtraction needs a >= b, got {a}-{b}")
        width = max(len(str(a)), len(str(b)))
        digits_a, digits_b = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
        steps, carry = [], 0
        for x, y in zip(map(int, digits_a), map(int, digits_b)):
            carry_in = carry
            if op == "+":
                carry, digit = divmod(x + y + carry_in, 10)
            else:
                difference = x - y - carry_in
                carry, digit = (1, difference + 10) if difference < 0 else (0, difference)
            steps.append(f"{x}{op}{y}{op}{carry_in}={carry}{digit}")
        answer = a + b if op == "+" else a - b
        return Problem(
            a=a,
            op=op,
            b=b,
            prompt=f"{a}{op}{b}=",
            solution=",".join(steps) + f"{ANSWER_MARKER}{answer}",
            answer=answer,
        )

    def sample_problems(self, rng_or_seed: int | np.random.Generator, n: int, *, split: str | None = None) -> list[Problem]:
        """``n`` problems drawn uniformly (with replacement) from the problem space.

        Args:
          rng_or_seed: an integer seed (the same seed gives the same problems) or a NumPy
            ``Generator`` (advanced in place).
          n: how many problems (>= 0).
          split: ``None`` for the whole space, ``"train"`` or ``"test"`` for one side of the fixed
            held-out partition (see ``test_fraction``).

        Returns:
          A list of :class:`Problem`.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
        rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
        low, high = (0, 10) if self.digits == 1 else (10 ** (self.digits - 1), 10**self.digits)
        problems: list[Problem] = []
        draws_without_hit = 0
        while len(problems) < n:
            # Draw in blocks; the split filter keeps (1 - test_fraction) or test_fraction of them.
            block = max(16, 2 * (n - len(problems)))
            if draws_without_hit > 100_000:
                # A tiny problem space can leave one side of the hash partition empty.
                raise ValueError(
                    f"the {split!r} split of {self} looks empty (no problem in {draws_without_hit} draws); "
                    "use more digits or another test_fraction"
                )
            found = len(problems)
            ops = rng.integers(0, len(self.operations), block)
            a_values = rng.integers(low, high, block)
            b_values = rng.integers(low, high, block)
            for op_index, a, b in zip(ops.tolist(), a_values.tolist(), b_values.tolist()):
                op = self.operations[op_index]
                if op == "-" and a < b:
                    a, b = b, a
                if split is not None and (self.split_of(a, op, b) != split):
                    continue
                problems.append(self.make_problem(a, op, b))
                if len(problems) == n:
                    break
            draws_without_hit = 0 if len(problems) > found else draws_without_hit + block
        return problems

    def split_of(self, a: int, op: str, b: int) -> str:
        """``"test"`` or ``"train"``: the fixed held-out partition (a hash of the prompt)."""
        return held_out_split(f"{a}{op}{b}=", self.test_fraction)


def extract_answer(text: str) -> int | None:
    """The integer after the answer marker, or ``None`` when the response is malformed.

    Everything after the first ``>`` must be one integer in canonical decimal (optional ``-``, no
    leading zeros, no spaces): ``"7+8+0=15,5+6+1=12>125"`` gives 125; ``">0125"``, ``">12 "``,
    ``">12>125"``, ``"125"`` (no marker) and ``""`` give ``None``. Never raises.
    """
    if not isinstance(text, str):
        return None
    _, marker, rest = text.partition(ANSWER_MARKER)
    if not marker:
        return None
    negative = rest.startswith("-") and rest != "-0"
    digits = rest[1:] if negative else rest
    if not _ANSWER.fullmatch(digits):
        return None
    value = int(digits)
    return -value if negative else value


def is_correct(problem: Problem, response_text: str) -> bool:
    """Whether the response's final answer (:func:`extract_answer`) equals ``problem.answer``.

    The worked steps are not checked; a malformed response is wrong (``False``), never an error.
    """
    answer = extract_answer(response_text)
    return answer is not None and answer == problem.answer


def build_tokenizer():
    """The character-level tokenizer of the task, as a ``transformers`` fast tokenizer.

    :func:`opd_jax.tasks.characters.build_tokenizer` of :data:`ALPHABET`: ``<pad>`` 0, ``<eos>`` 1,
    ``<unk>`` 2, then one token per character of :data:`ALPHABET` (any other character encodes as
    ``<unk>``). No BOS, no chat template: ``encode`` with ``add_special_tokens=True`` gives exactly one
    id per character, and decoding concatenates the tokens. Save it with ``save_pretrained(folder)``;
    :func:`opd_jax.tokenization.load_tokenizer` loads it back.
    """
    return characters.build_tokenizer(ALPHABET)


def build_digit_pair_tokenizer(alphabet: str = ALPHABET):
    """A tokenizer unlike the task's own, for a teacher that distils across tokenizers: every pair of
    digits is one token, read greedily from the left (``"345"`` is ``"34", "5"``).

    The ids: the :func:`build_tokenizer` ids (special tokens, then one per character of
    ``alphabet``, which must hold the digits), then the hundred pairs ``"00"`` … ``"99"``. A
    ``WordPiece`` model without a subword prefix over pre-tokens that are digit runs or single other
    characters; decoding concatenates, so ``decode(encode(text)) == text`` for every text over
    ``alphabet``.
    """
    import tokenizers

    from opd_jax.tokenization import import_transformers

    transformers = import_transformers()
    pieces = (*characters.SPECIAL_TOKENS, *alphabet, *(f"{a}{b}" for a in "0123456789" for b in "0123456789"))
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(
        {piece: index for index, piece in enumerate(pieces)}, unk_token="<unk>", continuing_subword_prefix="",
        max_input_chars_per_word=1 << 16))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[0-9]+|[^0-9]"), behavior="isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", clean_up_tokenization_spaces=False,
                                                model_max_length=1024)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured over ``n`` problems.

    Attributes:
      accuracy: share of responses that stopped (EOS within ``max_new_tokens``) with the correct
        answer.
      mean_response_length: mean number of response tokens, EOS included.
      correct: ``[n]`` bool.
      finished: ``[n]`` bool, the response ended with EOS.
      response_lengths: ``[n]`` int, response tokens including EOS.
      responses: the decoded responses (EOS removed; other special tokens kept as text).
    """

    accuracy: float
    mean_response_length: float
    correct: np.ndarray
    finished: np.ndarray
    response_lengths: np.ndarray
    responses: tuple[str, ...]


def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    key=None,
    temperature: float = 0.0,
) -> EvalResult:
    """Generate a response to every problem and check its answer.

    Prompts are encoded without a chat template, left-padded to the longest prompt, and decoded
    with :func:`opd_jax.sampling.generate` in batches of ``batch_size`` (the last batch is filled
    up with copies so every batch has the same shape and compiles once), stopping at the
    tokenizer's EOS. A response that has not stopped within ``max_new_tokens`` counts as wrong.

    Args:
      model: an :class:`opd_jax.models.Decoder`.
      tokenizer: the task's tokenizer (:func:`build_tokenizer` or loaded from a toy model folder).
      problems: the problems (non-empty).
      max_new_tokens: the response budget ``N``.
      batch_size: rows per ``generate`` call.
      key: PRNG key for ``temperature > 0`` (default ``jax.random.key(0)``); split per batch.
      temperature: 0 is greedy decoding.

    Returns:
      An :class:`EvalResult`.

    Raises:
      ValueError: no problems, a non-positive ``batch_size``, a tokenizer without an EOS token, or
        a budget beyond the model's context (from ``generate``).
    """
    from opd_jax import sampling

    problems = list(problems)
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; responses could never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=(int(eos),), pad_id=int(pad)
    )
    responses, finished, lengths = _sample_responses(
        model, tokenizer, [problem.prompt for problem in problems], config, batch_size=min(batch_size, len(problems)),
        key=jax.random.key(0) if key is None else key,
    )
    correct = np.asarray([is_correct(p, r) for p, r in zip(problems, responses)], bool) & finished
    return EvalResult(
        accuracy=float(correct.mean()),
        mean_response_length=float(lengths.mean()),
        correct=correct,
        finished=finished,
        response_lengths=lengths,
        responses=tuple(responses),
    )


def _sample_responses(model, tokenizer, prompts: Sequence[str], config, *, batch_size: int,
                      key: jax.Array) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Decode a response to every prompt with ``config`` (a ``SamplingConfig`` stopping at EOS only).

    Prompts are left-padded to the longest one and sampled in batches of ``batch_size`` rows, the
    last one filled up with copies of its last prompt (every batch has one shape and compiles once);
    ``key`` is split once per batch.

    Returns:
      The decoded responses (the final EOS removed), ``[n]`` bool whether each ended with EOS, and
      ``[n]`` int64 response tokens including EOS.
    """
    from opd_jax import sampling, tokenization

    (eos,) = config.stop_ids
    prompt_length = max(len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"])
    responses: list[str] = []
    finished: list[bool] = []
    lengths: list[int] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        tokens, mask = tokenization.encode_prompts(
            tokenizer, chunk, max_length=prompt_length, use_chat_template=False, pad_id=config.pad_id
        )
        key, batch_key = jax.random.split(key)
        rollout = sampling.generate(model, tokens, mask, batch_key, config)
        response_tokens = np.asarray(rollout.tokens[:real, prompt_length:])
        response_mask = np.asarray(rollout.response_mask[:real, prompt_length:])
        for row_tokens, row_mask in zip(response_tokens, response_mask):
            ids = row_tokens[row_mask].tolist()
            stopped = bool(ids) and ids[-1] == eos
            # Keep special tokens other than the final EOS as text so they make the answer malformed.
            responses.append(tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=False))
            finished.append(stopped)
            lengths.append(len(ids))
    return responses, np.asarray(finished, bool), np.asarray(lengths, np.int64)


def toy_model_path(role: str, assets: pathlib.Path = ASSETS_DIR) -> pathlib.Path:
    """The folder of the shipped toy ``"teacher"`` or ``"student"`` (HF config, safetensors, tokenizer).

    ``assets``: :data:`ASSETS_DIR`, or :data:`VLLM_ASSETS_DIR` for the variant with head size 32
    that vLLM's CPU attention serves.

    Raises:
      ValueError: another role.
      FileNotFoundError: the assets are missing (regenerate them with
        ``experiments/make_toy_models.py``).
    """
    return shipped_model_folder(assets, role, what="toy", script=_MAKE_MODELS)


def toy_task(assets: pathlib.Path = ASSETS_DIR) -> ArithmeticTask:
    """The :class:`ArithmeticTask` the shipped toy models were trained on (from ``metadata.json``)."""
    return ArithmeticTask.from_dict(read_task_metadata(assets, script=_MAKE_MODELS))


@dataclasses.dataclass(frozen=True)
class ToyArithmetic:
    """The toy arithmetic task with its shipped teacher and student (a :class:`~opd_jax.tasks.base.Task`).

    Problems come from :func:`toy_task` (the task the shipped models were trained on), the checker
    is :func:`is_correct`, the budget is the longest solution + 2 tokens. ``assets``: the models'
    folder (:data:`ASSETS_DIR`, or :data:`VLLM_ASSETS_DIR`: the ``arithmetic_vllm`` task). ``demo``:
    the demo's settings (:data:`~opd_jax.tasks.base.DEMO_CONFIG`, output folder ``runs/demo``).
    """

    name: str = "arithmetic"
    assets: pathlib.Path = ASSETS_DIR
    demo: DemoSettings = DemoSettings(output=pathlib.Path("runs/demo"))

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        return toy_task(self.assets).sample_problems(seed, n, split=split)

    def check(self, problem: Problem, response_text: str) -> bool:
        return is_correct(problem, response_text)

    def tokenizer(self):
        from opd_jax import tokenization

        return tokenization.load_tokenizer(toy_model_path("student", self.assets))

    def model_path(self, role: str) -> pathlib.Path:
        return toy_model_path(role, self.assets)

    def evaluator(self, tokenizer, teacher, *, eval_problems: int = 512, seed: int = 0) -> Evaluator:
        """``model -> {accuracy, response_length[, teacher_kl]}``: greedy decoding for accuracy and
        length, one temperature-1 sample per problem for the teacher-KL."""
        from opd_jax import tokenization

        task = toy_task(self.assets)
        held_out = self.problems("test", eval_problems, seed + 1)
        eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
        max_new_tokens = task.max_response_length + 2
        tokens_BxP, mask_BxP = tokenization.encode_prompts(
            tokenizer, [p.prompt for p in held_out], max_length=task.max_prompt_length, use_chat_template=False, pad_id=pad
        )

        def evaluate_model(model) -> dict[str, float]:
            result = evaluate(model, tokenizer, held_out, max_new_tokens=max_new_tokens, batch_size=256)
            metrics = {"accuracy": result.accuracy, "response_length": result.mean_response_length}
            if teacher is not None:
                metrics["teacher_kl"] = teacher_kl(model, teacher, tokens_BxP, mask_BxP, jax.random.key(seed),
                                                   max_new_tokens=max_new_tokens, stop_ids=(eos,), pad_id=pad)
            return metrics

        return evaluate_model

    def setup(self, *, train_problems: int = 4096, eval_problems: int = 512, seed: int = 0) -> TaskSetup:
        from opd_jax import models, tokenization
        from opd_jax.train import PromptSet

        task, tokenizer = toy_task(self.assets), self.tokenizer()
        teacher, _ = models.from_pretrained(self.model_path("teacher"))
        student, student_config = models.from_pretrained(self.model_path("student"))
        pad = int(tokenizer.pad_token_id)
        tokens_NxP, mask_NxP = tokenization.encode_prompts(
            tokenizer, [p.prompt for p in self.problems("train", train_problems, seed)],
            max_length=task.max_prompt_length, use_chat_template=False, pad_id=pad,
        )
        return TaskSetup(
            name=self.name, tokenizer=tokenizer, teacher=teacher, student=student, student_config=student_config,
            prompts=PromptSet(tokens_NxP, mask_NxP),
            evaluate=self.evaluator(tokenizer, teacher, eval_problems=eval_problems, seed=seed),
            stop_ids=(int(tokenizer.eos_token_id),), pad_id=pad, max_new_tokens=task.max_response_length + 2,
        )

