"""The full grid on the toy arithmetic task: every divergence × estimator × objective form × seed.

Objective forms: token level with γ = 0 (the per-token form used in practice), token level with
γ = 1 (the unbiased reward-to-go), and sequence level. Every run starts from the shipped weak
student and uses the demo's settings (``tasks.get_task("arithmetic").demo.config``) unless overridden here.

Writes ``results.md`` (mean ± std over seeds), ``results.json`` (every run) and ``curves.png`` to
``--output``; re-running resumes unfinished runs and reuses finished ones, so the grid can be
filled in over several sessions.

    .venv/bin/python experiments/opd_grid.py --output runs/grid            # everything
    .venv/bin/python experiments/opd_grid.py --divergences reverse_kl forward_kl js --forms token-g0 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

from opd_jax import demo, tasks
from opd_jax.advantages import ESTIMATORS
from opd_jax.config import BASELINES

#: divergence label -> (TrainConfig divergence, beta, alpha).
DIVERGENCES = {
    "reverse_kl": ("reverse_kl", None, None),
    "forward_kl": ("forward_kl", None, None),
    "js": ("js", None, None),
    "generalized_js_0.9": ("generalized_js", 0.9, None),
    "total_variation": ("total_variation", None, None),
    "squared_hellinger": ("squared_hellinger", None, None),
    "pearson_chi2": ("pearson_chi2", None, None),
    "neyman_chi2": ("neyman_chi2", None, None),
    "alpha_0.5": ("alpha", None, 0.5),
}
#: objective form -> (level, gamma).
FORMS = {"token-g0": ("token", 0.0), "token-g1": ("token", 1.0), "sequence": ("sequence", 0.0)}


def main(argv=None) -> int:
    task = tasks.get_task("arithmetic")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--divergences", nargs="+", choices=list(DIVERGENCES), default=list(DIVERGENCES))
    parser.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS), default=list(ESTIMATORS))
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--baseline", choices=BASELINES, default=task.demo.config.baseline,
                        help="advantage baseline (leave_one_out: mean of the other rollouts of the prompt)")
    parser.add_argument("--steps", type=int, default=task.demo.config.steps)
    parser.add_argument("--eval-problems", type=int, default=512, help="held-out problems per evaluation")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("runs/grid"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    setup = task.setup(eval_problems=args.eval_problems)
    base = dataclasses.replace(task.demo.config, steps=args.steps,
                               eval_every=min(task.demo.config.eval_every, args.steps), baseline=args.baseline)
    specs = demo.grid(
        base,
        {
            ("divergence", "beta", "alpha"): [DIVERGENCES[name] for name in args.divergences],
            "estimator": args.estimators,
            ("level", "gamma"): [FORMS[name] for name in args.forms],
        },
        args.seeds,
    )
    began = time.perf_counter()
    records = demo.run_grid(setup, specs, args.output, progress=not args.quiet)
    table = demo.write_results(setup, specs, records, args.output)
    print(f"\n{len(specs)} runs of {args.steps} steps in {time.perf_counter() - began:.0f} s\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
