"""``opd-jax demo``: the embedded default, stop-gradient OPD vs OPD+ on a shipped toy task."""

from __future__ import annotations

import argparse
import json
import pathlib

from opd_jax.commands.flags import fail, positive_int


def add_parser(subparsers) -> None:
    from opd_jax import tasks
    from opd_jax.advantages import ESTIMATORS
    from opd_jax.divergences import names as divergence_names

    # The parametrised generators (generalized_js, alpha) need a value: they are in the grid script.
    plain_divergences = [n for n in divergence_names() if n not in ("generalized_js", "alpha")]

    demo = subparsers.add_parser(
        "demo",
        help="the embedded default: stop-gradient OPD vs OPD+ on a toy task (no downloads)",
        description=(
            "Distil the shipped toy teacher into the weak toy student with each divergence and "
            "estimator, evaluate before and after on held-out problems (greedy accuracy, response "
            "length, teacher-KL per token on temperature-1 samples), and print the table. Writes "
            "results.md, results.json, curves.png and one folder per run (metrics, TensorBoard, "
            "checkpoints, exported student) under --output; re-running resumes unfinished runs."
        ),
    )
    settings = {name: tasks.get_task(name).demo for name in sorted(tasks.task_names())}
    demo.add_argument("--task", choices=sorted(settings), default="arithmetic", help="toy task (default arithmetic)")
    demo.add_argument("--output", type=pathlib.Path,
                      help="output folder (default: the task's, " + ", ".join(
                          f"{name} {task_demo.output_folder(name)}" for name, task_demo in settings.items()) + ")")
    demo.add_argument("--divergence", action="append", choices=plain_divergences, metavar="NAME",
                      help="divergence, repeatable (default: reverse_kl forward_kl js)")
    demo.add_argument("--estimator", action="append", choices=tuple(ESTIMATORS),
                      help="estimator, repeatable (default: both)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    default_steps = ", ".join(f"{name} {task_demo.config.steps}" for name, task_demo in settings.items())
    demo.add_argument("--steps", type=positive_int(1),
                      help=f"training steps per run (default: the task's, {default_steps})")
    demo.add_argument("--eval-problems", type=positive_int(1), default=512,
                      help="held-out problems per evaluation (default 512)")
    demo.add_argument("--rollout-backend", choices=("jax", "vllm"),
                      help="where rollouts are sampled (default: the task's); vllm runs the task's '<task>_vllm' "
                           "variant, whose student vLLM serves (" + ", ".join(
                               name for name in sorted(settings) if name.endswith("_vllm")) + ")")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from opd_jax import demo, tasks
    from opd_jax.advantages import ESTIMATORS

    name = _task_for_backend(args.task, args.rollout_backend)
    task = tasks.get_task(name)
    settings = task.demo  # the demo's settings live on the task
    output = args.output or settings.output_folder(name)
    if output.exists() and not output.is_dir():
        fail("demo", f"--output {output} is a file; give a folder")
    previous = output / "results.json"
    previous_task = json.loads(previous.read_text()).get("task") if previous.is_file() else None
    if previous_task not in (None, name):
        fail("demo", f"--output {output} holds results of task {previous_task!r}, not {name!r}; give another folder")
    setup = task.setup(eval_problems=args.eval_problems)
    steps = args.steps or settings.config.steps
    base = dataclasses.replace(settings.config, steps=steps, max_new_tokens=setup.max_new_tokens,
                               eval_every=min(settings.config.eval_every, steps),
                               rollout_backend=args.rollout_backend or settings.config.rollout_backend)
    axes = {"divergence": args.divergence or ["reverse_kl", "forward_kl", "js"],
            "estimator": args.estimator or list(ESTIMATORS)}
    specs = demo.grid(base, axes, args.seeds)
    try:
        records = demo.run_grid(setup, specs, output, progress=not args.quiet)
    except ValueError as error:  # e.g. a run folder that holds a run with other settings
        fail("demo", str(error))
    table = demo.write_results(setup, specs, records, output, settings.columns)
    seconds = sum(r["seconds"] for r in records)
    print(f"\n{setup.name}: {len(specs)} runs of {steps} steps in {seconds:.0f} s\n\n{table}\n")
    print(f"wrote {output / 'results.md'}, {output / 'results.json'}, {output / 'curves.png'}")
    return 0


def _task_for_backend(name: str, backend: str | None) -> str:
    """The task the demo runs: ``name``, or for ``--rollout-backend vllm`` its ``<name>_vllm`` variant
    (a student vLLM's attention serves) when ``name`` samples with JAX."""
    from opd_jax import tasks

    if backend != "vllm" or tasks.get_task(name).demo.config.rollout_backend == "vllm":
        return name
    variant = f"{name}_vllm"
    if variant not in tasks.task_names():
        served = sorted(n.removesuffix("_vllm") for n in tasks.task_names() if n.endswith("_vllm"))
        fail("demo", f"--rollout-backend vllm: task {name!r} ships no student vLLM serves; allowed tasks: "
                     f"{', '.join(served)}")
    return variant
