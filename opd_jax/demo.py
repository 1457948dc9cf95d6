"""The embedded default: distil the shipped toy teacher into the weak toy student, OPD vs OPD+.

A demo is a grid of :class:`~opd_jax.train.TrainConfig` variations (divergence × estimator × …
× seed) run through :func:`opd_jax.train.train` on one :class:`~opd_jax.tasks.TaskSetup` (a
registered task's :meth:`~opd_jax.tasks.Task.setup`). Each run evaluates the
student before and after training on held-out problems: greedy accuracy and response length, and
the teacher-KL ``KL(π‖q)`` per response token estimated on temperature-1 student samples. The
summary is one row per variation with mean ± std over seeds, written as Markdown and JSON beside
the per-run folders and a plot of the learning curves.

Re-running into the same output folder resumes unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import tasks
from opd_jax.metrics import plot_curves
from opd_jax.tasks.base import Evaluator, Task, TaskSetup
from opd_jax.train import TrainConfig, train

__all__ = [
    "DEMO_CONFIG", "DEMO_SETTINGS", "TASKS", "TOOL_USE_CONFIG", "DemoTask", "RunSpec", "arithmetic_setup", "demo_task",
    "format_table", "grid", "run_grid", "summarize", "write_results",
]

#: The demo's training settings on the toy arithmetic task: per-token OPD (γ = 0) as in the paper.
DEMO_CONFIG = TrainConfig(
    level="token",
    gamma=0.0,
    log_ratio_clip=20.0,
    prompts_per_step=64,
    group_size=4,
    max_new_tokens=24,
    learning_rate=3e-4,
    steps=200,
    eval_every=50,
    checkpoint_every=50,
    keep_checkpoints=1,
)

#: The demo's settings on the toy tool-use task (the settings of ``experiments/tool_use_grid.py``):
#: multi-turn rollouts cost more per step, and the weak student moves within 40 steps at a higher
#: learning rate.
TOOL_USE_CONFIG = dataclasses.replace(
    DEMO_CONFIG, prompts_per_step=32, learning_rate=1e-3, steps=40, eval_every=20, checkpoint_every=20
)

#: Row metrics of the summary table: (record key, column title).
SUMMARY_COLUMNS = (
    ("accuracy", "accuracy"),
    ("teacher_kl", "teacher KL"),
    ("response_length", "length"),
)
#: The tool-use table adds the share of valid tool calls.
TOOL_USE_COLUMNS = SUMMARY_COLUMNS[:1] + (("call_validity", "call validity"),) + SUMMARY_COLUMNS[1:]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a grid: a label for the variation, its seed, the full training config, and keyword
    arguments of :func:`opd_jax.train.train` beyond it (plug-ins: ``advantage_fn``, ``loss_fn``,
    ``reference``; they are not recorded in ``config.json``)."""

    variation: str
    seed: int
    config: TrainConfig
    train_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def folder(self) -> str:
        return f"{self.variation}-seed{self.seed}".replace("/", "-").replace("=", "")


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """A registered task with the demo's settings on it: what ``opd-jax demo`` / ``opd-jax eval --task`` use.

    Attributes:
      task: the :class:`~opd_jax.tasks.Task`.
      config: the demo's training settings on this task (divergence, estimator and seed are the
        grid's; ``max_new_tokens`` is the setup's).
      columns: the metrics of its summary table.
      output: the default output folder of ``opd-jax demo --task``.
    """

    task: Task
    config: TrainConfig = DEMO_CONFIG
    columns: tuple[tuple[str, str], ...] = SUMMARY_COLUMNS
    output: pathlib.Path = pathlib.Path("runs/demo")

    def setup(self, **kwargs) -> TaskSetup:
        """:meth:`Task.setup <opd_jax.tasks.Task.setup>` (``train_problems``, ``eval_problems``, ``seed``)."""
        return self.task.setup(**kwargs)

    def teacher_path(self) -> pathlib.Path:
        return self.task.model_path("teacher")

    def evaluator(self, tokenizer, teacher, *, eval_problems: int = 512, seed: int = 0) -> Evaluator:
        """:meth:`Task.evaluator <opd_jax.tasks.Task.evaluator>`."""
        return self.task.evaluator(tokenizer, teacher, eval_problems=eval_problems, seed=seed)


