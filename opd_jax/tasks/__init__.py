"""Toy tasks with exact answer checkers, and the small teacher / student checkpoints shipped for them."""

from opd_jax.tasks.arithmetic import (
    ArithmeticTask,
    EvalResult,
    Problem,
    build_tokenizer,
    evaluate,
    extract_answer,
    is_correct,
    toy_model_path,
    toy_task,
)

__all__ = [
    "ArithmeticTask",
    "EvalResult",
    "Problem",
    "build_tokenizer",
    "evaluate",
    "extract_answer",
    "is_correct",
    "toy_model_path",
    "toy_task",
]
