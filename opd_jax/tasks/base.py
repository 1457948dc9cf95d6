"""The Task protocol, and what a task gives the distillation grid (:class:`TaskSetup`).

A task is a problem generator with an exact answer checker, a tokenizer, and a shipped teacher and
student; :meth:`Task.setup` loads them into a :class:`TaskSetup` for :func:`opd_jax.train.train`
and the demo (:mod:`opd_jax.demo`), which runs with the task's own :class:`DemoSettings`
(``task.demo``). Tasks are registered by name in :mod:`opd_jax.tasks`, the one registry.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from opd_jax.config import TrainConfig
from opd_jax.models import Decoder
from opd_jax.sampling import SamplingConfig, generate, score

if TYPE_CHECKING:
    from opd_jax.rollouts import RolloutFn
    from opd_jax.train import PromptSet

__all__ = [
    "DEMO_CONFIG",
    "SUMMARY_COLUMNS",
    "DemoSettings",
    "Evaluator",
    "Task",
    "TaskSetup",
    "distinct_choices",
    "held_out_split",
    "read_task_metadata",
    "shipped_model_folder",
    "teacher_kl",
]

#: ``model -> {metric: value}`` on a task's held-out problems.
Evaluator = Callable[[Decoder], dict[str, float]]

#: The demo's training settings unless a task says otherwise: per-token OPD (γ = 0) as in the paper.
DEMO_CONFIG = TrainConfig(
    level="token",
    gamma=0.0,
    log_ratio_clip=20.0,
    prompts_per_step=64,
    group_size=4,
    max_new_tokens=24,
    learning_rate=3e-4,
    steps=200,
    eval_every=50,
    checkpoint_every=50,
    keep_checkpoints=1,
)

#: The metrics of the demo's summary table unless a task says otherwise: (record key, column title).
SUMMARY_COLUMNS = (
    ("accuracy", "accuracy"),
    ("teacher_kl", "teacher KL"),
    ("response_length", "length"),
)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """How ``opd-jax demo --task`` runs a task: the ``demo`` attribute of every :class:`Task`.

    Attributes:
      config: the training settings of the demo's runs (the grid sets divergence, estimator and
        seed; ``max_new_tokens`` comes from the task's :class:`TaskSetup`).
      columns: the metrics of the summary table, ``(record key, column title)`` pairs; every key
        is one the task's evaluator returns.
      output: the default output folder; ``None`` is ``runs/demo-<task name>`` (:meth:`output_folder`).
    """

    config: TrainConfig = DEMO_CONFIG
    columns: tuple[tuple[str, str], ...] = SUMMARY_COLUMNS
    output: pathlib.Path | None = None

    def output_folder(self, name: str) -> pathlib.Path:
        """The default output folder of the task registered as ``name``."""
        return pathlib.Path(f"runs/demo-{name}") if self.output is None else pathlib.Path(self.output)


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
      demo: the settings of the demo on this task (:class:`DemoSettings`).
    """

    name: str
    demo: DemoSettings

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


# --------------------------------------------------------------------------------------------
# What the toy tasks share: their problem-space checks, the held-out split, the shipped assets


def distinct_choices(values, allowed: tuple[str, ...], *, name: str, noun: str) -> tuple[str, ...]:
    """``values`` as a tuple of distinct members of ``allowed``, checked for the task field ``name``.

    Raises:
      ValueError: a string (a tuple of ``noun`` was meant), an empty sequence, a repeat, or a value
        outside ``allowed``.
    """
    if isinstance(values, str):
        raise ValueError(f"{name} must be a tuple of {noun}, not the string {values!r}")
    chosen = tuple(values)
    if not chosen or any(value not in allowed for value in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"{name} must be distinct {noun.split()[-1]} from {allowed}, got {values!r}")
    return chosen


def held_out_split(prompt: str, test_fraction: float) -> str:
    """``"test"`` or ``"train"``: a fixed hash of the prompt (CRC-32 in a million buckets), so a
    problem's side of the held-out partition never depends on seeds, and ``test_fraction`` of the
    problem space is held out (``0 < test_fraction < 1``, checked by the task's constructor).
    """
    bucket = zlib.crc32(prompt.encode()) % 1_000_000
    return "test" if bucket < test_fraction * 1_000_000 else "train"


def shipped_model_folder(assets: pathlib.Path, role: str, *, what: str, script: str) -> pathlib.Path:
    """The folder ``assets/role`` of a shipped ``"teacher"`` or ``"student"`` (HF config, safetensors,
    tokenizer); ``what`` names the models and ``script`` the experiment that regenerates them.

    Raises:
      ValueError: another role.
      FileNotFoundError: the folder has no ``config.json``.
    """
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    folder = assets / role
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no {what} {role} in {folder}; regenerate it with `python {script}`")
    return folder


def read_task_metadata(assets: pathlib.Path, *, script: str) -> dict[str, Any]:
    """The ``task`` entry of ``assets/metadata.json``: the problem space the shipped models were trained on.

    Raises:
      FileNotFoundError: no ``metadata.json`` (``script`` regenerates it).
    """
    metadata = assets / "metadata.json"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} is missing; regenerate it with `python {script}`")
    return json.loads(metadata.read_text())["task"]
