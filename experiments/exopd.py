"""ExOPD / G-OPD reward extrapolation through the plug points, and a toy run against OPD+.

G-OPD ("Learning beyond Teacher: Generalized On-Policy Distillation with Reward Extrapolation")
rewards a token by ``λ·(log q − log π_ref) − (log π − log π_ref)``: a KL-regularised RL reward
whose optimum is the extrapolation ``∝ π_ref^{1−λ} q^λ`` of the teacher past the reference (λ > 1).
At λ = 1 it is reverse-KL stop-gradient OPD. The whole estimator is the function below.

What it follows (tests/test_exopd.py checks it by exact enumeration, float64): with ``gamma = 1``
the exact gradient of ``J_λ(θ) = E_{y∼π}[Σ_n log π(y_n) − λ log q(y_n) − (1 − λ) log π_ref(y_n)]``
(the reverse KL from π to the unnormalised extrapolation); ``gamma = 0`` (the per-token form) is
biased for it beyond one step, like every per-token estimator.

Usage: .venv/bin/python experiments/exopd.py [--steps 200] [--scale 1.25] [--seeds 0] [--output runs/exopd]
(results of the default run: experiments/results/exopd/)
"""

from opd_jax.advantages import reward_to_go


def exopd_advantage_fn(scale: float, gamma: float = 0.0):
    """``advantage_fn`` of G-OPD with reward scale ``scale`` (λ); needs ``train(reference=...)``."""

    def advantage_fn(student_logp_BxT, teacher_logp_BxT, response_mask_BxT, *, reference_logp_BxT):
        reward_BxT = scale * (teacher_logp_BxT - reference_logp_BxT) - (student_logp_BxT - reference_logp_BxT)
        return reward_to_go(reward_BxT, response_mask_BxT, gamma=gamma)

    return advantage_fn


def main(argv=None) -> None:
    """Seeded runs on the toy arithmetic task: ExOPD at ``--scale`` (γ = 0, the paper's per-token form,
    reference = the starting student) against JS OPD+ and reverse-KL stop-gradient OPD (= ExOPD at λ = 1)."""
    import argparse
    import dataclasses
    import pathlib

    from opd_jax import demo, tasks

    task = tasks.get_task("arithmetic")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=task.demo.config.steps, help="training steps per run [200]")
    parser.add_argument("--scale", type=float, default=1.25, help="reward scale lambda of ExOPD [1.25]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds [0]")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("runs/exopd"), help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup = task.setup()
    base = dataclasses.replace(task.demo.config, steps=args.steps, max_new_tokens=setup.max_new_tokens,
                               eval_every=min(task.demo.config.eval_every, args.steps))
    specs = []
    for seed in args.seeds:
        config = dataclasses.replace(base, seed=seed)
        specs += [
            demo.RunSpec("js/opd_plus", seed, dataclasses.replace(config, divergence="js", estimator="opd_plus")),
            # ExOPD at scale 1, whatever the reference:
            demo.RunSpec("reverse_kl/stop_grad", seed,
                         dataclasses.replace(config, divergence="reverse_kl", estimator="stop_grad")),
            demo.RunSpec(f"exopd/scale_{args.scale}", seed, config,
                         {"advantage_fn": exopd_advantage_fn(args.scale), "reference": setup.student}),
        ]
    records = demo.run_grid(setup, specs, args.output, progress=not args.quiet)
    print(demo.write_results(setup, specs, records, args.output, task.demo.columns))


if __name__ == "__main__":
    main()
