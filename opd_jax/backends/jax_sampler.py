"""The default rollout backend: :func:`opd_jax.sampling.generate` (or any rollout function) in this process."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from opd_jax.rollout_layout import RolloutShardings, make_reshard, replica_sampler
from opd_jax.sampling import Rollout, SamplingConfig, generate

__all__ = ["JaxBackend"]

#: ``(model, prompt_tokens_BxP, prompt_mask_BxP, key, sampling_config) -> Rollout``.
RolloutFn = Callable[..., Rollout]


class JaxBackend:
    """Samples with the student's own graph in this process; ``sync_weights`` only keeps a reference.

    Args:
      graphdef: the student's ``nnx.split`` graph.
      rollout_fn: ``(model, prompt_tokens_BxP, prompt_mask_BxP, key, sampling) -> Rollout``; the
        default is single-turn :func:`~opd_jax.sampling.generate`, a multi-turn one comes from
        :mod:`opd_jax.rollouts`.
    """

    name = "jax"

    def __init__(self, graphdef: Any, rollout_fn: RolloutFn = generate):
        self.graphdef, self.rollout_fn = graphdef, rollout_fn
        self.params = None

    @classmethod
    def sharded(cls, graphdef: Any, shardings, sampling: SamplingConfig,
                rollout: RolloutShardings | None = None) -> JaxBackend:
        """:func:`generate` compiled with explicit shardings: parameters by the rules, prompts and rollout by rows.

        ``shardings`` is the step's :class:`~opd_jax.step.StepShardings`; the backend samples with
        ``sampling`` only.

        With ``rollout`` (an inference layout, :mod:`opd_jax.rollout_layout`) each call reshards
        the parameters and prompts onto it and every data replica decodes its rows in its own
        slots. Without, it decodes on the training layout: where the rows are split over devices,
        the static batch (``slots`` = the rows) with every row prefilled (``group_size`` 1), since
        refilling a slot, moving rows between slots or copying a group's prefill would cross devices.
        """
        if rollout is None:
            batch = shardings.batch

            @functools.partial(jax.jit, in_shardings=(shardings.params, batch, batch, shardings.replicated),
                               out_shardings=batch)
            def sample(params, prompt_tokens, prompt_mask, key):
                rows = prompt_tokens.shape[0]
                split = batch.shard_shape(prompt_tokens.shape)[0] < rows
                config = dataclasses.replace(sampling, slots=rows, group_size=1) if split else sampling
                return generate(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, key, config)
        else:
            reshard, on_layout = make_reshard(shardings, rollout), replica_sampler(graphdef, rollout, sampling)

            def sample(params, prompt_tokens, prompt_mask, key):
                return on_layout(*reshard(params, prompt_tokens, prompt_mask, key))

        def rollout_fn(model, prompt_tokens, prompt_mask, key, config):
            if config != sampling:
                raise ValueError(f"the sharded sampler was built for {sampling}, asked for {config}")
            return sample(nnx.state(model), prompt_tokens, prompt_mask, key)

        return cls(graphdef, rollout_fn)

    def sync_weights(self, params: Any) -> None:
        self.params = params

    def generate(self, prompt_tokens_BxP, prompt_mask_BxP, key, sampling: SamplingConfig) -> Rollout:
        if self.params is None:
            raise RuntimeError("JaxBackend.generate before sync_weights: no student weights yet")
        return self.rollout_fn(nnx.merge(self.graphdef, self.params), prompt_tokens_BxP, prompt_mask_BxP, key,
                               sampling)

    def close(self) -> None:
        self.params = None
