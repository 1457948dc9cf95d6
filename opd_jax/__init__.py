"""opd_jax: on-policy distillation of language models with f-divergences, including OPD+.

The estimators are pure functions of ``[B, T]`` log-probabilities (:mod:`opd_jax.advantages`,
:mod:`opd_jax.objectives`, :mod:`opd_jax.topk`); :mod:`opd_jax.exact` computes their exact expected
gradients on tiny problems; :mod:`opd_jax.models` and :mod:`opd_jax.sampling` run them on real
language models, and :mod:`opd_jax.train` distils with them (its objective plugs in through
:mod:`opd_jax.step`).
"""

from opd_jax import divergences, exact, models, sampling, sharding, topk
from opd_jax.advantages import leave_one_out_baseline, reward_to_go, sequence_advantages, token_advantages
from opd_jax.objectives import (
    clipped_token_mask,
    full_vocab_divergence,
    full_vocab_divergence_from_hidden,
    full_vocab_reward_to_go,
    importance_surrogate,
    pg_surrogate,
)
from opd_jax.topk import TeacherTopK, teacher_topk, topk_divergence, topk_token_advantages

__version__ = "0.1.0"

__all__ = [
    "TeacherTopK",
    "clipped_token_mask",
    "divergences",
    "exact",
    "full_vocab_divergence",
    "full_vocab_divergence_from_hidden",
    "full_vocab_reward_to_go",
    "importance_surrogate",
    "leave_one_out_baseline",
    "models",
    "pg_surrogate",
    "reward_to_go",
    "sampling",
    "sequence_advantages",
    "sharding",
    "teacher_topk",
    "token_advantages",
    "topk",
    "topk_divergence",
    "topk_token_advantages",
]
