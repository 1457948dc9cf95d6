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

Values are ±inf, never NaN, where the true value overflows. Infinite log-ratios are zero
probabilities and give the limits: ``ℓ = −inf`` (``u = 0``, the teacher gives the token probability
0) gives ``f(0)`` (finite, e.g. 0 for forward KL, ``½ log 2`` for JS, or +inf for reverse KL,
Neyman χ² and alpha with α < 0), ``u f'(u) → 0`` where ``f(0)`` is finite; ``ℓ = +inf`` gives
±inf or a finite limit; NaN only for a NaN input.

:meth:`Divergence.conjugate` gives ``f̃(t) = t f(1/t)`` and :func:`perspective` the per-entry term
``p f(q/p)`` of a full-vocabulary divergence from ``log p`` and ``log q`` (``p f(u)`` where
``u ≤ 1``, ``q f̃(1/u)`` where ``u > 1``, so no generator is ever evaluated at a ratio above 1). Automatic derivatives of ``f`` in
float32 can be NaN where the true derivative overflows (``|ℓ| ≳ 88``); use ``u_fprime``, which is
computed in closed form, or float64 there.

``u f'(u) − f(u)`` is the convex conjugate ``f*`` evaluated at the slope ``f'(u)``; its derivative
in ``u`` is ``u f''(u) ≥ 0``, so the OPD+ reward never decreases as the teacher/student ratio grows.

Reference: Zhao et al., *OPD+: Rethinking the Advantage Design for On-Policy Distillation*,
arXiv 2606.01039 (2026).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from opd_jax.errors import InputError

Array = jax.Array
ElementwiseFn = Callable[..., Array]

__all__ = ["Divergence", "custom", "get", "is_builtin", "names", "perspective", "perspective_gradient", "perspective_terms"]


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

    def conjugate(self) -> Divergence:
        """The conjugate generator ``f̃(t) = t f(1/t)`` (Csiszár's dual): ``D_f̃(q ‖ π) = D_f(π ‖ q)``.

        Every built-in's conjugate is a built-in: ``reverse_kl`` ↔ ``forward_kl``,
        ``generalized_js(β)`` ↔ ``generalized_js(1 − β)``, ``pearson_chi2`` ↔ ``neyman_chi2``,
        ``alpha(α)`` ↔ ``alpha(1 − α)``; ``js``, ``total_variation`` and ``squared_hellinger`` are
        their own. For a custom generator it is ``f̃(s) = e^s f(−s)``, evaluated as written (exact
        where ``f(−s)`` does not overflow).
        """
        return _conjugate(self)

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
# does (values are ±inf, never NaN, where the true value overflows), and so that values near u = 1
# avoid exp − 1 (expm1 instead). js / generalized_js and alpha are differences of O(ℓ) terms for an
# O(ℓ²) value, so near u = 1 they keep absolute, not relative, precision (~1e-16 in float64).
# ---------------------------------------------------------------------------------------------


def _reverse_kl_f(log_u):  # KL(π‖q): f(u) = −log u
    return -log_u


def _reverse_kl_u_fprime(log_u):
    return jnp.full_like(log_u, -1)


def _reverse_kl_reward(log_u):
    return log_u - 1


def _with_limits(log_u, fn, at_minus_inf, at_plus_inf=None):
    """``fn(ℓ)`` for finite ``ℓ``, the given limits at ``ℓ = −inf`` (``u = 0``) and, if set, at
    ``ℓ = +inf``. ``fn`` only sees finite inputs (the double-where idiom), so an ``0 · inf`` inside
    it reaches neither values nor gradients."""
    replace = log_u == -jnp.inf
    if at_plus_inf is not None:
        replace = replace | (log_u == jnp.inf)
    out = fn(jnp.where(replace, 0, log_u))
    out = jnp.where(log_u == -jnp.inf, jnp.asarray(at_minus_inf, out.dtype), out)
    if at_plus_inf is not None:
        out = jnp.where(log_u == jnp.inf, jnp.asarray(at_plus_inf, out.dtype), out)
    return out


def _forward_kl_f(log_u):  # KL(q‖π): f(u) = u log u; 0 at u = 0
    return _with_limits(log_u, lambda ell: jnp.exp(ell) * ell, 0.0)


def _forward_kl_u_fprime(log_u):  # u log u + u; 0 at u = 0
    return _with_limits(log_u, lambda ell: jnp.exp(ell) * (ell + 1), 0.0)


