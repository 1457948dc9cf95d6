"""Independent references for the generator table of DESIGN.md §2, written from ``u`` itself.

Nothing here imports ``opd_jax``: these are the closed forms of the table, transcribed from
``u = exp(log_u)``, in numpy (float64) and in ``decimal`` (50 significant digits, no overflow) for
checks at extreme ratios. Used by ``test_divergences.py`` and ``test_advantages.py``.
"""

from __future__ import annotations

import decimal

import numpy as np

# (name, params) of every built-in generator covered by the tests.
GENERATORS = (
    [("reverse_kl", {}), ("forward_kl", {}), ("js", {})]
    + [("generalized_js", {"beta": b}) for b in (0.1, 0.5, 0.9)]
    + [("total_variation", {}), ("squared_hellinger", {}), ("pearson_chi2", {}), ("neyman_chi2", {})]
    + [("alpha", {"alpha": a}) for a in (-1.5, -0.5, 0.5, 2.0, 3.0)]
)


def gen_id(spec) -> str:
    name, params = spec
    return name + "".join(f"({v})" for v in params.values())


def np_closed_form(name: str, params: dict, log_u):
    """``(f(u), u f'(u), −f(u) + u f'(u))`` from the DESIGN.md table, numpy float64."""
    log_u = np.asarray(log_u, np.float64)
    u = np.exp(log_u)
    if name == "reverse_kl":
        f = -np.log(u)
        ufp = -np.ones_like(u)
        adv = np.log(u) - 1
    elif name == "forward_kl":
        f = u * np.log(u)
        ufp = u * np.log(u) + u
        adv = u
    elif name == "js":
        f = 0.5 * (u * np.log(u) - (1 + u) * np.log((1 + u) / 2))
        ufp = 0.5 * u * np.log(2 * u / (1 + u))
        adv = 0.5 * np.log((1 + u) / 2)
    elif name == "generalized_js":
        b = params["beta"]
        m = b * u + 1 - b
        f = b * u * np.log(u) - m * np.log(m)
        ufp = b * u * np.log(u) - b * u * np.log(m)
        adv = (1 - b) * np.log(m)
    elif name == "total_variation":
        f = 0.5 * np.abs(u - 1)
        ufp = 0.5 * u * np.sign(u - 1)
        adv = 0.5 * np.sign(u - 1)
    elif name == "squared_hellinger":
        f = (np.sqrt(u) - 1) ** 2
        ufp = u - np.sqrt(u)
        adv = np.sqrt(u) - 1
    elif name == "pearson_chi2":
        f = (u - 1) ** 2
        ufp = 2 * u * (u - 1)
        adv = u**2 - 1
    elif name == "neyman_chi2":
        f = (1 - u) ** 2 / u
        ufp = u - 1 / u
        adv = 2 - 2 / u
    elif name == "alpha":
        a = params["alpha"]
        f = (u**a - a * u - (1 - a)) / (a * (a - 1))
        ufp = (u**a - u) / (a - 1)
        adv = (u**a - 1) / a
    else:
        raise KeyError(name)
    return f, ufp, adv


_CTX = decimal.Context(prec=50, Emax=10**9, Emin=-(10**9))


def decimal_closed_form(name: str, params: dict, log_u: float):
    """The same table in 50-digit decimal arithmetic (no overflow): ``(f, u f', −f + u f')``.

    ``log_u`` is a float or a ``decimal.Decimal`` (taken exactly)."""
    with decimal.localcontext(_CTX):
        D = decimal.Decimal
        ell = +log_u if isinstance(log_u, D) else D(repr(float(log_u)))
        u = ell.exp()
        one, half = D(1), D("0.5")

        def sign(x):
            return D((x > 0) - (x < 0))

        if name == "reverse_kl":
            f, ufp, adv = -ell, -one, ell - 1
        elif name == "forward_kl":
            f, ufp, adv = u * ell, u * ell + u, u
        elif name in ("js", "generalized_js"):
            b = half if name == "js" else D(repr(params["beta"]))
            m = b * u + 1 - b
            f = b * u * ell - m * m.ln()
            ufp = b * u * ell - b * u * m.ln()
            adv = (1 - b) * m.ln()
        elif name == "total_variation":
            f, ufp, adv = half * abs(u - 1), half * u * sign(u - 1), half * sign(u - 1)
        elif name == "squared_hellinger":
            f, ufp, adv = (u.sqrt() - 1) ** 2, u - u.sqrt(), u.sqrt() - 1
        elif name == "pearson_chi2":
            f, ufp, adv = (u - 1) ** 2, 2 * u * (u - 1), u * u - 1
        elif name == "neyman_chi2":
            f, ufp, adv = (1 - u) ** 2 / u, u - 1 / u, 2 - 2 / u
        elif name == "alpha":
            a = D(repr(params["alpha"]))
            ua = (a * ell).exp()
            f = (ua - a * u - (1 - a)) / (a * (a - 1))
            ufp = (ua - u) / (a - 1)
            adv = (ua - 1) / a
        else:
            raise KeyError(name)
        # The OPD+ column is taken from the table itself, not as ufp − f, which would cancel to
        # nothing at 50 digits when u is astronomically large.
        return f, ufp, adv


