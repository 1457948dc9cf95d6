"""ExOPD / G-OPD reward extrapolation through the plug points, and a toy run against OPD+.

G-OPD ("Learning beyond Teacher: Generalized On-Policy Distillation with Reward Extrapolation")
rewards a token by ``λ·(log q − log π_ref) − (log π − log π_ref)``: a KL-regularised RL reward
whose optimum is the extrapolation ``∝ π_ref^{1−λ} q^λ`` of the teacher past the reference (λ > 1).
At λ = 1 it is reverse-KL stop-gradient OPD. The whole estimator is the function below.

What it follows (tests/test_exopd.py checks it by exact enumeration, float64): with ``gamma = 1``
the exact gradient of ``J_λ(θ) = E_{y∼π}[Σ_n log π(y_n) − λ log q(y_n) − (1 − λ) log π_ref(y_n)]``
(the reverse KL from π to the unnormalised extrapolation); ``gamma = 0`` (the per-token form) is
biased for it beyond one step, like every per-token estimator.

Usage: python experiments/exopd.py [--steps 200] [--scale 1.25] [--output runs/exopd]
"""

from opd_jax.advantages import reward_to_go


def exopd_advantage_fn(scale: float, gamma: float = 0.0):
    """``advantage_fn`` of G-OPD with reward scale ``scale`` (λ); needs ``train(reference=...)``."""

    def advantage_fn(student_logp_BxT, teacher_logp_BxT, response_mask_BxT, *, reference_logp_BxT):
        reward_BxT = scale * (teacher_logp_BxT - reference_logp_BxT) - (student_logp_BxT - reference_logp_BxT)
        return reward_to_go(reward_BxT, response_mask_BxT, gamma=gamma)

    return advantage_fn
