"""Rollout functions for :func:`opd_jax.train.train`, and multi-turn rollouts behind an Environment.

A rollout function has the signature of :data:`RolloutFn`; :func:`opd_jax.sampling.generate` is the
single-turn one. :func:`multi_turn_rollout` alternates the model and an :class:`Environment`: the
model samples until a stop id, the environment answers a turn with tokens that are appended to the
context (or ends the episode), and the model goes on. Environment tokens are real tokens (in
``token_mask``: the student and the teacher both condition on them) but not response tokens (out of
``response_mask``: they get no advantage and no gradient).

Layout, as in :mod:`opd_jax.sampling`: ``[B, L]`` with ``L = P + N``, a left-padded prompt of ``P``
slots, then ``N`` response slots holding model and environment tokens in order, then padding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.models.decoder import Decoder
from opd_jax.sampling import Rollout, SamplingConfig, generate

__all__ = ["Environment", "MultiTurn", "MultiTurnBackend", "RolloutFn", "make_rollout_fn", "multi_turn_rollout"]

#: ``(model, prompt_tokens_BxP, prompt_mask_BxP, key, sampling_config) -> Rollout`` of length ``P + N``.
RolloutFn = Callable[[Decoder, jax.Array, jax.Array, jax.Array, SamplingConfig], Rollout]


@runtime_checkable
class Environment(Protocol):
    """What a multi-turn task tells :func:`multi_turn_rollout`.

    ``turn_stop_ids`` end a model turn and hand over to the environment (a tool call's closing
    token); ``episode_stop_ids`` end the episode (EOS), together with the sampling config's stop
    ids. A token in both ends the turn.
    """

    @property
    def turn_stop_ids(self) -> tuple[int, ...]: ...

    @property
    def episode_stop_ids(self) -> tuple[int, ...]: ...

    def respond(self, turn_T: np.ndarray, context_C: np.ndarray) -> Sequence[int] | None:
        """The tokens to append after a turn that ended with a turn stop id, or ``None`` to end the episode.

        Args:
          turn_T: int32, the model's tokens of this turn, the stop id last.
          context_C: int32, the row's real prompt tokens, then the whole response so far (model
            and environment tokens, this turn included).
        """
        ...


@dataclasses.dataclass
class _Episodes:
    """The carry of :func:`multi_turn_rollout`'s loop: ``B`` episodes with ``N`` response slots each.

    Attributes:
      response_BxN: int32, model and environment tokens in order, then padding.
      from_model_BxN: bool, slots the model wrote.
      logp_BxN: float32, the model tokens' sampling log-probabilities (0 elsewhere).
      used_B: int, filled slots.
      done_B: bool, finished episodes.
    """

    response_BxN: np.ndarray
    from_model_BxN: np.ndarray
    logp_BxN: np.ndarray
    used_B: np.ndarray
    done_B: np.ndarray

    @classmethod
    def empty(cls, batch: int, budget: int, pad_id: int) -> _Episodes:
        return cls(np.full((batch, budget), pad_id, np.int32), np.zeros((batch, budget), bool),
                   np.zeros((batch, budget), np.float32), np.zeros(batch, np.int64), np.zeros(batch, bool))

    def append(self, row: int, ids: np.ndarray, logp: np.ndarray | None = None) -> int:
        """Write ``ids`` (model tokens when ``logp`` is given) after row ``row``'s filled slots, cut
        at the budget; return how many fit."""
        start = self.used_B[row]
        keep = min(len(ids), self.response_BxN.shape[1] - start)
        self.response_BxN[row, start : start + keep] = ids[:keep]
        if logp is not None:
            self.from_model_BxN[row, start : start + keep] = True
            self.logp_BxN[row, start : start + keep] = logp[:keep]
        self.used_B[row] += keep
        return keep

    def context(self, row: int, prompt: np.ndarray) -> np.ndarray:
        """Row ``row``'s real prompt tokens and its response so far, ``[C]`` int32."""
        return np.concatenate([prompt, self.response_BxN[row, : self.used_B[row]]])

    def rollout(self, prompt_tokens_BxP: np.ndarray, prompt_mask_BxP: np.ndarray) -> Rollout:
        in_response_BxN = np.arange(self.response_BxN.shape[1])[None, :] < self.used_B[:, None]
        return Rollout(
            tokens=jnp.asarray(np.concatenate([prompt_tokens_BxP, self.response_BxN], axis=1)),
            token_mask=jnp.asarray(np.concatenate([prompt_mask_BxP, in_response_BxN], axis=1)),
            response_mask=jnp.asarray(np.concatenate([np.zeros_like(prompt_mask_BxP), self.from_model_BxN], axis=1)),
            sampling_logp=jnp.asarray(
                np.concatenate([np.zeros(prompt_mask_BxP.shape, np.float32), self.logp_BxN], axis=1)),
        )


