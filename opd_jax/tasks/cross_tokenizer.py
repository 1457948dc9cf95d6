"""The toy arithmetic task across tokenizers: a teacher that reads digits in pairs, the usual student.

The student is the shipped character-level one (:data:`~opd_jax.tasks.arithmetic.ASSETS_DIR`); the
teacher (``assets/cross_tokenizer/teacher``, trained by ``experiments/make_cross_tokenizer_teacher.py``)
has the arithmetic teacher's architecture and training but the tokenizer of
:func:`~opd_jax.tasks.arithmetic.build_digit_pair_tokenizer`, where every pair of digits is one token.
Distilling it needs ``tokenizer_alignment = "text"``: its demo trains with it, and its
:class:`~opd_jax.train.PromptSet` carries the teacher's reader (each prompt in the teacher's tokens).

The held-out evaluation reports accuracy and response length; the teacher-KL on the student's tokens
is not defined across vocabularies, so the evaluation leaves it out.
"""

from __future__ import annotations

import dataclasses
import pathlib

from opd_jax.tasks.arithmetic import ASSETS_DIR, ToyArithmetic, toy_task
from opd_jax.tasks.base import DEMO_CONFIG, SUMMARY_COLUMNS, DemoSettings, TaskSetup, shipped_model_folder

__all__ = ["CROSS_TOKENIZER_ASSETS_DIR", "ToyArithmeticCrossTokenizer"]

#: The digit-pair teacher's folder (``teacher/``, ``metadata.json``).
CROSS_TOKENIZER_ASSETS_DIR = ASSETS_DIR / "cross_tokenizer"
_MAKE_TEACHER = "experiments/make_cross_tokenizer_teacher.py"


@dataclasses.dataclass(frozen=True)
class ToyArithmeticCrossTokenizer(ToyArithmetic):
    """:class:`~opd_jax.tasks.arithmetic.ToyArithmetic` with the digit-pair teacher (module docstring)."""

    name: str = "arithmetic_cross_tokenizer"
    demo: DemoSettings = DemoSettings(
        config=dataclasses.replace(DEMO_CONFIG, tokenizer_alignment="text"),
        columns=tuple(column for column in SUMMARY_COLUMNS if column[0] != "teacher_kl"))
    teacher_assets: pathlib.Path = CROSS_TOKENIZER_ASSETS_DIR

    def model_path(self, role: str) -> pathlib.Path:
        if role == "teacher":
            return shipped_model_folder(self.teacher_assets, role, what="cross-tokenizer toy", script=_MAKE_TEACHER)
        return super().model_path(role)

    def evaluator(self, tokenizer, teacher, *, eval_problems: int = 512, seed: int = 0):
        """Accuracy and response length (no teacher-KL: the teacher reads other tokens)."""
        return super().evaluator(tokenizer, None, eval_problems=eval_problems, seed=seed)

    def setup(self, *, train_problems: int = 4096, eval_problems: int = 512, seed: int = 0) -> TaskSetup:
        from opd_jax import tokenization
        from opd_jax.retokenize import TeacherReader
        from opd_jax.teacher_bytes import vocabulary_bytes
        from opd_jax.train import PromptSet

        setup = super().setup(train_problems=train_problems, eval_problems=eval_problems, seed=seed)
        teacher_tokenizer = tokenization.load_tokenizer(self.model_path("teacher"))
        # The same prompts, in the teacher's tokens (pairs of digits make them shorter, never longer).
        tokens, mask = tokenization.encode_prompts(
            teacher_tokenizer, [p.prompt for p in self.problems("train", train_problems, seed)],
            max_length=toy_task(self.assets).max_prompt_length, use_chat_template=False,
            pad_id=int(teacher_tokenizer.pad_token_id))
        reader = TeacherReader(setup.tokenizer, ("teacher",), (teacher_tokenizer,), (tokens,), (mask,),
                               (setup.teacher.config.max_position_embeddings,), setup.stop_ids,
                               vocabularies=(vocabulary_bytes(teacher_tokenizer, setup.teacher.config.vocab_size),))
        prompts = PromptSet(setup.prompts.tokens, setup.prompts.mask, teacher_text=reader)
        return dataclasses.replace(setup, prompts=prompts)
