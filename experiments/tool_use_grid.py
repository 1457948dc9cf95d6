"""OPD vs OPD+ on the toy tool-use task: divergences × estimators × seeds through ``opd_jax.train.train``.

Every run starts from the shipped weak student (``opd_jax/tasks/assets/tool_use/student``) and
distils the shipped teacher on the student's own multi-turn rollouts (the registered task's setup,
``opd_jax.tasks.get_task("tool_use").setup``: tool outputs are context for both models and get no
advantage or gradient). After training, the student is evaluated on held-out questions: greedy
answer accuracy, call validity, exact calls, model tokens per response, and the teacher-KL
``KL(π‖q)`` per model token on temperature-1 rollouts. The table gives mean ± std over seeds, with
the starting student and the teacher as reference rows.

Writes ``<out>/results.json``, ``<out>/results.md``, ``<out>/curves.png`` and one folder per run (train() output:
metrics.jsonl, checkpoints, exported student, plus ``final_eval.json``). Re-running into the same
folder reuses finished runs and resumes unfinished ones.

Usage:
    nice -n 10 .venv/bin/python experiments/tool_use_grid.py --out runs/tool_use_grid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from opd_jax import demo, models, tasks
from opd_jax.advantages import ESTIMATORS
from opd_jax.metrics import plot_curves, read_jsonl
from opd_jax.tasks import tool_use
from opd_jax.train import train

COLUMNS = (
    ("accuracy", "answer acc."),
    ("call_validity", "call validity"),
    ("call_exactness", "exact calls"),
    ("teacher_kl", "teacher-KL"),
    ("response_length", "length"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/tool_use_grid"))
    parser.add_argument("--divergences", nargs="+", default=["reverse_kl", "forward_kl", "js"])
    parser.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS), default=list(ESTIMATORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # Defaults: the settings of `opd-jax demo --task tool_use`.
    demo_config = tasks.get_task("tool_use").demo.config
    parser.add_argument("--steps", type=int, default=demo_config.steps)
    parser.add_argument("--prompts-per-step", type=int, default=demo_config.prompts_per_step)
    parser.add_argument("--group-size", type=int, default=demo_config.group_size)
    parser.add_argument("--learning-rate", type=float, default=demo_config.learning_rate)
    parser.add_argument("--train-problems", type=int, default=4096)
    parser.add_argument("--eval-problems", type=int, default=256)
    parser.add_argument("--eval-seed", type=int, default=0)
    return parser.parse_args(argv)


def format_table(rows: list[dict], reference: dict[str, dict]) -> str:
    header = ["run", "seeds"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in reference.items():
        lines.append("| " + " | ".join([name, "–"] + [f"{metrics[k]:.3f}" for k, _ in COLUMNS]) + " |")
    for row in rows:
        cells = [row["variation"], str(len(row["seeds"]))]
        cells += [f"{row[k]:.3f} ± {row[k + '_std']:.3f}" for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict, budget: int) -> str:
    """``results.md`` from the contents of ``results.json``; ``budget``: the setup's response budget (tokens)."""
    settings = results["settings"]
    line = (f"{settings['steps']} steps × {settings['prompts_per_step']} prompts × {settings['group_size']} rollouts, "
            f"token level, γ = 0, log_ratio_clip 20, lr {settings['learning_rate']}, budget {budget} tokens; "
            f"{settings['eval_problems']} held-out questions; seeds {settings['seeds']}")
    return f"# Tool use: OPD vs OPD+\n\n{line}\n\n{format_table(results['summary'], results['reference'])}\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # Training-split prompts drawn with --eval-seed; held-out questions with --eval-seed + 1.
    setup = tasks.get_task("tool_use").setup(train_problems=args.train_problems, eval_problems=args.eval_problems,
                                             seed=args.eval_seed)
    budget = setup.max_new_tokens

    reference_path = args.out / "reference.json"
    if reference_path.is_file():
        reference = json.loads(reference_path.read_text())
    else:
        reference = {"student (start)": setup.evaluate(setup.student), "teacher": setup.evaluate(setup.teacher)}
        reference_path.write_text(json.dumps(reference, indent=2) + "\n")
    print(json.dumps(reference, indent=1), flush=True)

    base = dataclasses.replace(
        tasks.get_task("tool_use").demo.config, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        max_new_tokens=budget, learning_rate=args.learning_rate, steps=args.steps, eval_every=0,
        checkpoint_every=args.steps,
    )
    records = []
    # Seed-major, so an interrupted grid still covers every variation.
    runs = [(d, e, s) for s in args.seeds for d in args.divergences for e in args.estimators]
    for index, (divergence, estimator, seed) in enumerate(runs):
        variation = f"{divergence}/{estimator}"
        folder = args.out / f"{divergence}-{estimator}-seed{seed}"
        done = folder / "final_eval.json"
        if done.is_file():
            records.append(json.loads(done.read_text()))
            continue
        began = time.perf_counter()
        config = dataclasses.replace(base, divergence=divergence, estimator=estimator, seed=seed)
        student, student_config = models.from_pretrained(tool_use.toy_model_path("student"))
        result = train(config, student, student_config, setup.teacher, setup.prompts, folder, stop_ids=setup.stop_ids,
                       pad_id=setup.pad_id, rollout_fn=setup.rollout_fn, progress=True,
                       label=f"[{index + 1}/{len(runs)}] {variation} seed {seed}")
        metrics = setup.evaluate(result.student)
        train_steps = [r for r in result.history if "teacher_kl" in r]
        record = {"variation": variation, "divergence": divergence, "estimator": estimator, "seed": seed, **metrics,
                  "train_teacher_kl_first": train_steps[0]["teacher_kl"], "train_teacher_kl_last": train_steps[-1]["teacher_kl"],
                  "seconds": round(time.perf_counter() - began, 1)}
        done.write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
        print(json.dumps(record), flush=True)

    rows = demo.summarize(records)
    results = {"settings": vars(args) | {"out": str(args.out)}, "reference": reference, "runs": records,
               "summary": rows, "run_seconds_total": round(sum(r["seconds"] for r in records), 1)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    # Training curves of the first seed of every variation.
    curves = {}
    for divergence, estimator, seed in runs:
        if seed == args.seeds[0]:
            curves[f"{divergence}/{estimator}"] = read_jsonl(args.out / f"{divergence}-{estimator}-seed{seed}" / "metrics.jsonl")
    plot_curves(curves, ["teacher_kl", "response_length", "grad_norm", "advantage_mean"], args.out / "curves.png",
                title=f"tool use: training curves, seed {args.seeds[0]}")
    text = markdown(results, budget)
    (args.out / "results.md").write_text(text)
    print(f"\n{text}\nwrote {args.out / 'results.md'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
