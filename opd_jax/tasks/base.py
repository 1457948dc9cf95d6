"""The Task protocol, and what a task gives the distillation grid (:class:`TaskSetup`).

A task is a problem generator with an exact answer checker, a tokenizer, and a shipped teacher and
student; :meth:`Task.setup` loads them into a :class:`TaskSetup` for :func:`opd_jax.train.train`
and the demo (:mod:`opd_jax.demo`). Tasks are registered by name in :mod:`opd_jax.tasks`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from opd_jax.models import Decoder
from opd_jax.sampling import SamplingConfig, generate, score

if TYPE_CHECKING:
    from opd_jax.rollouts import RolloutFn
    from opd_jax.train import PromptSet

__all__ = ["Evaluator", "Task", "TaskSetup", "teacher_kl"]

#: ``model -> {metric: value}`` on a task's held-out problems.
Evaluator = Callable[[Decoder], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """What a task gives the distillation grid.

    Attributes:
      name: the task's name (shown in tables).
      tokenizer: the student's tokenizer (saved beside every exported student).
      teacher, student: the frozen teacher and the starting student.
      student_config: the student's ``DecoderConfig`` (for the export).
      prompts: the training prompts, ``[N, P]`` left-padded.
      evaluate: ``model -> {metric: value}`` on held-out problems; the demo's summary reads
        ``accuracy``, ``teacher_kl`` and ``response_length`` from it (and any other keys it returns).
      stop_ids, pad_id: sampling stop tokens and padding id.
      rollout_fn: the rollout of :func:`opd_jax.train.train` (multi-turn tasks bring their own,
        :mod:`opd_jax.rollouts`).
      max_new_tokens: the response budget the task needs.
    """

    name: str
    tokenizer: Any
    teacher: Decoder
    student: Decoder
    student_config: Any
    prompts: PromptSet
    evaluate: Evaluator
    stop_ids: tuple[int, ...]
    pad_id: int
    rollout_fn: RolloutFn = generate
    max_new_tokens: int = 24


@runtime_checkable
class Task(Protocol):
    """A toy task: problems with an exact checker, its tokenizer, its shipped models, a training setup.

    Attributes:
      name: the task's name (its key in the registry of :mod:`opd_jax.tasks`).
    """

    name: str

    def problems(self, split: str, n: int, seed: int) -> list[Any]:
        """``n`` problems of the ``"train"`` or ``"test"`` split (the two never share a problem), drawn with ``seed``."""
        ...

    def check(self, problem: Any, response_text: str) -> bool:
        """Whether ``response_text`` (decoded, EOS removed) answers ``problem`` correctly; never raises."""
        ...

    def tokenizer(self) -> Any:
        """The task's tokenizer (the one its shipped models use)."""
        ...

    def model_path(self, role: str) -> pathlib.Path:
        """The folder of the shipped ``"teacher"`` or ``"student"`` (HF config, safetensors, tokenizer)."""
        ...

    def evaluator(self, tokenizer: Any, teacher: Decoder | None, *, eval_problems: int = 512, seed: int = 0) -> Evaluator:
        """``model -> metrics`` on ``eval_problems`` test-split problems drawn with ``seed + 1``
        (the teacher-KL skipped when ``teacher`` is ``None``)."""
        ...

    def setup(self, *, train_problems: int = 4096, eval_problems: int = 512, seed: int = 0) -> TaskSetup:
        """The shipped teacher and student, ``train_problems`` train-split prompts drawn with
        ``seed``, and the evaluator of :meth:`evaluator`."""
        ...


def teacher_kl(student: Decoder, teacher: Decoder, tokens_BxP, mask_BxP, key: jax.Array, *, max_new_tokens: int,
               stop_ids: Sequence[int], pad_id: int) -> float:
    """``KL(π‖q)`` per response token, estimated on temperature-1 samples of ``student``.

    ``Σ_n (log π(y_n|s_n) − log q(y_n|s_n)) / Σ_n 1`` over the response tokens of one sample per
    prompt of ``tokens_BxP`` (left-padded, real tokens in ``mask_BxP``): an unbiased estimate of the
    sequence-level KL divided by the mean response length.
    """
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=tuple(stop_ids), pad_id=pad_id)
    rollout = generate(student, tokens_BxP, mask_BxP, key, config)
    teacher_logp_BxL = score(teacher, rollout.tokens, rollout.token_mask)
    gap_BxL = jnp.where(rollout.response_mask, rollout.sampling_logp - teacher_logp_BxL, 0.0)
    return float(jnp.sum(gap_BxL) / jnp.maximum(jnp.sum(rollout.response_mask), 1))