def _forward_kl_reward(log_u):
    return jnp.exp(log_u)


def _near_or_far(log_u, near, far, radius=1.0):
    """``near(ℓ)`` for ``|ℓ| < radius``, ``far(ℓ)`` elsewhere; each branch sees only its own inputs
    (the double-where idiom), so neither's overflow reaches the other's values or gradients."""
    is_near = jnp.abs(log_u) < radius
    return jnp.where(is_near, near(jnp.where(is_near, log_u, 0)), far(jnp.where(is_near, 2 * radius, log_u)))


def _log_mixture(log_u, beta):
    """``log m``, ``m = β u + 1 − β``, without forming ``u``; ``log1p`` near ``u = 1``."""
    return _near_or_far(
        log_u,
        lambda ell: jnp.log1p(beta * jnp.expm1(ell)),
        lambda ell: jnp.logaddexp(math.log(beta) + ell, math.log1p(-beta)),
    )


def _log_u_over_mixture(log_u, beta):
    """``log(u/m)`` = ``−log(β + (1 − β)/u)``, bounded above by ``−log β``; ``log1p`` near ``u = 1``."""
    return _near_or_far(
        log_u,
        lambda ell: -jnp.log1p((1 - beta) * jnp.expm1(-ell)),
        lambda ell: -jnp.logaddexp(math.log(beta), math.log1p(-beta) - ell),
    )


def _expm1_minus_identity(z):
    """``e^z − 1 − z`` with full relative precision for ``|z| ≤ 1`` (Taylor series to z^20 below
    1/2, where ``expm1(z) − z`` would cancel)."""
    series = jnp.zeros_like(z)
    for order in range(20, 1, -1):  # Horner: z²/2! + z³/3! + …
        series = (series + 1 / math.factorial(order)) * (z if order > 2 else 1)
    series = series * jnp.square(z)
    return jnp.where(jnp.abs(z) < 0.5, series, jnp.expm1(z) - z)


def _generalized_js_f(log_u, beta):
    # β u log u − m log m. Far from u = 1 regrouped as β u log(u/m) − (1 − β) log m, so the two
    # terms growing like u log u never get subtracted. Near u = 1 that is a difference of O(ℓ)
    # terms for an O(ℓ²) value, so there it is written as x·log(u/m) − log1p(y) with
    # x = β(u − 1) and y = (1 − β) h(−βℓ) + β h((1 − β)ℓ), h(z) = e^z − 1 − z: the two pieces
    # are O(ℓ²) and of opposite sign with ratio about −2, so nothing cancels.
    def near(ell):
        y = (1 - beta) * _expm1_minus_identity(-beta * ell) + beta * _expm1_minus_identity((1 - beta) * ell)
        return beta * jnp.expm1(ell) * _log_u_over_mixture(ell, beta) - jnp.log1p(y)

    def far(ell):
        return beta * jnp.exp(ell) * _log_u_over_mixture(ell, beta) - (1 - beta) * _log_mixture(ell, beta)

    # f(0) = −(1 − β) log(1 − β); f(∞) = ∞ (the finite branches would give 0 · inf and inf − inf).
    return _with_limits(
        log_u, lambda ell: _near_or_far(ell, near, far), -(1 - beta) * math.log1p(-beta), jnp.inf
    )


def _generalized_js_u_fprime(log_u, beta):
    return _with_limits(log_u, lambda ell: beta * jnp.exp(ell) * _log_u_over_mixture(ell, beta), 0.0)


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
    # (u^α − αu − (1 − α)) / (α(α − 1)) = (expm1(αℓ) − α expm1(ℓ)) / (α(α − 1)) at moderate ℓ. Near
    # u = 1 that difference cancels (an O(ℓ²) value from O(ℓ) terms), so there the Taylor series
    # Σ_{k≥2} (1 + α + … + α^{k−2}) ℓ^k / k! is used: its coefficients are sums, nothing cancels.
    # For α > 0 and large u both expm1 terms overflow (inf − inf), so there the dominant power
    # u^a, a = max(α, 1), is factored out and the rest is taken in log space.
    def series(ell):
        total = jnp.zeros_like(ell)
        for order in range(24, 1, -1):
            coefficient = sum(alpha**j for j in range(order - 1)) / math.factorial(order)
            total = (total + coefficient) * (ell if order > 2 else 1)
        return total * jnp.square(ell)

    def moderate(ell):
        return (jnp.expm1(alpha * ell) - alpha * jnp.expm1(ell)) / (alpha * (alpha - 1))

    def large(ell):
        if alpha > 1:  # u^α (1 − α u^{1−α} − (1 − α) u^{−α}) / (α(α − 1))
            rest = (alpha - 1) * jnp.expm1(-alpha * ell) - alpha * jnp.expm1((1 - alpha) * ell)
            return jnp.exp(alpha * ell + jnp.log(rest) - math.log(alpha * (alpha - 1)))
        # 0 < α < 1: u (α − u^{α−1} + (1 − α) u^{−1}) / (α(1 − α))
        rest = (1 - alpha) * jnp.expm1(-ell) - jnp.expm1((alpha - 1) * ell)
        return jnp.exp(ell + jnp.log(rest) - math.log(alpha * (1 - alpha)))

    radius = 0.5 / max(abs(alpha), 1.0)
    return _near_or_far(log_u, series, lambda ell: _split_large(ell, alpha, moderate, large), radius)


