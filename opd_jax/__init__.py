"""opd_jax: on-policy distillation of language models with f-divergences, including OPD+.

The estimators are pure functions of ``[B, T]`` log-probabilities (:mod:`opd_jax.advantages`,
:mod:`opd_jax.objectives`); :mod:`opd_jax.exact` computes their exact expected gradients on tiny
problems; :mod:`opd_jax.models` and :mod:`opd_jax.sampling` run them on real language models.
"""

from opd_jax import divergences, exact, models, sampling, sharding
from opd_jax.advantages import leave_one_out_baseline, sequence_advantages, token_advantages
from opd_jax.objectives import (
    clipped_token_mask,
    full_vocab_divergence,
    importance_surrogate,
    pg_surrogate,
)

__version__ = "0.1.0"

__all__ = [
    "clipped_token_mask",
    "divergences",
    "exact",
    "full_vocab_divergence",
    "importance_surrogate",
    "leave_one_out_baseline",
    "models",
    "pg_surrogate",
    "sampling",
    "sequence_advantages",
    "sharding",
    "token_advantages",
]
