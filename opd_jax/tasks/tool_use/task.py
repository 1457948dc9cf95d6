"""The tool-use task as a registered :class:`~opd_jax.tasks.base.Task`: the shipped teacher and
student, the task they were trained on, the training setup, the evaluator and the demo's settings.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from opd_jax.tasks.base import (
    DEMO_CONFIG,
    SUMMARY_COLUMNS,
    DemoSettings,
    Evaluator,
    TaskSetup,
    read_task_metadata,
    shipped_model_folder,
)
from opd_jax.tasks.tool_use.checker import check_response
from opd_jax.tasks.tool_use.environment import make_rollout_fn
from opd_jax.tasks.tool_use.evaluation import evaluate
from opd_jax.tasks.tool_use.problems import ToolUseProblem, ToolUseTask
from opd_jax.tasks.tool_use.vocabulary import Vocabulary, encode_prompts

__all__ = ["ASSETS_DIR", "DEMO", "VLLM_ASSETS_DIR", "ToyToolUse", "toy_model_path", "toy_task"]

#: The shipped models: ``teacher/`` and ``student/`` (config, safetensors, tokenizer) and ``metadata.json``.
ASSETS_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tool_use"
#: A student with head size 32 for the same teacher, for vLLM's CPU attention (it rejects 12).
VLLM_ASSETS_DIR = ASSETS_DIR.parent / "tool_use_vllm"
#: The experiment that trains the shipped models (named in the errors about missing assets).
_MAKE_MODELS = "experiments/make_tool_use_models.py"

#: The demo's settings on this task (those of ``experiments/tool_use_grid.py``): multi-turn rollouts
#: cost more per step, and the weak student moves within 40 steps at a higher learning rate. The
#: table adds the share of valid tool calls.
DEMO = DemoSettings(
    config=dataclasses.replace(DEMO_CONFIG, prompts_per_step=32, learning_rate=1e-3, steps=40, eval_every=20,
                               checkpoint_every=20),
    columns=SUMMARY_COLUMNS[:1] + (("call_validity", "call validity"),) + SUMMARY_COLUMNS[1:],
    output=pathlib.Path("runs/demo-tool_use"),
)


def toy_model_path(role: str) -> pathlib.Path:
    """The folder of the shipped tool-use ``"teacher"`` or ``"student"``.

    Raises:
      ValueError: another role.
      FileNotFoundError: missing assets (regenerate with ``experiments/make_tool_use_models.py``).
    """
    return shipped_model_folder(ASSETS_DIR, role, what="tool-use", script=_MAKE_MODELS)


def toy_task() -> ToolUseTask:
    """The :class:`ToolUseTask` the shipped models were trained on (from ``metadata.json``)."""
    return ToolUseTask.from_dict(read_task_metadata(ASSETS_DIR, script=_MAKE_MODELS))


@dataclasses.dataclass(frozen=True)
class ToyToolUse:
    """The toy tool-use task with its shipped teacher and student (a :class:`~opd_jax.tasks.base.Task`).

    Problems come from :func:`toy_task`, the checker is the final answer of :func:`check_response`,
    rollouts are multi-turn (:func:`make_rollout_fn`), the budget (model tokens and tool outputs
    together) is the longest reference transcript + 4 tokens. ``demo``: the demo's settings
    (:data:`DEMO`).
    """

    name: str = "tool_use"
    demo: DemoSettings = DEMO
    #: Where the student comes from (the teacher and the task are always :data:`ASSETS_DIR`'s).
    student_assets: pathlib.Path = ASSETS_DIR

    def problems(self, split: str, n: int, seed: int) -> list[ToolUseProblem]:
        return toy_task().sample_problems(seed, n, split=split)

    def check(self, problem: ToolUseProblem, response_text: str) -> bool:
        return check_response(problem, response_text).answer_correct

    def tokenizer(self):
        """The character tokenizer of the shipped student (checked against :class:`Vocabulary`)."""
        from opd_jax import tokenization

        tokenizer = tokenization.load_tokenizer(self.model_path("student"))
        Vocabulary().check_tokenizer(tokenizer, "tool-use")
        return tokenizer

    def model_path(self, role: str) -> pathlib.Path:
        if role == "student":
            return shipped_model_folder(self.student_assets, role, what="tool-use", script=_MAKE_MODELS)
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
            vocabulary.check_tokenizer(tokenizer, "tool-use")
        held_out = self.problems("test", eval_problems, seed + 1)

        def evaluate_model(model) -> dict[str, float]:
            return evaluate(model, held_out, teacher=teacher, batch_size=batch_size, key=jax.random.key(seed),
                            vocabulary=vocabulary).metrics()

        return evaluate_model

    def setup(self, *, train_problems: int = 4096, eval_problems: int = 512, seed: int = 0) -> TaskSetup:
        from opd_jax import models
        from opd_jax.train import PromptSet

        task, tokenizer, vocabulary = toy_task(), self.tokenizer(), Vocabulary()
        teacher, _ = models.from_pretrained(self.model_path("teacher"))
        student, student_config = models.from_pretrained(self.model_path("student"))
        tokens_NxP, mask_NxP = encode_prompts(self.problems("train", train_problems, seed), task.max_prompt_length,
                                              vocabulary)
        return TaskSetup(
            name=self.name, tokenizer=tokenizer, teacher=teacher, student=student, student_config=student_config,
            prompts=PromptSet(tokens_NxP, mask_NxP),
            evaluate=self.evaluator(tokenizer, teacher, eval_problems=eval_problems, seed=seed),
            stop_ids=(vocabulary.eos_id,), pad_id=vocabulary.pad_id, rollout_fn=make_rollout_fn(vocabulary),
            max_new_tokens=task.max_response_length + 4,
        )
