"""f-divergence generators evaluated from the log-ratio.

A generator ``f`` is convex with ``f(1) = 0``; per state,
``E_{v~π}[f(q(v)/π(v))] = D_f(q ‖ π)`` (Csiszár convention ``D_f(P‖Q) = E_Q[f(P/Q)]``).

Every function here takes ``log_u = log q − log π`` rather than ``u = q/π``, because the ratio of two
small probabilities is exactly where floating point fails, and returns an array of the same shape
and dtype. Three quantities are exposed per generator:

* ``f(log_u)``               ``f(u)``
* ``u_fprime(log_u)``        ``u f'(u) = d f(e^ℓ)/dℓ``
* ``opd_plus_reward(log_u)`` ``u f'(u) − f(u)``, the per-token OPD+ advantage; a closed form of its
  own because the difference of the two previous terms cancels catastrophically for large ``u``.

``u f'(u) − f(u)`` is the convex conjugate ``f*`` evaluated at the slope ``f'(u)``; its derivative
in ``u`` is ``u f''(u) ≥ 0``, so the OPD+ reward never decreases as the teacher/student ratio grows.

Reference: Zhao et al., *OPD+: Rethinking the Advantage Design for On-Policy Distillation*,
arXiv 2606.01039 (2026).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
ElementwiseFn = Callable[..., Array]

__all__ = ["Divergence", "custom", "get", "names"]


@dataclasses.dataclass(frozen=True)
class Divergence:
    """An f-divergence generator, evaluated from ``log_u``.

    Instances are immutable and hashable, so they can be static arguments of ``jax.jit``. Built-in
    generators compare equal when their name and parameters are equal.

    Attributes:
      name: registry name (``"alpha"``, ``"forward_kl"``, …) or the user's name for a custom one.
      params: the generator's parameters in the order its functions take them, e.g. ``(beta,)``.
      f_fn: ``f_fn(log_u, *params) -> f(exp(log_u))``.
      u_fprime_fn: ``u f'(u)`` as a function of ``(log_u, *params)``; ``None`` derives it from
        ``f_fn`` by forward-mode differentiation (``u f'(u) = d f(e^ℓ)/dℓ``).
      opd_plus_reward_fn: ``u f'(u) − f(u)`` as a function of ``(log_u, *params)``; ``None``
        computes the difference of the two.
    """

    name: str
    params: tuple[float, ...]
    f_fn: ElementwiseFn
    u_fprime_fn: ElementwiseFn | None = None
    opd_plus_reward_fn: ElementwiseFn | None = None

    def f(self, log_u: Array) -> Array:
        """``f(u)`` at ``u = exp(log_u)``; any shape, dtype preserved."""
        return self.f_fn(_as_float(log_u), *self.params)

    def u_fprime(self, log_u: Array) -> Array:
        """``u f'(u)`` at ``u = exp(log_u)``; any shape, dtype preserved."""
        log_u = _as_float(log_u)
        if self.u_fprime_fn is not None:
            return self.u_fprime_fn(log_u, *self.params)
        # f is elementwise, so a JVP with a tangent of ones is the elementwise derivative in ℓ.
        _, derivative = jax.jvp(self.f, (log_u,), (jnp.ones_like(log_u),))
        return derivative

    def opd_plus_reward(self, log_u: Array) -> Array:
        """``u f'(u) − f(u)``: the OPD+ per-token advantage (discount 0); dtype preserved."""
        log_u = _as_float(log_u)
        if self.opd_plus_reward_fn is not None:
            return self.opd_plus_reward_fn(log_u, *self.params)
        return self.u_fprime(log_u) - self.f(log_u)

    def __repr__(self) -> str:
        args = ", ".join(f"{p!r}" for p in self.params)
        return f"Divergence({self.name}{'(' + args + ')' if args else ''})"


def _as_float(x) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


# ---------------------------------------------------------------------------------------------
# Built-in generators. Each is written so that no intermediate overflows before the true value
# does, and so that values near u = 1 keep full relative precision (expm1 instead of exp − 1).
# ---------------------------------------------------------------------------------------------


def _reverse_kl_f(log_u):  # KL(π‖q): f(u) = −log u
    return -log_u


def _reverse_kl_u_fprime(log_u):
    return jnp.full_like(log_u, -1)


def _reverse_kl_reward(log_u):
    return log_u - 1


def _forward_kl_f(log_u):  # KL(q‖π): f(u) = u log u
    return jnp.exp(log_u) * log_u


def _forward_kl_u_fprime(log_u):
    return jnp.exp(log_u) * (log_u + 1)


def _forward_kl_reward(log_u):
    return jnp.exp(log_u)


def _log_mixture(log_u, beta):
    """``log(β u + 1 − β)`` without forming ``u``."""
    return jnp.logaddexp(math.log(beta) + log_u, math.log1p(-beta))


def _log_u_over_mixture(log_u, beta):
    """``log(u / (β u + 1 − β))`` = ``−log(β + (1 − β)/u)``, bounded above by ``−log β``."""
    return -jnp.logaddexp(math.log(beta), math.log1p(-beta) - log_u)


def _generalized_js_f(log_u, beta):
    # β u log u − (βu + 1 − β) log(βu + 1 − β), regrouped as β u log(u/m) − (1 − β) log m so that
    # the two terms growing like u log u never get subtracted from each other.
    return beta * jnp.exp(log_u) * _log_u_over_mixture(log_u, beta) - (1 - beta) * _log_mixture(
        log_u, beta
    )


def _generalized_js_u_fprime(log_u, beta):
    return beta * jnp.exp(log_u) * _log_u_over_mixture(log_u, beta)


def _generalized_js_reward(log_u, beta):
    return (1 - beta) * _log_mixture(log_u, beta)


def _total_variation_f(log_u):
    return 0.5 * jnp.abs(jnp.expm1(log_u))


def _total_variation_u_fprime(log_u):
    # f is not differentiable at u = 1; the subgradient 0 is used there, as jnp.sign does.
    return 0.5 * jnp.exp(log_u) * jnp.sign(log_u)


def _total_variation_reward(log_u):
    return 0.5 * jnp.sign(log_u)


def _squared_hellinger_f(log_u):  # (√u − 1)²
    return jnp.square(jnp.expm1(0.5 * log_u))


def _squared_hellinger_u_fprime(log_u):  # u − √u
    return jnp.exp(0.5 * log_u) * jnp.expm1(0.5 * log_u)


def _squared_hellinger_reward(log_u):  # √u − 1
    return jnp.expm1(0.5 * log_u)


def _pearson_chi2_f(log_u):  # (u − 1)²
    return jnp.square(jnp.expm1(log_u))


def _pearson_chi2_u_fprime(log_u):  # 2u(u − 1)
    return 2 * jnp.exp(log_u) * jnp.expm1(log_u)


def _pearson_chi2_reward(log_u):  # u² − 1
    return jnp.expm1(2 * log_u)


def _neyman_chi2_f(log_u):  # (1 − u)²/u = (√u − 1/√u)²
    return jnp.square(2 * jnp.sinh(0.5 * log_u))


def _neyman_chi2_u_fprime(log_u):  # u − 1/u
    return 2 * jnp.sinh(log_u)


def _neyman_chi2_reward(log_u):  # 2 − 2/u
    return -2 * jnp.expm1(-log_u)


def _alpha_f(log_u, alpha):
    # (u^α − αu − (1 − α)) / (α(α − 1)), with u^α − 1 − α(u − 1) written via expm1 for precision
    # near u = 1. For α > 1 and large u both expm1 terms overflow (inf − inf); there the value is
    # taken in log space as u^α · (1 − αu^{1−α} − (1 − α)u^{−α}) / (α(α − 1)).
    def near_one(ell):
        return (jnp.expm1(alpha * ell) - alpha * jnp.expm1(ell)) / (alpha * (alpha - 1))

    def large(ell):
        bracket = (alpha - 1) * jnp.expm1(-alpha * ell) - alpha * jnp.expm1((1 - alpha) * ell)
        return jnp.exp(alpha * ell + jnp.log(bracket) - math.log(alpha * (alpha - 1)))

    return _split_at_one(log_u, near_one, large) if alpha > 1 else near_one(log_u)


def _alpha_u_fprime(log_u, alpha):  # (u^α − u)/(α − 1), in log space for α > 1 and large u
    def near_one(ell):
        return (jnp.expm1(alpha * ell) - jnp.expm1(ell)) / (alpha - 1)

    def large(ell):
        return jnp.exp(alpha * ell + jnp.log(-jnp.expm1((1 - alpha) * ell)) - math.log(alpha - 1))

    return _split_at_one(log_u, near_one, large) if alpha > 1 else near_one(log_u)


def _split_at_one(log_u, near_one, large):
    """``near_one(ℓ)`` for ``ℓ ≤ 1``, ``large(ℓ)`` above, each fed only its own inputs so that
    neither branch's overflow reaches values or gradients of the other (the double-where idiom)."""
    is_large = log_u > 1
    return jnp.where(
        is_large,
        large(jnp.where(is_large, log_u, 2)),
        near_one(jnp.where(is_large, 0, log_u)),
    )


def _alpha_reward(log_u, alpha):  # (u^α − 1)/α
    return jnp.expm1(alpha * log_u) / alpha


def _check_beta(beta) -> float:
    beta = float(beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in the open interval (0, 1), got {beta!r}")
    return beta


def _check_alpha(alpha) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha in (0.0, 1.0):
        raise ValueError(
            f"alpha must be a finite real number other than 0 and 1, got {alpha!r} "
            "(the limits alpha → 1 and alpha → 0 are forward_kl and reverse_kl)"
        )
    return alpha


def _no_params(name: str) -> Callable[..., tuple[float, ...]]:
    def check(**params) -> tuple[float, ...]:
        if params:
            raise ValueError(f"divergence {name!r} takes no parameters, got {sorted(params)}")
        return ()

    return check


def _one_param(name: str, param: str, check: Callable[[float], float], default: float | None):
    def parse(**params) -> tuple[float, ...]:
        unknown = set(params) - {param}
        if unknown:
            raise ValueError(f"divergence {name!r} takes only {param!r}, got {sorted(unknown)}")
        if param not in params and default is None:
            raise ValueError(f"divergence {name!r} needs the parameter {param!r}")
        return (check(params.get(param, default)),)

    return parse


# name -> (parameter parser, f, u f', u f' − f)
_REGISTRY: dict[str, tuple[Callable[..., tuple[float, ...]], ElementwiseFn, ElementwiseFn, ElementwiseFn]] = {
    "reverse_kl": (_no_params("reverse_kl"), _reverse_kl_f, _reverse_kl_u_fprime, _reverse_kl_reward),
    "forward_kl": (_no_params("forward_kl"), _forward_kl_f, _forward_kl_u_fprime, _forward_kl_reward),
    "js": (_no_params("js"), _generalized_js_f, _generalized_js_u_fprime, _generalized_js_reward),
    "generalized_js": (
        _one_param("generalized_js", "beta", _check_beta, None),
        _generalized_js_f,
        _generalized_js_u_fprime,
        _generalized_js_reward,
    ),
    "total_variation": (
        _no_params("total_variation"),
        _total_variation_f,
        _total_variation_u_fprime,
        _total_variation_reward,
    ),
    "squared_hellinger": (
        _no_params("squared_hellinger"),
        _squared_hellinger_f,
        _squared_hellinger_u_fprime,
        _squared_hellinger_reward,
    ),
    "pearson_chi2": (_no_params("pearson_chi2"), _pearson_chi2_f, _pearson_chi2_u_fprime, _pearson_chi2_reward),
    "neyman_chi2": (_no_params("neyman_chi2"), _neyman_chi2_f, _neyman_chi2_u_fprime, _neyman_chi2_reward),
    "alpha": (_one_param("alpha", "alpha", _check_alpha, None), _alpha_f, _alpha_u_fprime, _alpha_reward),
}


def names() -> tuple[str, ...]:
    """The registered generator names, in a fixed order."""
    return tuple(_REGISTRY)


def get(name: str | Divergence, **params) -> Divergence:
    """Look up a built-in generator.

    Args:
      name: one of :func:`names` (``reverse_kl``, ``forward_kl``, ``js``, ``generalized_js``,
        ``total_variation``, ``squared_hellinger``, ``pearson_chi2``, ``neyman_chi2``, ``alpha``),
        or a :class:`Divergence`, returned unchanged.
      **params: ``beta`` in (0, 1) for ``generalized_js``; ``alpha`` ∉ {0, 1} for ``alpha``.

    Returns:
      The :class:`Divergence`. ``js`` is ``generalized_js`` with ``beta = 0.5``.

    Raises:
      ValueError: unknown name (the message lists the valid ones) or a parameter out of range.
    """
    if isinstance(name, Divergence):
        if params:
            raise ValueError("parameters cannot be given together with a Divergence instance")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(_REGISTRY)}")
    parse, f_fn, u_fprime_fn, reward_fn = _REGISTRY[name]
    values = parse(**params)
    if name == "js":
        values = (0.5,)
    return Divergence(name, values, f_fn, u_fprime_fn, reward_fn)


def custom(f: Callable[[Array], Array], name: str = "custom") -> Divergence:
    """A user-defined generator from ``f`` alone.

    ``u f'(u)`` and the OPD+ reward are derived by automatic differentiation, so every estimator in
    the library works with it unchanged.

    Args:
      f: elementwise ``log_u -> f(exp(log_u))``, convex in ``u`` with ``f(1) = 0``.
      name: a label for reports.

    Raises:
      ValueError: ``f(1) ≠ 0`` (checked in float32 at ``log_u = 0``).
    """
    at_one = float(f(jnp.zeros((), jnp.float32)))
    if not abs(at_one) <= 1e-6:
        raise ValueError(f"a generator needs f(1) = 0, but {name!r} gives f(1) = {at_one!r}")
    return Divergence(name, (), f)
