"""Exact float64 bias of the one-step-stale (pipelined-rollout) estimators, by enumeration.

The rollouts of step k were sampled from ``θ_old`` (the previous parameters) while the update is at
``θ``. ``prepare`` scores them with ``θ_old``: behaviour log-probs ``log π_old(y_n|s_n)`` and OPD+
advantages from ``ℓ_n = log q − log π_old``. Estimators of ``∇J(θ)`` compared here, each as its
expected gradient ``Σ_y π_old(y) ∇_θ L(y; θ, π_old)`` (:func:`opd_jax.exact.off_policy_expected_gradient`):

* ``no_correction``: ``pg_surrogate(log π_θ, A_old)``, the stale rollouts treated as on-policy;
* ``token_ratio``: the loop's estimator without clip, ``−Σ_n m_n ρ_n A_old,n``,
  ``ρ_n = π_θ(y_n|s_n)/π_old(y_n|s_n)``;
* ``token_ratio_clip``: the loop's estimator as it runs, ``importance_surrogate(log π_θ, log π_old,
  A_old, mask, clip_epsilon=0.2)``;
* ``token_ratio_fresh_A``: per-token ratio with the advantages recomputed at ``θ`` (scoring twice);
* ``sequence_ratio``: ``sg(π_θ(y)/π_old(y)) · pg_surrogate(log π_θ, A_θ)``, unbiased by construction
  (the check that the machinery is right).

Targets: ``∇J_tok`` for token-level OPD+ with γ = 1 and ``∇J_seq`` for sequence-level OPD+, both
unbiased on-policy. Staleness: ``θ_old = θ − ε·d`` (``d`` a fixed random unit direction, Frobenius
norm over the whole tabular student), and the one-step case ``θ = θ_old − η ∇J(θ_old)`` (``θ`` is
one plain gradient step from the parameters that sampled).

Usage: JAX_PLATFORMS=cpu .venv/bin/python experiments/stale_bias.py [--output experiments/results/stale_bias]
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import divergences as divergences_lib
from opd_jax import exact
from opd_jax.advantages import sequence_advantages, token_advantages
from opd_jax.objectives import clipped_token_mask, importance_surrogate, pg_surrogate

jax.config.update("jax_enable_x64", True)

ESTIMATORS = ("no_correction", "token_ratio", "token_ratio_clip", "token_ratio_fresh_A", "sequence_ratio")
DIVERGENCES = (("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("squared_hellinger", {}), ("alpha", {"alpha": 0.5}))
EPSILONS = (0.0, 1e-3, 1e-2, 1e-1, 0.3, 1.0)
ETAS = (0.1, 0.3, 1.0)
SEEDS = (0, 1, 2)
VOCAB, HORIZON = 3, 3
CLIP_EPSILON = 0.2
# The slope of log(error) against log(ε) is fitted where the bias is in its asymptotic regime.
SLOPE_EPSILONS = (1e-3, 1e-2, 1e-1)


def advantages_of(logp_NxT, teacher_logp_NxT, mask_NxT, *, divergence, level):
    """OPD+ advantages (token level with γ = 1, or sequence level) from the given student log-probs."""
    if level == "token":
        return token_advantages(logp_NxT, teacher_logp_NxT, mask_NxT, divergence=divergence, estimator="opd_plus",
                                gamma=1.0)
    return sequence_advantages(logp_NxT, teacher_logp_NxT, mask_NxT, divergence=divergence, estimator="opd_plus")


def estimator_loss(name, teacher_logp_NxT, *, divergence, level):
    """``loss_fn(student_logits, student_logp, behaviour_logp, mask) -> [N]`` of one estimator."""
    advantages = functools.partial(advantages_of, teacher_logp_NxT=teacher_logp_NxT, divergence=divergence,
                                   level=level)

    def per_token_ratio(student_logp, behaviour_logp, mask):
        return jnp.where(mask, jnp.exp(student_logp - jax.lax.stop_gradient(behaviour_logp)), 0)

    def loss_fn(student_logits, student_logp, behaviour_logp, mask):
        del student_logits
        if name == "no_correction":
            return pg_surrogate(student_logp, advantages(behaviour_logp, mask_NxT=mask), mask)
        if name == "token_ratio_clip":
            return importance_surrogate(student_logp, behaviour_logp, advantages(behaviour_logp, mask_NxT=mask), mask,
                                        clip_epsilon=CLIP_EPSILON)
        if name in ("token_ratio", "token_ratio_fresh_A"):
            logp_for_a = behaviour_logp if name == "token_ratio" else student_logp
            a = jax.lax.stop_gradient(advantages(logp_for_a, mask_NxT=mask))
            a = jnp.broadcast_to(a[:, None], mask.shape) if a.ndim == 1 else a
            return -jnp.sum(jnp.where(mask, per_token_ratio(student_logp, behaviour_logp, mask) * a, 0), axis=-1)
        if name == "sequence_ratio":
            log_ratio = exact.response_log_probs(student_logp - behaviour_logp, mask)
            weight = jax.lax.stop_gradient(jnp.exp(log_ratio))
            return weight * pg_surrogate(student_logp, advantages(student_logp, mask_NxT=mask), mask)
        raise ValueError(f"unknown estimator {name!r}")

    return loss_fn


def gradients(table, behaviour_table, teacher_logits, space, *, divergence, level):
    """Exact ``∇J(θ)``, every estimator's expected gradient, and staleness diagnostics, at one ``(θ, θ_old)``.

    Returns:
      ``(exact_grad, {estimator: grad}, old_exact_grad, diagnostics)``; grads shaped like ``table``;
      diagnostics: ``max_abs_log_ratio`` over response tokens and ``clipped_fraction``, the
      ``π_old``-expected fraction of response tokens whose gradient the clip zeroes.
    """
    logits_fn = functools.partial(exact.tabular_logits, space=space)
    objective_level = "token" if level == "token" else "sequence"
    exact_grad = exact.objective_gradient(logits_fn, table, teacher_logits, space, divergence=divergence,
                                          level=objective_level)
    old_exact_grad = exact.objective_gradient(logits_fn, behaviour_table, teacher_logits, space,
                                              divergence=divergence, level=objective_level)
    teacher_logp = exact.sampled_log_probs(teacher_logits, space.tokens)
    estimates = {
        name: exact.off_policy_expected_gradient(
            logits_fn, table, behaviour_table, space,
            estimator_loss(name, teacher_logp, divergence=divergence, level=level),
        )
        for name in ESTIMATORS
    }
    mask = jnp.asarray(space.mask)
    logp = exact.sampled_log_probs(logits_fn(table), space.tokens)
    behaviour_logp = exact.sampled_log_probs(logits_fn(behaviour_table), space.tokens)
    weights = jnp.exp(exact.response_log_probs(behaviour_logp, mask))
    a_old = advantages_of(behaviour_logp, teacher_logp, mask, divergence=divergence, level=level)
    clipped = clipped_token_mask(logp, behaviour_logp, a_old, mask, clip_epsilon=CLIP_EPSILON)
    diagnostics = {
        "max_abs_log_ratio": jnp.max(jnp.where(mask, jnp.abs(logp - behaviour_logp), 0)),
        "clipped_fraction": jnp.sum(weights * jnp.sum(clipped, -1)) / jnp.sum(weights * jnp.sum(mask, -1)),
    }
    return exact_grad, estimates, old_exact_grad, diagnostics


def _compare(estimate, target):
    """``(‖g − g*‖/‖g*‖, cos)`` per leading (batch) index."""
    g, g_star = estimate.reshape(estimate.shape[0], -1), target.reshape(target.shape[0], -1)
    norm_star = np.linalg.norm(g_star, axis=-1)
    error = np.linalg.norm(g - g_star, axis=-1) / norm_star
    cosine = np.sum(g * g_star, -1) / (np.linalg.norm(g, axis=-1) * norm_star)
    return error, cosine


def _problems(eos, seeds):
    problems = [exact.random_tabular_problem(seed, VOCAB, HORIZON, VOCAB - 1 if eos else None) for seed in seeds]
    space = problems[0][0]
    tables = jnp.stack([table for _, table, _ in problems])
    teachers = jnp.stack([teacher for _, _, teacher in problems])
    directions = jnp.stack([jax.random.normal(jax.random.key(1000 + seed), tables.shape[1:], jnp.float64)
                            for seed in seeds])
    directions = directions / jnp.linalg.norm(directions.reshape(len(seeds), -1), axis=-1)[:, None, None]
    return space, tables, teachers, directions


def measure(divergence_name, params, *, level, eos, seeds=SEEDS, epsilons=EPSILONS, etas=ETAS):
    """All estimators at every staleness, over ``seeds``.

    Returns a dict with, per estimator, ``error`` / ``cosine`` arrays ``[len(seeds), len(epsilons)]``
    (direction sweep, ``θ`` fixed) and ``step_error`` / ``step_cosine`` ``[len(seeds), len(etas)]``
    (one gradient step, ``θ_old`` fixed), ``gradient`` / ``step_gradient`` the expected gradients
    ``[len(seeds), len(epsilons or etas), num_states, V]``; ``drift`` / ``step_drift``: ``‖∇J(θ_old) − ∇J(θ)‖/‖∇J(θ)‖``;
    ``max_abs_log_ratio``, ``clipped_fraction`` and ``step_norm`` (``‖θ − θ_old‖``) likewise.
    """
    divergence = divergences_lib.get(divergence_name, **params)
    space, tables, teachers, directions = _problems(eos, seeds)
    run = functools.partial(gradients, space=space, divergence=divergence, level=level)
    objective_level = "token" if level == "token" else "sequence"
    logits_fn = functools.partial(exact.tabular_logits, space=space)

    @jax.jit
    def sweep(table, teacher, direction, eps_E, eta_H):
        direction_run = jax.vmap(lambda eps: run(table, table - eps * direction, teacher))(eps_E)
        grad_old = exact.objective_gradient(logits_fn, table, teacher, space, divergence=divergence,
                                            level=objective_level)
        # One plain gradient step: the rollout was sampled at θ_old = table, the update is at θ.
        step_run = jax.vmap(lambda eta: run(table - eta * grad_old, table, teacher))(eta_H)
        step_norm = eta_H * jnp.linalg.norm(grad_old)
        return direction_run, step_run, step_norm

    eps_E, eta_H = jnp.asarray(epsilons, jnp.float64), jnp.asarray(etas, jnp.float64)
    per_seed = [sweep(tables[i], teachers[i], directions[i], eps_E, eta_H) for i in range(len(seeds))]
    result = {name: {} for name in ESTIMATORS}
    for prefix, index in (("", 0), ("step_", 1)):
        for name in ESTIMATORS:
            rows = [_compare(np.asarray(s[index][1][name]), np.asarray(s[index][0])) for s in per_seed]
            result[name][prefix + "error"] = np.stack([r[0] for r in rows])
            result[name][prefix + "cosine"] = np.stack([r[1] for r in rows])
            result[name][prefix + "gradient"] = np.stack([np.asarray(s[index][1][name]) for s in per_seed])
        result[prefix + "drift"] = np.stack([_compare(np.asarray(s[index][2]), np.asarray(s[index][0]))[0]
                                             for s in per_seed])
        for key in ("max_abs_log_ratio", "clipped_fraction"):
            result[prefix + key] = np.stack([np.asarray(s[index][3][key]) for s in per_seed])
    result["step_norm"] = np.stack([np.asarray(s[2]) for s in per_seed])
    return result


def fitted_slope(epsilons, errors):
    """Least-squares slope of ``log error`` against ``log ε`` (errors ``[..., len(epsilons)]``)."""
    x = np.log(np.asarray(epsilons))
    y = np.log(np.asarray(errors))
    x = x - x.mean()
    return np.sum(x * (y - y.mean(axis=-1, keepdims=True)), axis=-1) / np.sum(x * x)


def _label(name, params):
    return exact.divergence_label(name, params)


def run_all(seeds=SEEDS, progress=print):
    """Every divergence × level × EOS; a JSON-able dict of results."""
    records = []
    slope_index = [EPSILONS.index(e) for e in SLOPE_EPSILONS]
    for level in ("token", "sequence"):
        for eos in (False, True):
            for name, params in DIVERGENCES:
                result = measure(name, params, level=level, eos=eos, seeds=seeds)
                record = {
                    "divergence": _label(name, params), "level": level, "eos": eos,
                    "drift": result["drift"].max(0).tolist(), "step_drift": result["step_drift"].max(0).tolist(),
                    "max_abs_log_ratio": result["max_abs_log_ratio"].max(0).tolist(),
                    "clipped_fraction": result["clipped_fraction"].max(0).tolist(),
                    "step_max_abs_log_ratio": result["step_max_abs_log_ratio"].max(0).tolist(),
                    "step_clipped_fraction": result["step_clipped_fraction"].max(0).tolist(),
                    "step_norm": result["step_norm"].max(0).tolist(),
                    "estimators": {},
                }
                for estimator in ESTIMATORS:
                    r = result[estimator]
                    slopes = fitted_slope(SLOPE_EPSILONS, r["error"][:, slope_index]) if estimator != "sequence_ratio" \
                        else np.full(len(seeds), math.nan)
                    record["estimators"][estimator] = {
                        "error_max": r["error"].max(0).tolist(), "cosine_min": r["cosine"].min(0).tolist(),
                        "step_error_max": r["step_error"].max(0).tolist(),
                        "step_cosine_min": r["step_cosine"].min(0).tolist(),
                        "slope_min": float(np.min(slopes)), "slope_max": float(np.max(slopes)),
                    }
                records.append(record)
                if progress:
                    progress(f"{level} eos={eos} {record['divergence']} done")
    return {"seeds": list(seeds), "vocab": VOCAB, "horizon": HORIZON, "epsilons": list(EPSILONS),
            "etas": list(ETAS), "slope_epsilons": list(SLOPE_EPSILONS), "clip_epsilon": CLIP_EPSILON,
            "records": records}


SHORT = {"no_correction": "1 no correction", "token_ratio": "2 token ρ, A_old", "token_ratio_clip": "2c token ρ clip 0.2, A_old",
         "token_ratio_fresh_A": "3 token ρ, A_θ", "sequence_ratio": "4 sequence ρ, A_θ"}


def summary_markdown(results, *, epsilon=0.1, etas=(0.1, 0.3)):
    """The compact tables of docs/overlap.md: every case at one ε, and the one-step case at ``etas``."""
    eps_index = results["epsilons"].index(epsilon)
    columns = ("no_correction", "token_ratio", "token_ratio_fresh_A", "sequence_ratio")
    lines = [
        f"Relative error ‖E[ĝ] − ∇J(θ)‖/‖∇J(θ)‖ at θ_old = θ − {epsilon:g}·d (max over seeds {results['seeds']}); "
        f"order: slope of log error vs log ε over ε ∈ {results['slope_epsilons']}, min–max over estimators 1–3 "
        "and seeds (exact-zero errors left out); drift: ‖∇J(θ_old) − ∇J(θ)‖/‖∇J(θ)‖, the error of reusing the "
        "old exact gradient.",
        "",
        "| level | EOS | divergence | drift | 1 no correction | 2 loop: ρ_n, A_old | 3 ρ_n, A_θ | 4 ρ(y), A_θ | order |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        est = r["estimators"]
        slopes = [v for n in ("no_correction", "token_ratio", "token_ratio_fresh_A")
                  if est[n]["error_max"][eps_index] > 1e-10 for v in (est[n]["slope_min"], est[n]["slope_max"])]
        cells = " | ".join(f"{est[n]['error_max'][eps_index]:.2e}" for n in columns)
        lines.append(f"| {r['level']} | {'yes' if r['eos'] else 'no'} | {r['divergence']} | "
                     f"{r['drift'][eps_index]:.2e} | {cells} | {min(slopes):.2f}–{max(slopes):.2f} |")
    for eta in etas:
        h = results["etas"].index(eta)
        lines += [
            "",
            f"One gradient step θ = θ_old − {eta:g}·∇J(θ_old): relative error (min cosine over seeds); "
            "|log ρ|: largest per-token log-ratio; clipped: π_old-expected fraction of response tokens the "
            f"clip {results['clip_epsilon']:g} zeroes.",
            "",
            "| level | EOS | divergence | ‖θ−θ_old‖ | max abs log ρ | clipped | drift | 1 no correction | "
            "2 loop, no clip | 2c loop, clip 0.2 | 3 ρ_n, A_θ | 4 ρ(y), A_θ |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["records"]:
            cells = " | ".join(
                f"{r['estimators'][n]['step_error_max'][h]:.2e} ({r['estimators'][n]['step_cosine_min'][h]:.3f})"
                for n in ESTIMATORS)
            lines.append(f"| {r['level']} | {'yes' if r['eos'] else 'no'} | {r['divergence']} | "
                         f"{r['step_norm'][h]:.3f} | {r['step_max_abs_log_ratio'][h]:.3f} | "
                         f"{r['step_clipped_fraction'][h]:.3f} | {r['step_drift'][h]:.2e} | {cells} |")
    return "\n".join(lines) + "\n"


def markdown(results):
    """The markdown tables of :func:`run_all`'s results."""
    eps = results["epsilons"]
    etas = results["etas"]
    lines = []
    for level in ("token", "sequence"):
        target = "∇J_tok (OPD+ γ = 1)" if level == "token" else "∇J_seq (sequence OPD+)"
        for eos in (False, True):
            records = [r for r in results["records"] if r["level"] == level and r["eos"] == eos]
            lines += [
                f"### {level} level, target {target}, {'with' if eos else 'without'} EOS "
                f"(V = {results['vocab']}, T = {results['horizon']}, seeds {results['seeds']})",
                "",
                "Relative error ‖E[ĝ] − ∇J(θ)‖/‖∇J(θ)‖ (max over seeds) at θ_old = θ − ε·d; slope: fitted order "
                f"in ε over ε ∈ {results['slope_epsilons']} (min–max over seeds); cos: min cosine at ε = {eps[-2]:g}.",
                "",
                "| divergence | estimator | " + " | ".join(f"ε={e:g}" for e in eps) + " | slope | cos ε=" + f"{eps[-2]:g} |",
                "|---|---|" + "---|" * len(eps) + "---|---|",
            ]
            for r in records:
                drift = " | ".join(f"{d:.2e}" for d in r["drift"])
                lines.append(f"| {r['divergence']} | ‖∇J(θ_old)−∇J(θ)‖ (drift) | {drift} | | |")
                for name in ESTIMATORS:
                    e = r["estimators"][name]
                    errs = " | ".join(f"{x:.2e}" for x in e["error_max"])
                    slope = "—" if name == "sequence_ratio" else f"{e['slope_min']:.2f}–{e['slope_max']:.2f}"
                    lines.append(f"| | {SHORT[name]} | {errs} | {slope} | {e['cosine_min'][-2]:.4f} |")
            lines.append("")
            lines.append("Staleness diagnostics (max over divergences and seeds): max |log ρ| per ε = "
                         + ", ".join(f"{max(r['max_abs_log_ratio'][i] for r in records):.3g}" for i in range(len(eps)))
                         + "; π_old-weighted fraction of tokens clipped at 0.2 = "
                         + ", ".join(f"{max(r['clipped_fraction'][i] for r in records):.3g}" for i in range(len(eps)))
                         + ".")
            lines.append("")
    lines += [
        "### One gradient step: θ = θ_old − η ∇J(θ_old) (max relative error over seeds, min cosine)",
        "",
        "| level | EOS | divergence | ‖θ−θ_old‖ (max) | max abs log ρ | clipped | drift | "
        + " | ".join(SHORT[n] for n in ESTIMATORS) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(ESTIMATORS),
    ]
    for h, eta in enumerate(etas):
        for r in results["records"]:
            cells = " | ".join(f"{r['estimators'][n]['step_error_max'][h]:.2e} ({r['estimators'][n]['step_cosine_min'][h]:.3f})"
                               for n in ESTIMATORS)
            lines.append(f"| {r['level']} | {'yes' if r['eos'] else 'no'} | {r['divergence']} η={eta:g} | "
                         f"{r['step_norm'][h]:.3f} | {r['step_max_abs_log_ratio'][h]:.3f} | "
                         f"{r['step_clipped_fraction'][h]:.3f} | {r['step_drift'][h]:.2e} | {cells} |")
    return "\n".join(lines) + "\n"


def results_markdown(results) -> str:
    """``results.md``: the summary tables, then every case (``results``: :func:`run_all`'s, or ``results.json``'s)."""
    return "## Summary\n\n" + summary_markdown(results) + "\n## All cases\n\n" + markdown(results)


def main(argv=None) -> None:
    import argparse
    import pathlib
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="folder for results.md and results.json (optional)")
    parser.add_argument("--from-json", default=None, help="print the tables of an earlier results.json")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(pathlib.Path(args.from_json).read_text())
    else:
        results = run_all(progress=lambda message: print(message, file=sys.stderr))
    text = results_markdown(results)
    print(text)
    if args.output:
        folder = pathlib.Path(args.output)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.md").write_text(text)
        (folder / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
