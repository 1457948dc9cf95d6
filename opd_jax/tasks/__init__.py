"""Toy tasks with exact answer checkers, the small teacher / student checkpoints shipped for them, and
a registry of :class:`~opd_jax.tasks.base.Task` objects by name.

>>> sorted(task_names())
['arithmetic', 'arithmetic_cross_tokenizer', 'arithmetic_vllm', 'tool_use', 'tool_use_vllm']
>>> get_task("tool_use").model_path("teacher").name
'teacher'
>>> get_task("tool_use").demo.config.steps  # the demo's settings live on the task
40

The arithmetic task's helpers (``toy_task``, ``evaluate``, …) are re-exported here.
"""

from __future__ import annotations

import dataclasses
import types

from opd_jax.tasks import tool_use
from opd_jax.tasks.arithmetic import (
    ArithmeticTask,
    EvalResult,
    Problem,
    VLLM_ASSETS_DIR,
    ToyArithmetic,
    build_tokenizer,
    evaluate,
    extract_answer,
    is_correct,
    toy_model_path,
    toy_task,
)
from opd_jax.tasks.base import DEMO_CONFIG, DemoSettings, Task, TaskSetup, teacher_kl
from opd_jax.tasks.cross_tokenizer import ToyArithmeticCrossTokenizer

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "DEMO_CONFIG",
    "DemoSettings",
    "EvalResult",
    "Problem",
    "Task",
    "TaskSetup",
    "build_tokenizer",
    "evaluate",
    "extract_answer",
    "get_task",
    "is_correct",
    "register_task",
    "task_names",
    "teacher_kl",
    "toy_model_path",
    "toy_task",
]

_registry: dict[str, Task] = {}
#: The registered tasks by name (read-only; add one with :func:`register_task`).
TASKS = types.MappingProxyType(_registry)


def register_task(name: str, task: Task) -> Task:
    """Add ``task`` to the registry under ``name`` and return it.

    Raises:
      ValueError: ``name`` is empty, already taken, or ``task`` lacks a member of :class:`Task`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a task name must be a non-empty string, got {name!r}")
    if name in _registry:
        raise ValueError(f"task {name!r} is already registered")
    if not isinstance(task, Task):
        missing = sorted(member for member in Task.__protocol_attrs__ if not hasattr(task, member))
        raise ValueError(f"task {name!r} is not a Task: it lacks {missing}")
    _registry[name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``.

    Raises:
      ValueError: an unknown name (the message lists the registered ones).
    """
    if name not in _registry:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(task_names())}")
    return _registry[name]


def task_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_registry)


register_task("arithmetic", ToyArithmetic())
# The same task on models vLLM serves (head size 32), sampled by the vLLM backend in the demo.
register_task("arithmetic_vllm", ToyArithmetic(
    "arithmetic_vllm", VLLM_ASSETS_DIR, DemoSettings(config=dataclasses.replace(DEMO_CONFIG, rollout_backend="vllm"))))
register_task("tool_use", tool_use.ToyToolUse())
# The same task with a student vLLM serves (head size 32) and the same teacher, sampled by the vLLM backend.
register_task("tool_use_vllm", tool_use.ToyToolUse(
    "tool_use_vllm", dataclasses.replace(
        tool_use.DEMO, config=dataclasses.replace(tool_use.DEMO.config, rollout_backend="vllm"), output=None),
    tool_use.VLLM_ASSETS_DIR))
# The arithmetic task with a teacher whose tokenizer reads digits in pairs (tokenizer_alignment "text").
register_task("arithmetic_cross_tokenizer", ToyArithmeticCrossTokenizer())