def _bucket(count: int, batch: int) -> int:
    """Rows per ``generate`` call: a power of two (>= 8) up to the full batch, so few shapes compile."""
    size = 8
    while size < count:
        size *= 2
    return min(size, batch)


def _left_padded(contexts: Sequence[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[R, width]`` int32 tokens and bool mask, each context right-aligned."""
    tokens_RxW = np.full((len(contexts), width), pad_id, np.int32)
    mask_RxW = np.zeros((len(contexts), width), bool)
    for slot, ids in enumerate(contexts):
        tokens_RxW[slot, width - len(ids) :] = ids
        mask_RxW[slot, width - len(ids) :] = True
    return tokens_RxW, mask_RxW


def multi_turn_rollout(
    model: Decoder,
    prompt_tokens_BxP,
    prompt_mask_BxP,
    key: jax.Array,
    config: SamplingConfig,
    *,
    environment: Environment,
    generate_fn: RolloutFn = generate,
) -> Rollout:
    """Alternate the model and ``environment`` until every episode ends; a :class:`Rollout` ``[B, P + N]``.

    ``N = config.max_new_tokens`` is the budget for model *and* environment tokens together. Each
    turn re-prefills the context (prompt and response so far, left-padded to ``P + N``) and samples
    with ``generate_fn`` until a stop id. An episode ends at an episode stop id, when the
    environment answers ``None``, when the budget is used up (an answer is cut at the budget), or
    when a turn does not stop within ``N`` tokens. Only running episodes are sampled, in
    power-of-two buckets, so a few shapes compile. The model needs ``max_position_embeddings >= P + 2N``.

    Args:
      model: the policy.
      prompt_tokens_BxP: int, left-padded prompts; ``prompt_mask_BxP``: bool, their real tokens.
      key: PRNG key, split once per turn.
      config: the sampling settings of every turn.
      environment: the :class:`Environment`.
      generate_fn: one turn, with :func:`opd_jax.sampling.generate`'s signature and layout (tests
        script a policy with it).

    Returns:
      ``tokens``: prompt, then model and environment tokens, then ``config.pad_id``; ``token_mask``:
      prompt, model and environment tokens; ``response_mask``: model tokens; ``sampling_logp``: the
      model tokens' sampling log-probabilities (0 elsewhere).
    """
    prompt_tokens_BxP = np.asarray(prompt_tokens_BxP, np.int32)
    prompt_mask_BxP = np.asarray(prompt_mask_BxP).astype(bool)
    batch, prompt_length = prompt_tokens_BxP.shape
    budget = config.max_new_tokens
    stop_ids = {*config.stop_ids, *environment.episode_stop_ids, *environment.turn_stop_ids}
    # After the first turn a group's episodes differ: no turn shares a prefill.
    turn_config = dataclasses.replace(config, stop_ids=tuple(sorted(stop_ids)), group_size=1)
    prompts = [prompt_tokens_BxP[row, prompt_mask_BxP[row]] for row in range(batch)]
    episodes = _Episodes.empty(batch, budget, config.pad_id)
    while not episodes.done_B.all():
        live = np.flatnonzero(~episodes.done_B)
        # Fill the bucket with copies of live rows; their samples are discarded.
        members = np.resize(live, _bucket(len(live), batch))
        tokens, mask = _left_padded([episodes.context(row, prompts[row]) for row in members],
                                    prompt_length + budget, config.pad_id)
        key, turn_key = jax.random.split(key)
        turn = generate_fn(model, tokens, mask, turn_key, turn_config)
        new_RxN = [np.asarray(array[:, tokens.shape[1] :]) for array in (turn.tokens, turn.response_mask, turn.sampling_logp)]
        for slot, row in enumerate(live):
            _take_turn(episodes, row, prompts[row], environment, *(array[slot] for array in new_RxN))
    return episodes.rollout(prompt_tokens_BxP, prompt_mask_BxP)


def _take_turn(episodes: _Episodes, row: int, prompt: np.ndarray, environment: Environment,
               tokens_N: np.ndarray, mask_N: np.ndarray, logp_N: np.ndarray) -> None:
    """Append one sampled turn to episode ``row``, then the environment's answer or the episode's end."""
    ids = tokens_N[mask_N]
    keep = episodes.append(row, ids, logp_N[mask_N])
    if keep < len(ids) or int(ids[keep - 1]) not in environment.turn_stop_ids:
        episodes.done_B[row] = True  # an episode stop id, out of budget, or a turn that never stopped
        return
    answer = environment.respond(ids, episodes.context(row, prompt))
    if answer is None:
        episodes.done_B[row] = True
        return
    episodes.append(row, np.asarray(answer, np.int32))
    episodes.done_B[row] = episodes.used_B[row] >= episodes.response_BxN.shape[1]


@dataclasses.dataclass(frozen=True)
class MultiTurn:
    """A multi-turn ``rollout_fn``: :func:`multi_turn_rollout` with its environment bound.

    Called like :func:`opd_jax.sampling.generate` it samples its turns with ``generate_fn`` in this
    process; :class:`MultiTurnBackend` runs the same episodes with another backend's turns (the
    loop does that for ``rollout_backend = "vllm"``).
    """

    environment: Environment
    generate_fn: RolloutFn = generate

    def __call__(self, model: Decoder, prompt_tokens_BxP, prompt_mask_BxP, key: jax.Array,
                 config: SamplingConfig) -> Rollout:
        return multi_turn_rollout(model, prompt_tokens_BxP, prompt_mask_BxP, key, config,
                                  environment=self.environment, generate_fn=self.generate_fn)


class MultiTurnBackend:
    """A rollout backend whose ``generate`` runs :func:`multi_turn_rollout`, each turn one ``generate``
    of ``backend`` (an engine that samples single turns, such as vLLM, then serves multi-turn
    episodes). Weights and closing go to ``backend``.
    """

    def __init__(self, backend, environment: Environment):
        self.backend, self.environment = backend, environment
        self.name = backend.name

    def generate(self, prompt_tokens_BxP, prompt_mask_BxP, key: jax.Array, sampling: SamplingConfig) -> Rollout:
        def turn(_model, tokens_RxW, mask_RxW, turn_key, config):
            return self.backend.generate(tokens_RxW, mask_RxW, turn_key, config)

        return multi_turn_rollout(None, prompt_tokens_BxP, prompt_mask_BxP, key, sampling,
                                  environment=self.environment, generate_fn=turn)

    def sync_weights(self, params) -> None:
        self.backend.sync_weights(params)

    def close(self) -> None:
        self.backend.close()


def make_rollout_fn(environment: Environment, *, generate_fn: RolloutFn = generate) -> MultiTurn:
    """:func:`multi_turn_rollout` with ``environment`` bound: a ``rollout_fn`` for :func:`opd_jax.train.train`."""
    return MultiTurn(environment, generate_fn)
