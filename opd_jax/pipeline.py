"""The loop's rollout producer: send the student's weights to the backend, sample, time both.

With ``ahead=True`` the rollout of step ``k + 1`` is produced in a background thread from the
parameters step ``k`` starts with, while step ``k`` scores and updates (JAX releases the GIL
while a computation runs, and an inference engine runs in its own process anyway). The loop then
trains on rollouts one step old: see :class:`~opd_jax.config.TrainConfig` ``pipeline_rollouts`` and
docs/overlap.md for the estimator that gives and its measured bias.

With a ``score`` stage (a teacher on its own devices) the producer also scores each rollout with
the teacher, so that step ``k + 1``'s scoring runs on the teacher's devices while step ``k``
updates on the student's.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import jax

from opd_jax.backends import RolloutBackend, WeightSyncError
from opd_jax.sampling import Rollout, SamplingConfig

__all__ = ["RolloutPipeline"]

#: ``(step, data_position) -> (prompt_tokens_BxP, prompt_mask_BxP, key)``: the prompts and sampling key of a step.
BatchFn = Callable[[int, int], tuple[Any, Any, jax.Array]]
#: ``(rollout, data_position) -> teacher_logp_BxT``: the teacher's log-probs of a rollout, placed like it.
ScoreFn = Callable[[Rollout, int], jax.Array]


class RolloutPipeline:
    """Produces each step's rollout, optionally one step ahead.

    Args:
      backend: where rollouts are sampled.
      batch_fn: the prompts and PRNG key of a step (a pure function of the step and data position,
        so a prefetched rollout is the one the step would have sampled itself).
      sampling: the sampling settings.
      ahead: prefetch the next step's rollout in a background thread.
      place: applied to each rollout before it is returned (e.g. a ``device_put`` to the batch sharding).
      score: the teacher's scoring of each rollout, run by the producer (``None``: the step scores).
    """

    def __init__(self, backend: RolloutBackend, batch_fn: BatchFn, sampling: SamplingConfig, *, ahead: bool,
                 place: Callable[[Rollout], Rollout] = lambda rollout: rollout, score: ScoreFn | None = None):
        self.backend, self.batch_fn, self.sampling, self.place, self.score = backend, batch_fn, sampling, place, score
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="opd-rollouts") if ahead else None
        self._pending: tuple[int, concurrent.futures.Future] | None = None

    def _produce(self, params: Any, step: int, data_position: int) -> tuple[Rollout, jax.Array | None, dict]:
        began = time.perf_counter()
        try:
            self.backend.sync_weights(params)
        except Exception as error:
            raise WeightSyncError(
                step + 1, self.backend.name,
                f"step {step + 1}: sending the student's weights to the {self.backend.name} rollout backend failed "
                f"({type(error).__name__}: {error}); training stopped, the checkpoints already written are intact",
            ) from error
        synced = time.perf_counter()
        tokens, mask, key = self.batch_fn(step, data_position)
        rollout = jax.block_until_ready(self.place(self.backend.generate(tokens, mask, key, self.sampling)))
        sampled = time.perf_counter()
        seconds = {"sync_seconds": synced - began, "sample_seconds": sampled - synced}
        if self.score is None:
            return rollout, None, seconds
        teacher_logp_BxT = jax.block_until_ready(self.score(rollout, data_position))
        return rollout, teacher_logp_BxT, seconds | {"teacher_seconds": time.perf_counter() - sampled}

    def take(self, params: Any, step: int, data_position: int) -> tuple[Rollout, jax.Array | None, dict[str, float]]:
        """The rollout of ``step``, its teacher log-probs and its timings: prefetched, or produced now from ``params``.

        The teacher log-probs are ``None`` without a ``score`` stage. The timings are
        ``sync_seconds``, ``sample_seconds`` and, with a ``score`` stage, ``teacher_seconds`` (spent
        by the producer), and ``rollout_wait_seconds`` (how long the caller waited: all of it
        unless prefetched).
        """
        began = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            rollout, teacher_logp_BxT, seconds = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            rollout, teacher_logp_BxT, seconds = self._produce(params, step, data_position)
        return rollout, teacher_logp_BxT, seconds | {"rollout_wait_seconds": time.perf_counter() - began}

    def prefetch(self, params: Any, step: int, data_position: int) -> None:
        """Start producing the rollout of ``step`` from ``params`` (nothing unless ``ahead``)."""
        if self._executor is not None:
            self._pending = (step, self._executor.submit(self._produce, params, step, data_position))

    def close(self) -> None:
        """Wait for a rollout in flight (a running computation cannot be cancelled) and drop it."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