#: The demo's settings by task name; a task not named here gets the DemoTask defaults and the
#: output folder ``runs/demo-<name>``.
DEMO_SETTINGS = types.MappingProxyType({
    "arithmetic": types.MappingProxyType({"output": pathlib.Path("runs/demo")}),
    # The same task on models vLLM serves (head size 32), sampled by the vLLM backend.
    "arithmetic_vllm": types.MappingProxyType({"config": dataclasses.replace(DEMO_CONFIG, rollout_backend="vllm"),
                                               "output": pathlib.Path("runs/demo-arithmetic_vllm")}),
    "tool_use": types.MappingProxyType({"config": TOOL_USE_CONFIG, "columns": TOOL_USE_COLUMNS,
                                        "output": pathlib.Path("runs/demo-tool_use")}),
})


def demo_task(name: str) -> DemoTask:
    """The task registered as ``name`` (:func:`opd_jax.tasks.get_task`) with the demo's settings on it.

    Raises:
      ValueError: an unknown task (the message lists the registered ones).
    """
    settings = {"output": pathlib.Path(f"runs/demo-{name}"), **DEMO_SETTINGS.get(name, {})}
    return DemoTask(tasks.get_task(name), **settings)


class _DemoTasks(Mapping):
    """Every registered task as a :class:`DemoTask`, by name (read-only; follows the registry)."""

    def __getitem__(self, name: str) -> DemoTask:
        if name not in tasks.TASKS:
            raise KeyError(name)
        return demo_task(name)

    def __iter__(self) -> Iterator[str]:
        return iter(tasks.task_names())

    def __len__(self) -> int:
        return len(tasks.TASKS)


#: The tasks of ``opd-jax demo`` / ``opd-jax eval``: every registered task as a :class:`DemoTask`.
TASKS: Mapping[str, DemoTask] = _DemoTasks()


def arithmetic_setup(**kwargs) -> TaskSetup:
    """The arithmetic task's setup, ``tasks.get_task("arithmetic").setup(**kwargs)`` (the name notebooks use)."""
    return tasks.get_task("arithmetic").setup(**kwargs)