def float_class(value: decimal.Decimal, dtype) -> float:
    """``value`` as the nearest ``dtype`` number would be if no intermediate overflowed: ±inf
    beyond the dtype's largest finite value, the (rounded) value otherwise."""
    big = decimal.Decimal(repr(float(np.finfo(dtype).max)))
    if value > big:
        return np.inf
    if value < -big:
        return -np.inf
    return float(value)


def round_to(value: decimal.Decimal, dtype) -> float:
    """``value`` rounded to ``dtype`` (±inf beyond its range, 0 or a subnormal below it), as a
    Python float."""
    value = float_class(value, dtype)
    return float(np.asarray(value, np.float64).astype(dtype))


def decimal_limits(name: str, params: dict):
    """``(f(0), lim_{u→∞} f(u)/u)`` of the table's generators, derived by hand from its formulas
    (``decimal.Decimal('Infinity')`` where infinite). ``p f(q/p)`` tends to ``p f(0)`` as
    ``q → 0`` and to ``q · lim f(u)/u`` as ``p → 0``."""
    with decimal.localcontext(_CTX):
        D = decimal.Decimal
        inf = D("Infinity")
        if name == "reverse_kl":
            return inf, D(0)
        if name == "forward_kl":
            return D(0), inf
        if name in ("js", "generalized_js"):
            b = D("0.5") if name == "js" else D(repr(params["beta"]))
            return -(1 - b) * (1 - b).ln(), -b * b.ln()
        if name == "total_variation":
            return D("0.5"), D("0.5")
        if name == "squared_hellinger":
            return D(1), D(1)
        if name == "pearson_chi2":
            return D(1), inf
        if name == "neyman_chi2":
            return inf, D(1)
        if name == "alpha":
            a = D(repr(params["alpha"]))
            return (1 / a if a > 0 else inf), (1 / (1 - a) if a < 1 else inf)
        raise KeyError(name)


def _decimal_log_softmax(logits):
    """Exact-input log-softmax of a row of floats (``-inf`` allowed) in 50-digit decimal;
    ``None`` for ``-inf`` entries."""
    D = decimal.Decimal
    finite = [D(repr(float(z))) for z in logits if np.isfinite(z)]
    top = max(finite)
    lse = top + sum(((z - top).exp() for z in finite), D(0)).ln()
    return [D(repr(float(z))) - lse if np.isfinite(z) else None for z in logits]


def decimal_full_vocab(name: str, params: dict, student_logits, teacher_logits):
    """``D_f(q ‖ π) = Σ_v π(v) f(q(v)/π(v))`` of one row of logits and its gradient in the student
    logits, in 50-digit decimal, straight from the table (``(f, u f', −f + u f')`` at
    ``ℓ = log q − log π``) with no overflow.

    Zero-probability tokens (``-inf`` logits) use ``0 · f(·) = 0`` and the limits of
    :func:`decimal_limits`. The gradient is ``∂D/∂z_v = w_v − π(v) Σ_w w_w`` with
    ``w_v = ∂[π f(q/π)]/∂log π(v) = −π(v) (u_v f'(u_v) − f(u_v))``; its limits are 0 where
    ``π(v) = 0`` and ``π(v) f(0)`` where ``q(v) = 0``.

    Returns:
      ``(value, gradient, gradient_scale)``: a ``Decimal`` (``Infinity`` if the divergence is
      infinite) and lists of ``Decimal``, ``None`` where the value is infinite.
      ``gradient_scale[v] = |w_v| + π(v) Σ_w |w_w|`` is the size of the terms whose difference is
      the gradient component: rounding them to a float format bounds its attainable accuracy.
    """
    with decimal.localcontext(_CTX):
        D = decimal.Decimal
        f_at_zero, slope_at_infinity = decimal_limits(name, params)
        log_p = _decimal_log_softmax(student_logits)
        log_q = _decimal_log_softmax(teacher_logits)
        terms, weights, probs = [], [], []
        for lp, lq in zip(log_p, log_q):
            p = D(0) if lp is None else lp.exp()
            probs.append(p)
            if lp is None and lq is None:
                terms.append(D(0))
                weights.append(D(0))
            elif lp is None:
                terms.append(lq.exp() * slope_at_infinity)
                weights.append(D(0))
            elif lq is None:
                terms.append(p * f_at_zero)
                weights.append(p * f_at_zero)
            else:
                f, _, reward = decimal_closed_form(name, params, lq - lp)
                terms.append(p * f)
                weights.append(-p * reward)
        value = sum(terms, D(0))
        if not value.is_finite():
            return value, None, None
        total = sum(weights, D(0))
        magnitude = sum((abs(w) for w in weights), D(0))
        gradient = [w - p * total for w, p in zip(weights, probs)]
        return value, gradient, [abs(w) + p * magnitude for w, p in zip(weights, probs)]
