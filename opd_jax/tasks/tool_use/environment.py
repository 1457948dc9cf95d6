"""The tool-use task's environment: the tools answer each model turn inside a multi-turn rollout.

A model turn ends with ``]`` (a call); the environment appends ``=`` and the tool's output, errors
included, and the model continues; EOS ends the episode. In a rollout the appended tokens are real
tokens (in ``token_mask``, so the student and the teacher both condition on them) but not response
tokens (out of ``response_mask``), so they get no advantage and no gradient.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from opd_jax import rollouts
from opd_jax.rollouts import RolloutFn
from opd_jax.sampling import generate
from opd_jax.tasks.tool_use.tools import tool_output
from opd_jax.tasks.tool_use.vocabulary import Vocabulary

__all__ = ["ToolEnvironment", "make_rollout_fn"]

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
    """The task's multi-turn ``rollout_fn`` for :func:`opd_jax.train.train` (and :func:`~opd_jax.tasks.tool_use.evaluation.evaluate`).

    :func:`opd_jax.rollouts.multi_turn_rollout` with a :class:`ToolEnvironment`: ``rollout_fn(model,
    prompt_tokens_BxP, prompt_mask_BxP, key, sampling_config) -> Rollout`` ``[B, P + N]``, where
    ``N = sampling_config.max_new_tokens`` holds model tokens and tool outputs together; tool outputs
    are in ``token_mask``, not in ``response_mask``. ``generate_fn`` replaces
    :func:`opd_jax.sampling.generate` for one turn (tests script a policy with it).
    """
    return rollouts.make_rollout_fn(ToolEnvironment(vocabulary), generate_fn=generate_fn)
