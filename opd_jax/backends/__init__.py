"""Rollout backends: where the student's rollouts are sampled.

A backend turns prompts into a :class:`~opd_jax.sampling.Rollout` and is told the student's new
weights after every update. The loop (:func:`opd_jax.train.train`) and the evaluation
(:mod:`opd_jax.evaluation`) use nothing else of it, so the sampler can live in this process (the
JAX sampler, the default) or in an inference engine's own process and environment (vLLM).

The log-probability contract. ``Rollout.sampling_logp`` holds the backend's log-probability of each
sampled token under the distribution it sampled from (after temperature), float32, 0 outside the
response. The loop never trains on it: it recomputes the behaviour log-probabilities with its own
forward pass, and logs ``sampling_logp_gap`` = mean |backend − trainer| over response tokens every
step, because an engine/trainer mismatch biases every importance ratio built on the engine's
numbers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from opd_jax.backends.jax_sampler import JaxBackend
from opd_jax.config import ROLLOUT_BACKENDS as BACKENDS
from opd_jax.sampling import Rollout, SamplingConfig

__all__ = ["BACKENDS", "JaxBackend", "RolloutBackend", "WeightSyncError"]


@runtime_checkable
class RolloutBackend(Protocol):
    """What the loop asks of a sampler.

    ``generate`` samples one response per prompt row with the weights of the last
    ``sync_weights`` call; the same ``key`` and weights give the same tokens where the backend is
    deterministic (the JAX one is; vLLM is seeded from the key). ``close`` releases the engine.
    """

    name: str

    def generate(self, prompt_tokens_BxP: jax.Array, prompt_mask_BxP: jax.Array, key: jax.Array,
                 sampling: SamplingConfig) -> Rollout:
        """A :class:`Rollout` ``[B, P + sampling.max_new_tokens]`` (see :mod:`opd_jax.sampling`)."""
        ...

    def sync_weights(self, params: Any) -> None:
        """Use ``params`` (the student's ``nnx.State``) for every later ``generate``."""
        ...

    def close(self) -> None: ...


class WeightSyncError(RuntimeError):
    """Sending the student's weights to the rollout backend failed; the run stopped at ``step``."""

    def __init__(self, step: int, backend: str, message: str):
        self.step, self.backend = step, backend
        super().__init__(message)