def _alpha_u_fprime(log_u, alpha):
    # (u^α − u)/(α − 1) = u·expm1((α − 1)ℓ)/(α − 1) = −u^α·expm1((1 − α)ℓ)/(α − 1): the first form
    # where (α − 1)ℓ ≤ 0, the second elsewhere, so the expm1 factor always lies in (−1, 0] and the
    # result has full relative precision with no inf − inf or 0 · inf anywhere.
    first_form = (alpha - 1) * log_u <= 0
    ell_first = jnp.where(first_form, log_u, 0)
    ell_second = jnp.where(first_form, 0, log_u)
    return jnp.where(
        first_form,
        jnp.exp(ell_first) * jnp.expm1((alpha - 1) * ell_first),
        -jnp.exp(alpha * ell_second) * jnp.expm1((1 - alpha) * ell_second),
    ) / (alpha - 1)


def _split_large(log_u, alpha, moderate, large):
    """``moderate(ℓ)`` up to ``ℓ = 20 / max(α, 1)`` (where ``u^max(α,1) = e^20`` is still far from
    overflow), ``large(ℓ)`` above; each branch only sees its own inputs, so neither's overflow
    reaches the other's values or gradients (the double-where idiom). For α < 0 nothing overflows
    at large ``u`` and ``moderate`` is used throughout."""
    if alpha < 0:
        return moderate(log_u)
    threshold = 20.0 / max(alpha, 1.0)
    is_large = log_u > threshold
    return jnp.where(
        is_large,
        large(jnp.where(is_large, log_u, 2 * threshold)),
        moderate(jnp.where(is_large, 0, log_u)),
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

    >>> import jax.numpy as jnp
    >>> kl = get("forward_kl")  # f(u) = u log u, evaluated from log u
    >>> [round(float(v), 4) for v in kl.f(jnp.log(jnp.array([0.5, 1.0, 2.0])))]
    [-0.3466, 0.0, 1.3863]
    >>> [round(float(v), 4) for v in kl.opd_plus_reward(jnp.log(jnp.array([0.5, 2.0])))]  # u f'(u) − f(u) = u
    [0.5, 2.0]
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
    """A user-defined generator from ``f`` alone, **written in ℓ = log u** (not in u).

    ``u f'(u)`` and the OPD+ reward are derived by automatic differentiation, so every estimator in
    the library works with it unchanged. Like the built-ins, ``f`` takes the log-ratio ℓ, because
    that is what the library holds (it never forms ``u = q/π``, which overflows in float32 at
    ℓ ≈ 88 and loses ``u − 1`` to cancellation near ``u = 1``). A function of ``u`` is not accepted:
    composing it with ``exp`` would be exactly that loss. Write it in ℓ with ``u = exp(ℓ)``,
    ``u − 1 = expm1(ℓ)`` and ``log u = ℓ``:

    >>> import jax.numpy as jnp
    >>> pearson = custom(lambda log_u: jnp.expm1(log_u) ** 2, name="my_pearson")   # f(u) = (u − 1)²
    >>> round(float(pearson.f(jnp.log(3.0))), 6)
    4.0

    Args:
      f: elementwise ``log_u -> f(exp(log_u))``, convex in ``u`` with ``f(1) = 0``.
      name: a label for reports.

    Raises:
      InputError: ``f(1) ≠ 0`` (checked in float32 at ``log_u = 0``); when ``f`` looks written in ``u``
        (it vanishes at 1 instead of 0), the message says so and shows the form in ℓ.
    """
    at_one = float(f(jnp.zeros((), jnp.float32)))
    if not abs(at_one) <= 1e-6:
        try:
            written_in_u = abs(float(f(jnp.ones((), jnp.float32)))) <= 1e-6
        except Exception:  # noqa: BLE001 - a probe of the user's function; the error below stands anyway
            written_in_u = False
        hint = (f"; {name!r} vanishes at 1, so it looks written in u" if written_in_u else "")
        raise InputError(
            f"custom generators take ℓ = log u, not u: f(ℓ) must give f(u) at u = exp(ℓ), so f(ℓ = 0) is "
            f"f(u = 1) and must be 0, but {name!r} gives {at_one!r}{hint}. Write it in ℓ: u = jnp.exp(log_u), "
            "u - 1 = jnp.expm1(log_u), log u = log_u; e.g. f(u) = (u - 1)**2 is "
            "custom(lambda log_u: jnp.expm1(log_u) ** 2)"
        )
    return Divergence(name, (), f)


# ---------------------------------------------------------------------------------------------
# Conjugates and the perspective p f(q/p), the per-entry term of a full-vocabulary divergence.
# ---------------------------------------------------------------------------------------------

# name -> params -> (name, params) of the conjugate t f(1/t)
_CONJUGATES: dict[str, Callable[..., tuple[str, dict]]] = {
    "reverse_kl": lambda: ("forward_kl", {}),
    "forward_kl": lambda: ("reverse_kl", {}),
    "js": lambda beta: ("js", {}),
    "generalized_js": lambda beta: ("generalized_js", {"beta": 1.0 - beta}),
    "total_variation": lambda: ("total_variation", {}),
    "squared_hellinger": lambda: ("squared_hellinger", {}),
    "pearson_chi2": lambda: ("neyman_chi2", {}),
    "neyman_chi2": lambda: ("pearson_chi2", {}),
    "alpha": lambda alpha: ("alpha", {"alpha": 1.0 - alpha}),
}


def is_builtin(divergence: Divergence) -> bool:
    """Whether ``divergence`` is one of the registry's generators (not :func:`custom`)."""
    entry = _REGISTRY.get(divergence.name)
    return entry is not None and entry[1] is divergence.f_fn


@functools.lru_cache(maxsize=None)
def _conjugate(divergence: Divergence) -> Divergence:
    # Cached so that a custom generator's conjugate is one object (a stable jit static argument).
    if is_builtin(divergence):
        name, params = _CONJUGATES[divergence.name](*divergence.params)
        return get(name, **params)
    f_fn, params = divergence.f_fn, divergence.params
    return Divergence(f"conjugate({divergence.name})", (), lambda s: jnp.exp(s) * f_fn(-s, *params))


def _power_growth(divergence: Divergence) -> tuple[float, float] | None:
    """``(a, c)`` when ``f = c · f_a`` with ``f_a`` the alpha generator and ``a < 0``: the built-ins
    whose ``f(t)`` grows like ``t^a`` as ``t → 0`` (``neyman_chi2 = 2 · alpha(−1)``, ``alpha``
    with ``α < 0``); ``None`` for every other generator (bounded or logarithmic at ``t → 0``)."""
    if not is_builtin(divergence):
        return None
    if divergence.name == "neyman_chi2":
        return -1.0, 2.0
    if divergence.name == "alpha" and divergence.params[0] < 0:
        return divergence.params[0], 1.0
    return None


# Where a·log t exceeds this, the growing generators are evaluated as t^a times a mantissa of
# order one; below it t^a ≤ e^5 cannot push a product out of range by much.
_GROWTH_SWITCH = 5.0


def _times_generator(log_scale, log_t, divergence: Divergence):
    """``e^{log_scale} · (f, u f', u f' − f)(t)`` of ``divergence`` at ``t = e^{log_t} ≤ 1``.

    ``log_t`` may be ``−inf`` (``t = 0``: the limits). For the generators that grow like ``t^a``
    (:func:`_power_growth`) the product is formed in log space, ``exp(log_scale + a log t +
    log|mantissa|)``, so it is finite wherever the true product is, even where ``t^a`` alone
    overflows.
    """
    def times_scale(value):
        # log_scale is finite, so the scale is > 0 even where exp underflows: ±inf stays ±inf
        # (p f(0) = +inf for reverse KL at p = e^{-300}), never 0 · inf.
        is_inf = jnp.isinf(value)
        return jnp.where(is_inf, value, jnp.exp(log_scale) * jnp.where(is_inf, 0, value))

    growth = _power_growth(divergence)
    if growth is None:
        return (
            times_scale(divergence.f(log_t)),
            times_scale(divergence.u_fprime(log_t)),
            times_scale(divergence.opd_plus_reward(log_t)),
        )
    a, c = growth
    is_large = a * log_t > _GROWTH_SWITCH
    t_plain = jnp.where(is_large, 0, log_t)
    plain = (
        times_scale(divergence.f(t_plain)),
        times_scale(divergence.u_fprime(t_plain)),
        times_scale(divergence.opd_plus_reward(t_plain)),
    )
    s = jnp.where(is_large, log_t, 2 * _GROWTH_SWITCH / a)  # each branch sees only its own inputs
    # f_a / t^a, (u f_a') / t^a, (u f_a' − f_a) / t^a; every exp below is ≤ e^{−5}.
    mantissas = (
        c * (1 - a * jnp.exp((1 - a) * s) - (1 - a) * jnp.exp(-a * s)) / (a * (a - 1)),
        c * -jnp.expm1((1 - a) * s) / (a - 1),
        c * -jnp.expm1(-a * s) / a,
    )
    log_growth = jnp.where(is_large, log_scale, 0) + a * s
    return tuple(
        jnp.where(is_large, jnp.sign(m) * jnp.exp(log_growth + jnp.log(jnp.abs(m))), value)
        for m, value in zip(mantissas, plain)
    )


def perspective(divergence: str | Divergence, log_p: Array, log_q: Array) -> tuple[Array, Array]:
    """The per-entry term ``p f(q/p)`` of ``D_f(q ‖ π) = Σ_v π(v) f(q(v)/π(v))`` and its derivative
    in ``log p``, from log-probabilities, finite wherever the true values are.

    With ``ℓ = log q − log p``: where ``u ≤ 1`` the term is ``p f(u)``; where ``u > 1`` it is
    ``q f̃(1/u)`` with ``f̃`` the :meth:`Divergence.conjugate`, so ``f`` and ``f̃`` are only ever
    evaluated at ratios in ``[0, 1]``, from ``−|ℓ|``, multiplied by the larger probability; no
    ratio of probabilities is formed. The derivative ``∂/∂log p [p f(q/p)] = p (f(u) − u f'(u))``
    gets the same treatment: ``−p (u f'(u) − f(u))`` where ``u ≤ 1`` and ``q · t f̃'(t)`` at
    ``t = 1/u`` where ``u > 1``. ``js`` and ``generalized_js`` use a closed form of the same
    construction (see :func:`perspective_terms`): near ``u = 1`` they scale by whichever
    probability gives the smaller cancellation, and they cost a few transcendental functions per
    entry instead of three generator evaluations for ``f`` and three for ``f̃``.

    Conventions at zero probabilities (``−inf`` log-probabilities): ``p = q = 0`` gives term 0 and
    derivative 0 (``0 · f(·) = 0``); ``p = 0 < q`` gives ``q · f̃(0) = q · lim_{u→∞} f(u)/u``, which
    is ``+inf`` for ``forward_kl``, ``pearson_chi2`` and ``alpha`` with ``α > 1``; ``q = 0 < p``
    gives ``p f(0)``, ``+inf`` for ``reverse_kl``, ``neyman_chi2`` and ``alpha`` with ``α < 0``.
    Never NaN for the built-in generators (a custom generator's conjugate is evaluated as written).

    Args:
      divergence: a name or a ``Divergence``.
      log_p: float array, the student's log-probabilities ``log π(v)`` (``≤ 0``, may be ``−inf``).
      log_q: float array of the same shape, the teacher's ``log q(v)``.

    Returns:
      ``(term, d_term_d_log_p)``, arrays of the shape and dtype of ``log_p``.
    """
    term, d_term, _ = perspective_terms(divergence, log_p, log_q)
    return term, d_term


def _perspective_general(divergence: Divergence, log_p: Array, log_q: Array) -> tuple[Array, Array]:
    conjugate = divergence.conjugate()
    both_zero = (log_p == -jnp.inf) & (log_q == -jnp.inf)
    log_p = jnp.where(both_zero, 0, log_p)
    log_q = jnp.where(both_zero, 0, log_q)
    above_one = log_q > log_p  # u > 1: the conjugate branch
    log_larger = jnp.maximum(log_p, log_q)
    log_t = jnp.minimum(log_p, log_q) - log_larger  # −|ℓ| ∈ [−inf, 0]
    f_below, ufp_below, reward_below = _times_generator(log_larger, log_t, divergence)
    f_above, ufp_above, _ = _times_generator(log_larger, log_t, conjugate)
    term = jnp.where(above_one, f_above, f_below)
    d_term = jnp.where(above_one, ufp_above, -reward_below)
    zero = jnp.zeros((), term.dtype)
    return jnp.where(both_zero, zero, term), jnp.where(both_zero, zero, d_term)


# ---------------------------------------------------------------------------------------------
# The perspective of generalized JS in closed form. The full-vocabulary loss evaluates it at every
# entry of a [B·T, V] array, so its cost is the loss's cost: a few transcendental functions per
# entry (where the general route evaluates f, u f' and the reward of f and of its conjugate), and
# each of them used once, so that XLA fuses the entry's arithmetic into one kernel. With
# φ(x) = x log x − x + 1 (≥ 0, φ(1) = φ'(1) = 0), f_b(x) = b φ(x) − φ(b x + 1 − b): the linear
# parts cancel exactly, so the term is a difference of two non-negative values whose ratio is at
# most 1 (Jensen) and tends to b near x = 1.
# ---------------------------------------------------------------------------------------------


def _series_terms(dtype) -> int:
    """Taylor terms that reach the dtype's precision at |z| ≤ 1 (the near-u = 1 series below)."""
    return 19 if jnp.finfo(dtype).bits > 32 else 11


def zeros_from(x: Array) -> Array:
    """Zeros of ``x``'s shape and dtype, computed from ``x`` (never NaN or inf).

    For full-size constants inside the body of a loop over chunks (``jnp.where(c, a, 0)``,
    ``zeros_like``, an ``iota``): when JAX linearises a ``scan``, it hoists every value of its body
    that depends on constants only out of the loop, where it is materialised at full size (one
    ``[chunk, V]`` temporary per such constant). A zero taken from the data is not hoisted, and
    constants written as ``zeros + c`` then stay inside the loop's fused kernels.
    """
    first = jax.lax.stop_gradient(x.reshape(-1)[0])
    zero = jnp.where(first == first, 0, 0).astype(x.dtype)  # 0 for any first entry, NaN included
    return jax.lax.broadcast(zero, x.shape)


def _phi_of_exp(z, x, zeros, terms: int):
    """``φ(e^z) = z e^z − e^z + 1`` given ``x = e^z`` and finite ``z``: the series
    ``Σ_{k≥2} (k − 1) z^k / k!`` for ``|z| < 1`` (where the closed form cancels), ``1 + x (z − 1)``
    elsewhere (for ``z ≤ −1`` there ``|x (z − 1)| ≤ 0.74``: no cancellation beyond a factor 4)."""
    near = jnp.abs(z) < 1
    zn = jnp.where(near, z, zeros)
    series = terms / math.factorial(terms + 1) * zn
    for k in range(terms, 2, -1):
        series = (series + (k - 1) / math.factorial(k)) * zn
    series = (series + 0.5) * zn * zn
    return jnp.where(near, series, 1 + x * (z - 1))


def _generalized_js_parts(log_p, log_q, beta: float):
    """The shared pieces of generalized JS's perspective: ``(conjugate, z, b, e, log_mixture, r, zeros)``.

    Scaled by the larger probability as :func:`perspective` is (``p f_β(t)``, ``t = q/p ≤ 1``, or
    ``q f_{1−β}(t)``, ``t = p/q ≤ 1``, the conjugate), except near ``u = 1`` (``|ℓ| < 1``), where
    either is free of overflow and the one whose mixture weight ``b`` (``β``, or ``1 − β`` for the
    conjugate) is at most ½ is used: there ``b φ(t) − φ(m̃)`` loses at most a factor 2.5 to
    cancellation. ``z = log t`` (``−inf`` where ``t = 0``), ``e = t − 1``, ``log_mixture = log m̃``
    with ``m̃ = b t + 1 − b`` (the mixture ``m = β q + (1 − β) p`` over the scaling probability), and
    ``r = (1 − β) log(p/m)``, finite everywhere: the derivative ``∂/∂log p [p f_β(q/p)]`` is
    ``p r``. Entries with ``p = q = 0`` are given ``ℓ = 0`` (their term and ``r`` are then 0).
    """
    zeros = zeros_from(log_p)
    both_zero = (log_p == -jnp.inf) & (log_q == -jnp.inf)
    ell = jnp.where(both_zero, zeros, log_q - log_p)  # ±inf where one probability is 0
    if beta > 0.5:  # near u = 1 the conjugate (weight 1 − β < ½), else by the sign of ℓ
        conjugate = (jnp.abs(ell) < 1) | (ell > 0)
    else:
        conjugate = ell >= 1
    z = jnp.where(conjugate, -ell, ell)  # ≤ 0, or |z| < 1 near u = 1
    b = beta + (1 - 2 * beta) * conjugate.astype(log_p.dtype)
    e = jnp.expm1(z)
    log_mixture = jnp.log1p(b * e)  # ∈ [log(1 − b), log(1 + 1.72 b)]
    # log(p/m) = −log m̃ when p scales; log t − log m̃ when q does (t = p/q; −1 stands in for
    # log 0, as then p = 0 and the derivative p r is 0 whatever r is).
    r = (1 - beta) * (jnp.where(conjugate, jnp.where(z == -jnp.inf, zeros - 1, z), zeros) - log_mixture)
    return conjugate, z, b, e, log_mixture, r, zeros


def _generalized_js_term(log_p, log_q, beta: float, parts):
    """``p f_β(q/p)`` from :func:`_generalized_js_parts`: ``scale · (b φ(t) − φ(m̃))``."""
    terms = _series_terms(log_p.dtype)
    conjugate, z, b, e, log_mixture, _, zeros = parts
    log_scale = jnp.where(conjugate, log_q, log_p)
    scale = jnp.exp(jnp.where(log_scale == -jnp.inf, zeros, log_scale))  # both −inf: ℓ = 0, the term is 0
    finite_z = jnp.where(z == -jnp.inf, zeros - 1, z)  # t = 0: x = 1 + e = 0 gives φ(0) = 1
    phi_t = _phi_of_exp(finite_z, 1 + e, zeros, terms)
    return scale * (b * phi_t - _phi_of_exp(log_mixture, 1 + b * e, zeros, terms))


def perspective_terms(divergence: str | Divergence, log_p: Array, log_q: Array, *, with_term: bool = True):
    """:func:`perspective` and the student probability: ``(term, d_term_d_log_p, p)``, ``p = e^{log p}``.

    The full-vocabulary loss needs all three at every entry. For generalized JS (and ``js``) they
    come from one closed form (four transcendental functions per entry). ``with_term=False``
    returns ``None`` for the term.
    """
    divergence = get(divergence)
    log_p, log_q = _as_float(log_p), _as_float(log_q)
    p = jnp.exp(log_p)
    if _is_generalized_js(divergence):
        beta = divergence.params[0]
        parts = _generalized_js_parts(log_p, log_q, beta)
        term = _generalized_js_term(log_p, log_q, beta, parts) if with_term else None
        return term, p * parts[5], p
    term, d_term = _perspective_general(divergence, log_p, log_q)
    return (term if with_term else None), d_term, p


def perspective_gradient(divergence: str | Divergence, log_p: Array, log_q: Array, a: Array, b: Array) -> Array:
    """``a · ∂/∂log p [p f(q/p)] − b · p`` per entry, from log-probabilities.

    The gradient of ``Σ_v p_v f(q_v/p_v)`` in the logits is of this form (``a``, ``b`` constant
    along a row); for generalized JS it is ``p (r a − b)`` (three transcendental functions per
    entry, each used once). ``a`` and ``b`` broadcast against ``log_p``.
    """
    divergence = get(divergence)
    log_p, log_q = _as_float(log_p), _as_float(log_q)
    if _is_generalized_js(divergence):
        r = _generalized_js_parts(log_p, log_q, divergence.params[0])[5]
        return jnp.exp(log_p) * (r * a - b)
    _, d_term = _perspective_general(divergence, log_p, log_q)
    return d_term * a - jnp.exp(log_p) * b


def _is_generalized_js(divergence: Divergence) -> bool:
    return is_builtin(divergence) and divergence.name in ("js", "generalized_js")