def grid(base: TrainConfig, axes: dict[str | tuple[str, ...], Sequence[Any]], seeds: Sequence[int]) -> list[RunSpec]:
    """Every combination of ``axes`` applied to ``base``, per seed.

    An axis is a TrainConfig field with its values, or a tuple of fields with tuples of values that
    vary together (e.g. ``("level", "gamma"): [("token", 0.0), ("token", 1.0), ("sequence", 0.0)]``).
    The variation label joins the values in the order of ``axes`` (``None`` left out), e.g.
    ``forward_kl/opd_plus``.

    Raises:
      ValueError: an axis that is not a TrainConfig field, or a combination it rejects.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    named = [name for key in axes for name in ((key,) if isinstance(key, str) else key)]
    unknown = sorted(set(named) - fields)
    if unknown:
        raise ValueError(f"unknown grid axis {unknown}; valid: {sorted(fields)}")
    combinations: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        names = (key,) if isinstance(key, str) else key
        combinations = [
            {**combo, **dict(zip(names, (value,) if isinstance(key, str) else value, strict=True))}
            for combo in combinations for value in values
        ]
    specs = []
    for combo in combinations:
        variation = "/".join(_format_value(name, value) for name, value in combo.items() if value is not None)
        for seed in seeds:
            specs.append(RunSpec(variation, seed, dataclasses.replace(base, **combo, seed=seed)))
    return specs


def _format_value(name: str, value: Any) -> str:
    return str(value) if name in ("divergence", "estimator", "level") else f"{name}={value:g}" if isinstance(
        value, float) else f"{name}={value}"


def run_grid(
    setup: TaskSetup, specs: Sequence[RunSpec], output_dir: str | pathlib.Path, *, progress: bool = True
) -> list[dict[str, Any]]:
    """Train every run of ``specs`` into ``output_dir/<run>/`` and return one record per run.

    A record holds the variation, seed, the evaluation before (``*_before``) and after training,
    and the wall time. The student is re-started from ``setup.student`` for every run.
    """
    from flax import nnx

    output_dir = pathlib.Path(output_dir)
    graphdef, initial_state = nnx.split(setup.student)
    records = []
    for index, spec in enumerate(specs):
        began = time.perf_counter()
        student = nnx.merge(graphdef, jax.tree.map(jnp.copy, initial_state))
        result = train(
            spec.config, student, setup.student_config, setup.teacher, setup.prompts, output_dir / spec.folder,
            stop_ids=setup.stop_ids, pad_id=setup.pad_id, evaluate=setup.evaluate, rollout_fn=setup.rollout_fn,
            progress=progress, label=f"[{index + 1}/{len(specs)}] {spec.variation} seed {spec.seed}",
            **spec.train_options,
        )
        setup.tokenizer.save_pretrained(result.output_dir / "student")
        evaluations = [r for r in result.history if any(k.startswith("eval_") for k in r)]
        first = {k[5:]: v for k, v in evaluations[0].items() if k.startswith("eval_")} if evaluations else {}
        last = {k[5:]: v for k, v in evaluations[-1].items() if k.startswith("eval_")} if evaluations else {}
        records.append({
            "variation": spec.variation, "seed": spec.seed, "config": spec.config.to_dict(),
            **{f"{k}_before": v for k, v in first.items()}, **last,
            "seconds": time.perf_counter() - began,
        })
    return records


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variation (in first-seen order): mean and std over seeds of every numeric metric."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        rows.setdefault(record["variation"], []).append(record)
    summary = []
    for variation, group in rows.items():
        row: dict[str, Any] = {"variation": variation, "seeds": [r["seed"] for r in group]}
        keys = [k for k in group[0] if k not in ("variation", "seed", "config")
                and isinstance(group[0][k], (int, float))]
        for key in keys:
            values = np.asarray([r[key] for r in group if key in r], np.float64)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def format_table(summary: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = SUMMARY_COLUMNS) -> str:
    """A Markdown table: variation, then ``before → after`` for each column (mean ± std over seeds)."""

    def cell(row, key):
        if key not in row:
            return "–"
        text = f"{row[key]:.3f}"
        return text + (f" ± {row[key + '_std']:.3f}" if len(row["seeds"]) > 1 else "")

    header = ["run", "seeds"] + [f"{title} before → after" for _, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["variation"], str(len(row["seeds"]))]
        cells += [f"{cell(row, key + '_before')} → {cell(row, key)}" for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    setup: TaskSetup, specs: Sequence[RunSpec], records: Sequence[dict[str, Any]], output_dir: str | pathlib.Path,
    columns: Sequence[tuple[str, str]] = SUMMARY_COLUMNS,
) -> str:
    """Write ``results.json``, ``results.md`` and ``curves.png`` (first seed of every variation); return the table."""
    output_dir = pathlib.Path(output_dir)
    summary = summarize(records)
    table = format_table(summary, columns)
    (output_dir / "results.json").write_text(json.dumps({"task": setup.name, "runs": list(records),
                                                         "summary": summary}, indent=2) + "\n")
    (output_dir / "results.md").write_text(f"# {setup.name}: OPD vs OPD+\n\n{table}\n")
    from opd_jax.metrics import read_jsonl

    curves = {}
    for spec in specs:
        if spec.variation not in curves:
            curves[spec.variation] = read_jsonl(output_dir / spec.folder / "metrics.jsonl")
    plot_curves(curves, [f"eval_{key}" for key, _ in columns] + ["teacher_kl"],
                output_dir / "curves.png", title=f"{setup.name}: on-policy distillation")
    return table
